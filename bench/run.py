"""``python -m bench``: memory and time of our kernels against the alternatives, in one run.

Examples:
    python -m bench --quick                     # CPU, < 10 min on 2 cores
    python -m bench --full --device cuda        # what bench/gpu.sh runs
    python -m bench --only ours,naive --n 4096 --workload scoring   # tuning
    python -m bench --only ours,naive --ours-chunks 512,8192 --n 4096 --workload scoring

Preset runs (``--quick``/``--full`` without filters) write to ``bench/results/<machine>/``; any
run that narrows them (``--only``, ``--n``, ``--d``, ...) writes to ``runs/bench/<machine>/``
(git-ignored) unless ``--out`` says otherwise, so tuning never overwrites committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import baselines as B  # noqa: E402
from bench import report  # noqa: E402
from bench.measure import REPLY_PREFIX, Case, interleave  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
V_QWEN = 151_936

# Per device and mode: hidden sizes, token counts per workload, repeats (min, max), time budget
# per case (s). CPU quick uses D = 256: the logits' size does not depend on D, and D = 2048
# would make one naive scoring call at N = 4096 take ~1 min on 2 cores. Every preset times each
# case at least 3 times (the goals are judged on medians); CPU quick drops scoring N = 1024 to
# stay under 10 min on 2 idle cores with 3 repeats of every call.
PRESETS = {
    ("cpu", "quick"): dict(d=[256], n={"scoring": [512, 4096], "update": [512, 1024],
                                       "update_w": [512]},
                           repeats=(3, 5), budget=2.0, time_memory_call=True),
    ("cpu", "full"): dict(d=[2048], n={w: [512, 1024, 2048, 4096] for w in B.WORKLOADS},
                          repeats=(3, 10), budget=20.0),
    ("cuda", "quick"): dict(d=[2048], n={w: [4096, 16384] for w in B.WORKLOADS},
                            repeats=(5, 20), budget=0.5),
    # both model sizes for scoring; the update at D = 2048. ~130 cases: bench/gpu.sh, < 8 min
    ("cuda", "full"): dict(d=[2048, 2560], n={"scoring": [2048, 4096, 8192, 16384],
                                              "update": [2048, 4096, 8192, 16384],
                                              "update_w": [2048, 4096, 8192, 16384]},
                           d_update=[2048], repeats=(5, 20), budget=0.5),
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--only", type=_names, default=None,
                   help=f"comma list of implementations ({', '.join(B.IMPLS)})")
    p.add_argument("--workload", type=_names, default=None, help=", ".join(B.WORKLOADS))
    p.add_argument("--n", type=_ints, default=None, help="token counts, e.g. 1024,4096")
    p.add_argument("--d", type=_ints, default=None, help="hidden sizes, e.g. 2048,2560")
    p.add_argument("--v", type=int, default=V_QWEN, help="vocabulary (default Qwen 151,936)")
    p.add_argument("--repeats", type=_ints, default=None, help="MIN,MAX timed repeats per case")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--ours-chunks", type=_ints, default=None,
                   help="CHUNK_TOKENS,CHUNK_VOCAB for ours' torch backend (0 tokens = its "
                        "default for the vocabulary chunk)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="skip the remaining cases once this much time has passed")
    p.add_argument("--isolate", choices=("case", "impl"), default=None,
                   help="one worker process per implementation and shape (CPU default: peak RSS "
                        "is the case's own) or per implementation for the whole run (CUDA "
                        "default: allocator stats are exact); either way the implementations "
                        "of a shape are timed round-robin")
    p.add_argument("--case-timeout", type=float, default=1800,
                   help="seconds a worker may take per command (setup or one call)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--machine", default=None, help="name of the results subfolder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cases and implementation availability, run nothing")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    for name in args.only or []:
        B.get(name)  # raises with the known names
    for w in args.workload or []:
        if w not in B.WORKLOADS:
            p.error(f"unknown workload {w!r}; known: {', '.join(B.WORKLOADS)}")
    return args


def is_custom(args) -> bool:
    return any(x is not None for x in (args.only, args.workload, args.n, args.d, args.repeats,
                                       args.budget, args.ours_chunks)) or args.v != V_QWEN


def build_cases(args) -> list[Case]:
    """Cases in run order: workload, then N, then implementation (the implementations of a
    shape are timed round-robin, so drift in a noisy machine's speed hits all alike)."""
    preset = PRESETS[(args.device, args.mode)]
    rmin, rmax = args.repeats or preset["repeats"]
    budget = args.budget if args.budget is not None else preset["budget"]
    extra = {}
    if args.ours_chunks:
        if len(args.ours_chunks) != 2:
            raise SystemExit("--ours-chunks takes CHUNK_TOKENS,CHUNK_VOCAB")
        extra = dict(chunk_tokens=args.ours_chunks[0] or None, chunk_vocab=args.ours_chunks[1])
    impls = args.only or list(B.IMPLS)
    cases = []
    for workload in args.workload or B.WORKLOADS:
        ds = preset["d"] if workload == "scoring" else preset.get("d_update", preset["d"])
        for d in args.d or ds:
            for n in args.n or preset["n"][workload]:
                for impl in impls:
                    cases.append(Case(workload=workload, impl=impl, n=n, d=d, v=args.v,
                                      dtype=args.dtype, device=args.device, min_repeats=rmin,
                                      max_repeats=rmax, budget_s=budget,
                                      time_memory_call=preset.get("time_memory_call", False),
                                      extra=extra if impl == "ours" else {}))
    return cases


def availability(device: str, names) -> dict[str, tuple[bool, str]]:
    return {name: B.get(name).available(torch.device(device)) for name in names}


class Worker:
    """A ``python -m bench.measure --worker`` child: one command a line, one reply a line."""

    def __init__(self, env: dict, timeout: float):
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.measure", "--worker"],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(REPLY_PREFIX):
                self.lines.put(json.loads(line[len(REPLY_PREFIX):]))
        self.lines.put(None)  # the child exited

    def ask(self, op: str, **kw) -> dict:
        """Send one command; raise RuntimeError with the child's last words if it dies or
        does not answer within the timeout."""
        try:
            self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
            self.proc.stdin.flush()
            reply = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"timeout after {self.timeout:.0f} s") from None
        except OSError:
            reply = None
        if reply is None:
            self.close()
            self.stderr.seek(0)
            raise RuntimeError(f"child exited with {self.proc.returncode}: "
                               f"{self.stderr.read().strip()[-300:]}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _run_shape(cases: list[Case], workers: dict, new_worker) -> list[dict]:
    """All implementations of one shape: set up each (memory call) in its worker, then time
    them round-robin; the 1-minute load average before and after goes into every row."""
    load_before, rows, timers, samples = _load1(), {}, {}, {}

    def failed(c: Case, exc: Exception) -> dict:
        return dict(asdict(c), extra="", status="error", reason=str(exc))

    for c in cases:
        try:
            w = workers[c.impl] = workers.get(c.impl) or new_worker()
            got = w.ask("setup", case=asdict(c))
        except RuntimeError as exc:
            workers.pop(c.impl, None)
            rows[c.impl] = failed(c, exc)
            continue
        if got["ok"]:
            samples[c.impl] = got["samples"]

            def timer(w=w, impl=c.impl):
                try:
                    return w.ask("time")["s"]
                except RuntimeError as exc:
                    workers.pop(impl, None)
                    rows[impl] = failed(next(x for x in cases if x.impl == impl), exc)
                    return None
            timers[c.impl] = timer
    interleave(timers, {c.impl: c for c in cases}, samples)
    for c in cases:
        if c.impl not in rows:
            try:
                rows[c.impl] = workers[c.impl].ask("finish")["row"]
            except (RuntimeError, KeyError) as exc:
                workers.pop(c.impl, None)
                rows[c.impl] = failed(c, exc)
    load_after = _load1()
    out = [rows[c.impl] for c in cases]
    for r in out:
        r.update(load_before=load_before, load_after=load_after)
    return out


def _run_workers(cases: list[Case], args, t0: float, on_row) -> None:
    """Shape by shape (workload, D, N), in run order; one worker per implementation, fresh per
    shape (``--isolate case``) or kept for the whole run (``--isolate impl``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    per_impl = (args.isolate or ("impl" if args.device == "cuda" else "case")) == "impl"
    shapes = list(dict.fromkeys((c.workload, c.d, c.n) for c in cases))
    workers: dict[str, Worker] = {}
    try:
        for shape in shapes:
            group = [c for c in cases if (c.workload, c.d, c.n) == shape]
            if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
                for c in group:
                    on_row(dict(asdict(c), extra="", status="skipped",
                                reason=f"--max-minutes {args.max_minutes} reached"))
                continue
            for row in _run_shape(group, workers, lambda: Worker(env, args.case_timeout)):
                on_row(row)
            if not per_impl:
                for w in workers.values():
                    w.close()
                workers.clear()
    finally:
        for w in workers.values():
            w.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    machine = args.machine or report.machine_name(args.device)
    if args.out is None:
        base = REPO / ("runs/bench" if is_custom(args) else "bench/results")
        args.out = base / machine
    cases = build_cases(args)
    names = list(dict.fromkeys(c.impl for c in cases))
    avail = availability(args.device, names)
    print(f"bench: {len(cases)} cases, mode={args.mode}, device={args.device}, "
          f"dtype={args.dtype} → {args.out}")
    for name, (ok, why) in avail.items():
        print(f"  {name:14s} {'runs' if ok else 'NOT RUN: ' + why}")
    if args.device == "cpu" and any(c.d < 2048 for c in cases):
        print("  note: D < 2048 on CPU keeps the run short; the logits' size does not depend on D")
    if args.device == "cuda":   # the figures the measurements are judged against
        from bench import roofline

        shapes = list(dict.fromkeys((c.workload, c.n, c.d) for c in cases if c.impl == "ours"))
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        print(roofline.markdown(roofline.rows(shapes), gpu=roofline.gpu_for(gpu).name))
    if args.dry_run:
        for c in cases:
            if avail[c.impl][0]:
                print(f"  would run {c.workload:8s} {c.impl:14s} N={c.n:6d} D={c.d}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    runnable = [c for c in cases if avail[c.impl][0]]
    rows = [dict(asdict(c), extra="", status="unavailable", reason=avail[c.impl][1])
            for c in cases if not avail[c.impl][0]]
    meta = report.collect_meta(args, machine, sys.argv if argv is None else ["-m", "bench", *argv])
    t0 = time.time()

    def on_row(row):
        rows.append(row)
        status = row["status"]
        detail = (f"{row['mem_mib']:9.1f} MiB  {row['time_median_s']:8.3f} s  "
                  f"(n={row['repeats']}, err {row['err_vs_naive']})" if status == "ok"
                  else f"{status}: {row.get('reason', '')}")
        print(f"  [{time.time() - t0:6.0f}s] {row['workload']:8s} {row['impl']:14s} "
              f"N={row['n']:6d} D={row['d']:5d}  {detail}", flush=True)
        report.write_csv(rows, args.out)  # partial results survive a crash

    _run_workers(runnable, args, t0, on_row)
    meta["elapsed_s"] = time.time() - t0
    meta["loadavg_after"] = report.loadavg()
    report.write_all(rows, meta, args.out, plots=not args.no_plots)
    print(f"bench: done in {meta['elapsed_s']:.0f} s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
