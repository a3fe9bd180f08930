"""Measure benchmark cases: incremental peak memory, time, and agreement with the naive baseline.

Runs inside worker processes (``python -m bench.measure --worker``, driven by bench/run.py): one
process per implementation, so each case's peak memory is its own (on CPU a fresh set of
workers per shape; on CUDA one per implementation for the whole run, since the caching
allocator's own peak counter is exact in-process). ``python -m bench.measure CASES_JSON`` runs
cases one after the other instead, one JSON row each on stdout after ``ROW_PREFIX``.

Per case, in order:
  1. build the inputs (seeded) — they exist before any baseline is taken, so they are excluded;
  2. probe: the implementation and ``naive`` on the first ``probe_n`` tokens; the largest
     |log-prob difference| is recorded (``err_vs_naive``) and the code paths get warm;
     on CUDA also one full-size call (Triton JIT/autotune must not count as memory);
  3. memory call at full size: CPU = peak RSS (VmHWM, reset through /proc/self/clear_refs) over
     the RSS just before; CUDA = ``max_memory_allocated`` over ``memory_allocated`` before;
  4. timed calls until ``min_repeats`` are done and ``budget_s`` is spent (at most ``max_repeats``);
     with ``time_memory_call`` (CPU quick mode) the memory call counts as the first of them: the
     probe has already warmed the code paths, and a call at N = 4096 takes 10-30 s on 2 cores.
     The parent interleaves the implementations of a shape: one timed call of each in turn
     (``interleave``), each in its own worker process (``worker``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from . import baselines as B

ROW_PREFIX = "BENCH_ROW "
REPLY_PREFIX = "BENCH_REPLY "


@dataclass
class Case:
    """One (workload, implementation, shape) measurement; JSON-serialisable."""

    workload: str  # one of baselines.WORKLOADS
    impl: str
    n: int
    d: int
    v: int
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    min_repeats: int = 1
    max_repeats: int = 5
    budget_s: float = 3.0  # stop repeating once this much time was timed (after min_repeats)
    time_memory_call: bool = False  # the memory call is also the first timed repeat
    probe_n: int = 64
    extra: dict = field(default_factory=dict)  # options for ``ours`` (chunk_tokens, chunk_vocab)

    def flops(self) -> float:
        """Effective FLOPs: 2·S·N·D·V forward + 2·N·D·V per gradient (recompute not counted)."""
        ndv = 2.0 * self.n * self.d * self.v
        per_ndv = {"scoring": B.NUM_STREAMS, "update": 2, "update_w": 3}
        return per_ndv[self.workload] * ndv


# --------------------------------------------------------------------------------------------
# Memory probes


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back before the baseline
    except OSError:
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _RssSampler:
    """Fallback when VmHWM cannot be reset: poll VmRSS every millisecond."""

    def __init__(self):
        self.peak = _status_kib("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("VmRSS"))


def measure_memory(fn, device: torch.device) -> tuple[float, str]:
    """Incremental peak memory of one ``fn()`` call in MiB, and the method used."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20, "cuda max_memory_allocated"
    _malloc_trim()
    base = _status_kib("VmRSS")
    if _reset_hwm():
        out = fn()
        peak = _status_kib("VmHWM")
        method = "VmHWM over VmRSS"
    else:
        with _RssSampler() as s:
            out = fn()
        peak, method = s.peak, "sampled VmRSS (1 ms)"
    del out
    return max(peak - base, 0) / 1024, method


# --------------------------------------------------------------------------------------------
# Running one case


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeats_done(samples: list[float], case: Case) -> bool:
    """A case stops being timed after ``max_repeats`` calls, or after ``min_repeats`` once the
    timed calls add up to ``budget_s``."""
    return len(samples) >= case.max_repeats or (
        len(samples) >= case.min_repeats and sum(samples) >= case.budget_s)


