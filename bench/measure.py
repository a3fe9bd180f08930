"""Measure benchmark cases: incremental peak memory, time, and agreement with the naive baseline.

Runs inside a child process (``python -m bench.measure CASES_JSON``), one JSON row per case on
stdout after ``ROW_PREFIX``. The parent (bench/run.py) starts a fresh child per case on CPU, so
each case's peak RSS is its own; on CUDA one child runs all cases of an implementation, since the
caching allocator's own peak counter is exact in-process.

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


def _time_calls(fn, device: torch.device, case: Case, before=None, samples=(), cpu=()):
    """Wall-clock and process CPU seconds per call (CPU time, summed over threads, is what a
    shared machine's time slicing distorts least); ``samples``/``cpu`` are already-timed calls."""
    samples, cpu = list(samples), list(cpu)
    def done() -> bool:
        return len(samples) >= case.max_repeats or (
            len(samples) >= case.min_repeats and sum(samples) >= case.budget_s)

    while not done():
        if before is not None:
            before()
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return samples, cpu


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


def run_case(case: Case) -> dict:
    """Measure one case; never raises (errors become a row with ``status="error"``)."""
    row = asdict(case)
    row.pop("extra")
    row.update(extra=json.dumps(case.extra) if case.extra else "", status="ok", reason="",
               backend="", mem_mib=None, mem_method="", time_median_s=None, time_p20_s=None,
               time_p80_s=None, time_min_s=None, time_max_s=None, cpu_median_s=None, repeats=0,
               flops=case.flops(), tflops=None, err_vs_naive=None)
    t_start = time.perf_counter()
    try:
        device = torch.device(case.device)
        impl = B.get(case.impl)
        ok, why = impl.available(device)
        if not ok:
            row.update(status="unavailable", reason=why)
            return row
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

        if device.type == "cuda":  # JIT + autotune at this shape, outside the memory window
            if before:
                before()
            call()
        if before:
            before()
        c0, t0 = time.process_time(), time.perf_counter()
        row["mem_mib"], row["mem_method"] = measure_memory(call, device)
        first = ([time.perf_counter() - t0], [time.process_time() - c0])
        samples, cpu = _time_calls(call, device, case, before,
                                   *(first if case.time_memory_call else ((), ())))
        med = statistics.median(samples)
        row.update(time_median_s=med, time_p20_s=_quantile(samples, 0.2),
                   time_p80_s=_quantile(samples, 0.8), time_min_s=min(samples),
                   time_max_s=max(samples), cpu_median_s=statistics.median(cpu),
                   repeats=len(samples), tflops=case.flops() / med / 1e12)
    except Exception as exc:  # noqa: BLE001 - one failing case must not sink the run
        where = traceback.extract_tb(exc.__traceback__)[-1]
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]} "
                   f"(at {where.filename.rsplit('/', 2)[-1]}:{where.lineno})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    finally:
        row["wall_s"] = time.perf_counter() - t_start
    return row


def _backend_of(impl: B.Impl, inp: B.Inputs, device: torch.device) -> str:
    """Which code path runs: ours reports it; the others are named by device."""
    if impl.name == "ours":
        from cepo_kernels import resolve_backend

        return resolve_backend(inp.extra.get("backend", "auto"), device)
    return {"trl": "triton" if device.type == "cuda" else "torch tiles",
            "liger_flce": "triton", "cce": "triton", "cce_compile": "torch.compile",
            "liger_chunked": "torch"}.get(impl.name, "torch")


def main(argv: list[str]) -> None:
    cases = [Case(**c) for c in json.loads(argv[0])]
    for case in cases:
        row = run_case(case)
        print(ROW_PREFIX + json.dumps(row), flush=True)
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