def interleave(timers: dict, cases: dict, samples: dict) -> list[str]:
    """Round-robin timing: each round times one call of every implementation still short of
    its repeats, in a fixed order, so a change in a shared machine's load hits all alike.

    ``timers[k]()`` times one call and returns its seconds (None: it failed, stop timing it);
    ``samples[k]`` holds the calls already timed (the memory call in CPU quick mode) and gets
    the new ones. Returns the order of the calls made (for the tests)."""
    order, failed = [], set()
    while active := [k for k in timers if k not in failed and not repeats_done(samples[k],
                                                                                cases[k])]:
        for k in active:
            order.append(k)
            t = timers[k]()
            if t is None:
                failed.add(k)
            else:
                samples[k].append(t)
    return order


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _max_err(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _probe(impl: B.Impl, case: Case, inp: B.Inputs) -> float | None:
    """Warm the code paths on a slice and compare with naive there (None for the floor)."""
    small = B.slice_inputs(inp, min(case.probe_n, case.n))
    if case.workload == "scoring":
        with torch.no_grad():
            got = impl.score(small)
            ref = B.IMPLS["naive"].score(small)
        if got.policy is None:
            return None
        return _max_err(got, ref)
    grads = []
    for i in (impl, B.IMPLS["naive"]):
        h = small.policy.detach().clone().requires_grad_(True)
        w = small.weight.detach().requires_grad_(case.workload == "update_w")
        lp = i.update(small, h, w)
        if lp is None:
            return None
        grads.append((lp.detach(), h.grad) + ((w.grad,) if w.requires_grad else ()))
    return _max_err(grads[0], grads[1])


class Measured:
    """One case in a process: inputs, probe and memory call at construction (never raises:
    errors become ``row["status"] = "error"``), then ``time_one()`` per timed call and
    ``finish()`` for the row with the timing statistics."""

    def __init__(self, case: Case):
        self.case, self.samples, self.cpu = case, [], []
        self.row = row = asdict(case)
        row.pop("extra")
        row.update(extra=json.dumps(case.extra) if case.extra else "", status="ok", reason="",
                   backend="", mem_mib=None, mem_method="", time_median_s=None,
                   time_p20_s=None, time_p80_s=None, time_min_s=None, time_max_s=None,
                   cpu_median_s=None, repeats=0, flops=case.flops(), tflops=None,
                   err_vs_naive=None)
        self._t_start = time.perf_counter()
        try:
            self._prepare()
        except Exception as exc:  # noqa: BLE001 - one failing case must not sink the run
            self._fail(exc)

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"

    def _fail(self, exc: Exception) -> None:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]} "
                        f"(at {where.filename.rsplit('/', 2)[-1]}:{where.lineno})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _prepare(self) -> None:
        case, row = self.case, self.row
        self.device = device = torch.device(case.device)
        impl = B.get(case.impl)
        ok, why = impl.available(device)
        if not ok:
            row.update(status="unavailable", reason=why)
            return
        inp = B.make_inputs(case.n, case.d, case.v, dtype=getattr(torch, case.dtype),
                            device=device, seed=case.seed)
        inp.extra = dict(case.extra) if case.impl == "ours" else {}
        row["backend"] = _backend_of(impl, inp, device)
        row["err_vs_naive"] = _probe(impl, case, inp)

        if case.workload == "scoring":
            def call():
                with torch.no_grad():
                    return impl.score(inp)
            before = None
        else:
            h = inp.policy.detach().clone().requires_grad_(True)
            w = inp.weight.detach().requires_grad_(case.workload == "update_w")

            def call():
                return impl.update(inp, h, w)

            def before():
                h.grad = None
                w.grad = None
        self._call, self._before = call, before

        if device.type == "cuda":  # JIT + autotune at this shape, outside the memory window
            if before:
                before()
            call()
        if before:
            before()
        c0, t0 = time.process_time(), time.perf_counter()
        row["mem_mib"], row["mem_method"] = measure_memory(call, device)
        if case.time_memory_call:
            self.samples.append(time.perf_counter() - t0)
            self.cpu.append(time.process_time() - c0)

    def time_one(self) -> float | None:
        """Wall-clock seconds of one call (process CPU seconds, summed over threads, are kept
        too: a shared machine's time slicing distorts them least); None once it failed."""
        if not self.ok:
            return None
        try:
            if self._before is not None:
                self._before()
            _sync(self.device)
            c0, t0 = time.process_time(), time.perf_counter()
            self._call()
            _sync(self.device)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return None
        self.samples.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        return self.samples[-1]

    def finish(self) -> dict:
        row, samples = self.row, self.samples
        if self.ok and samples:
            med = statistics.median(samples)
            row.update(time_median_s=med, time_p20_s=_quantile(samples, 0.2),
                       time_p80_s=_quantile(samples, 0.8), time_min_s=min(samples),
                       time_max_s=max(samples), cpu_median_s=statistics.median(self.cpu),
                       repeats=len(samples), tflops=self.case.flops() / med / 1e12)
        row["wall_s"] = time.perf_counter() - self._t_start
        return row


def run_case(case: Case) -> dict:
    """Measure one case on its own in this process; never raises."""
    m = Measured(case)
    if m.ok:
        interleave({case.impl: m.time_one}, {case.impl: case}, {case.impl: m.samples})
    return m.finish()


def _backend_of(impl: B.Impl, inp: B.Inputs, device: torch.device) -> str:
    """Which code path runs: ours reports it; the others are named by device."""
    if impl.name == "ours":
        from cepo_kernels import resolve_backend

        return resolve_backend(inp.extra.get("backend", "auto"), device)
    return {"trl": "triton" if device.type == "cuda" else "torch tiles",
            "liger_flce": "triton", "cce": "triton", "cce_compile": "torch.compile",
            "liger_chunked": "torch"}.get(impl.name, "torch")


def worker() -> None:
    """``python -m bench.measure --worker``: one JSON command a line on stdin, one reply a
    line on stdout after ``REPLY_PREFIX``. The parent (bench/run.py) keeps one worker per
    implementation alive while it times them in turn: ``{"op": "setup", "case": {...}}``
    (inputs, probe, memory call) -> ``{"ok", "samples"}``; ``{"op": "time"}`` -> ``{"s"}``;
    ``{"op": "finish"}`` -> ``{"row"}``."""
    m = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "setup":
            m = Measured(Case(**msg["case"]))
            reply = {"ok": m.ok, "samples": m.samples}
        elif msg["op"] == "time":
            reply = {"s": m.time_one()}
        elif msg["op"] == "finish":
            reply, m = {"row": m.finish()}, None
            gc.collect()
        else:
            raise SystemExit(f"bench.measure: unknown op {msg['op']!r}")
        print(REPLY_PREFIX + json.dumps(reply), flush=True)


def main(argv: list[str]) -> None:
    if argv == ["--worker"]:
        return worker()
    cases = [Case(**c) for c in json.loads(argv[0])]
    for case in cases:
        row = run_case(case)
        print(ROW_PREFIX + json.dumps(row), flush=True)
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
