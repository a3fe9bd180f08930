"""``python -m bench.algos``: GRPO, RLSD and CEPO trained side by side with several seeds at equal
budgets (the offline tiny default of ``python -m cepo.train``: same steps, prompts, group size,
lr), reported as mean ± 95% CI over seeds.

    python -m bench.algos                      # 5 seeds x 30 steps per algorithm, 2 runs at a time
    python -m bench.algos --quick              # 2 seeds x 2 steps, tiny sizes: a smoke run
    python -m bench.algos --seeds 8 --steps 20 --rollout.max_new_tokens 32   # + any cepo.train flag
    python -m bench.algos --report-only        # redo the summary, table and plot from the CSVs

Reported, per algorithm: validation accuracy at each validated step (mean ± 95% CI, Student t
with n − 1 degrees of freedom, n = seeds), the area under that curve (the trapezoid over the
validated steps divided by their span: the mean accuracy over training, computed per run), the
final accuracy, and where the token credit went: the share of Σ_t |Â_t − A| that falls on the
*decisive* tokens, those of the answer inside the response's last ``\\boxed{...}``
(`cepo.credit.decisive_mask`), over the rollouts each run logged to samples.jsonl (the best and
worst of the first mixed groups of every step). GRPO gives every token Â = A, so it has no
share. With it: the decisive tokens' share of those rollouts' tokens (what credit spread evenly
would give) and the share of teacher-scored tokens whose Δ points the wrong way (sign(A)·Δ < 0),
on all tokens and on the decisive ones.

Every run is ``cepo.train.main`` in one of ``--jobs`` worker processes (one thread each; a
worker runs its share one after another), its run directory and log in ``--work``. Writes
``runs.csv`` (one row per run and validated step: the numbers every statistic is computed from,
with the run directory they came from), ``credit.csv`` (one row per run), ``summary.csv``,
``algos.md``, ``algos.png`` and ``meta.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import report
from cepo.credit import decisive_mask, load_samples

ALGOS = ("grpo", "rlsd", "cepo")
DEFAULT_OUT = report.REPO / "bench/results" / report.machine_name("cpu") / "algos"
QUICK = ["--prompts_per_step", "2", "--rollout.group_size", "4", "--data.val_limit", "8",
         "--data.train_limit", "16"]
# two-sided 95% critical values of Student's t, degrees of freedom 1..30
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


# --------------------------------------------------------------------------- statistics


def t_critical(df: int) -> float:
    """t_{0.975, df}; past the table, the Cornish-Fisher expansion around z (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n) of the finite values; the half-width is NaN for n < 2."""
    xs = [float(v) for v in values if math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_critical(n - 1) * sd / math.sqrt(n), n


def area(steps: list[int], acc: list[float]) -> float:
    """Trapezoid area under accuracy(step) divided by the span: the mean accuracy over training."""
    if len(steps) < 2:
        return acc[0] if acc else math.nan
    total = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2
                for i in range(len(steps) - 1))
    return total / (steps[-1] - steps[0])


# --------------------------------------------------------------------------- one run


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m bench.algos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per algorithm (0, 1, ...)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--val-every", type=int, default=5, help="validate every N steps (and at "
                   "step 0 and the last)")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time")
    p.add_argument("--samples", type=int, default=8, help="rollouts per step logged to "
                   "samples.jsonl (the credit statistics' input)")
    p.add_argument("--quick", action="store_true", help="2 seeds x 2 steps, tiny sizes")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: recompute summary.csv, algos.md and algos.png from "
                        "--out's runs.csv, credit.csv and meta.json")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the run directories (default: runs/bench/algos-<time>)")
    args, train_args = p.parse_known_args(argv)
    if args.quick:
        args.seeds, args.steps, args.val_every = 2, 2, 1
        train_args = QUICK + train_args
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in args.algos if a not in ALGOS]
    if bad or not args.algos:
        p.error(f"--algos: unknown {bad or 'empty list'}; choose from {', '.join(ALGOS)}")
    if args.seeds < 1 or args.steps < 1 or args.val_every < 1 or args.jobs < 1:
        p.error("--seeds, --steps, --val-every and --jobs must be >= 1")
    if args.work is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.work = report.REPO / "runs" / "bench" / f"algos-{stamp}"
    return args, train_args


def run_argv(algo: str, seed: int, run_dir: Path, args, train_args: list[str]) -> list[str]:
    return ["--algo", algo, "--seed", str(seed), "--steps", str(args.steps),
            "--output_dir", str(run_dir), "--val.every", str(args.val_every),
            "--val.before_train", "true", "--checkpoint.every", "0", "--log.progress", "false",
            "--log.samples_per_step", str(args.samples), "--num_threads", "1", *train_args]


def train_run(algo: str, seed: int, run_dir: Path, argv: list[str]) -> dict:
    """One ``cepo.train`` run in this (worker) process, its output (file descriptors 1 and 2,
    so child processes' too) going to ``run_dir/../<name>.log``. A worker runs one at a time
    and pays the imports once for all its runs."""
    from cepo import train

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    clock, cpu = time.perf_counter(), _cpu_seconds()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failure = None
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            train.main(argv)
        except BaseException as err:  # noqa: BLE001 - SystemExit too: report, keep the worker
            failure = f"{type(err).__name__}: {err}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    if failure is not None:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{algo} seed {seed} failed ({failure}); log {log}:\n"
                           + "\n".join(tail))
    return {"algo": algo, "seed": seed, "run_dir": run_dir,
            "wall_s": time.perf_counter() - clock, "cpu_s": _cpu_seconds() - cpu}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the grader): what a run costs
    on an idle core, which a shared machine's load moves far less than wall-clock."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/accuracy) of every validation in the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (did the run finish?)")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if "val/accuracy" in rec:
                out.append((int(rec["step"]), float(rec["val/accuracy"])))
    if not out:
        raise ValueError(f"{path}: no val/accuracy record (was validation off?)")
    return out


def credit_stats(run_dir: Path) -> dict[str, float]:
    """Credit and Δ direction over the run's logged rollouts, all steps pooled."""
    s = dict.fromkeys(("credit", "credit_decisive", "tokens", "tokens_decisive", "scored",
                       "wrong", "scored_decisive", "wrong_decisive"), 0.0)
    for records in load_samples(run_dir).values():
        for rec in records:
            a = rec["advantage"]
            dec = decisive_mask([t[0] for t in rec["tokens"]])
            for (_text, delta, _w, adv), d in zip(rec["tokens"], dec):
                s["credit"] += abs(adv - a)
                s["credit_decisive"] += abs(adv - a) if d else 0.0
                s["tokens"] += 1
                s["tokens_decisive"] += d
                if rec.get("teachers") and a != 0:
                    wrong = float(delta * (1 if a > 0 else -1) < 0)
                    s["scored"] += 1
                    s["wrong"] += wrong
                    s["scored_decisive"] += d
                    s["wrong_decisive"] += wrong if d else 0.0

    def ratio(a: str, b: str) -> float:
        return s[a] / s[b] if s[b] > 0 else math.nan

    return {"decisive_credit_share": ratio("credit_decisive", "credit"),
            "decisive_token_share": ratio("tokens_decisive", "tokens"),
            "wrong_dir_all": ratio("wrong", "scored"),
            "wrong_dir_decisive": ratio("wrong_decisive", "scored_decisive"),
            "tokens": s["tokens"], "tokens_decisive": s["tokens_decisive"],
            "credit": s["credit"], "credit_decisive": s["credit_decisive"]}


# --------------------------------------------------------------------------- the study


def run_study(args, train_args: list[str]) -> list[dict]:
    """Every (seed, algo) run, interleaved so a shared machine's drift hits all alike."""
    jobs = [(algo, seed) for seed in range(args.seeds) for algo in args.algos]
    for algo, seed in jobs:
        if (args.work / f"{algo}-seed{seed}").exists():
            raise SystemExit(f"{args.work / f'{algo}-seed{seed}'} exists: pick a new --work")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(train_run, algo, seed, args.work / f"{algo}-seed{seed}",
                               run_argv(algo, seed, args.work / f"{algo}-seed{seed}", args,
                                        train_args)) for algo, seed in jobs]
        runs = []
        for fut in futures:
            run = fut.result()
            print(f"  {run['algo']} seed {run['seed']}: {run['wall_s']:.1f} s "
                  f"({run['cpu_s']:.1f} CPU s)", flush=True)
            runs.append(run)
    return runs


def collect(runs: list[dict], out: Path) -> tuple[list[dict], list[dict]]:
    """runs.csv and credit.csv rows, run directories named relative to `out` where possible."""
    curve_rows, credit_rows = [], []
    for run in runs:
        name = os.path.relpath(run["run_dir"], out)
        for step, acc in val_curve(run["run_dir"]):
            curve_rows.append({"algo": run["algo"], "seed": run["seed"], "step": step,
                               "val_accuracy": acc, "run_dir": name})
        credit_rows.append({"algo": run["algo"], "seed": run["seed"], "run_dir": name,
                            "wall_s": round(run["wall_s"], 2), "cpu_s": round(run["cpu_s"], 2),
                            **credit_stats(run["run_dir"])})
    return curve_rows, credit_rows


def summarize(curve_rows: list[dict], credit_rows: list[dict], algos: list[str]) -> list[dict]:
    """summary.csv rows: per algorithm and metric (val_accuracy per step, auc, final, credit),
    and CEPO minus each other algorithm on auc and final accuracy, paired by seed (a seed fixes
    the data for every algorithm), as algo ``cepo-<other>``."""
    out, by_seed = [], {}
    for algo in algos:
        rows = [r for r in curve_rows if r["algo"] == algo]
        seeds = sorted({r["seed"] for r in rows})
        curves = {s: sorted((r["step"], r["val_accuracy"]) for r in rows if r["seed"] == s)
                  for s in seeds}
        steps = sorted({r["step"] for r in rows})
        uneven = [s for s, c in curves.items() if [st for st, _ in c] != steps]
        if uneven:
            raise ValueError(f"{algo}: seeds {uneven} were not validated at steps {steps}")
        for step in steps:
            m, h, n = mean_ci([r["val_accuracy"] for r in rows if r["step"] == step])
            out.append({"algo": algo, "metric": "val_accuracy", "step": step,
                        "mean": m, "ci95": h, "n": n})
        per_run = {"auc": {s: area([st for st, _ in c], [a for _, a in c])
                           for s, c in curves.items()},
                   "final_accuracy": {s: c[-1][1] for s, c in curves.items()}}
        credit = [r for r in credit_rows if r["algo"] == algo]
        for key in ("decisive_credit_share", "decisive_token_share", "wrong_dir_all",
                    "wrong_dir_decisive", "wall_s", "cpu_s"):
            per_run[key] = {r["seed"]: r[key] for r in credit}
        by_seed[algo] = per_run
        for metric, values in per_run.items():
            m, h, n = mean_ci(list(values.values()))
            out.append({"algo": algo, "metric": metric, "step": "", "mean": m, "ci95": h, "n": n})
    for other in (a for a in algos if a != "cepo" and "cepo" in algos):
        for metric in ("auc", "final_accuracy"):
            cepo, base = by_seed["cepo"][metric], by_seed[other][metric]
            m, h, n = mean_ci([cepo[s] - base[s] for s in sorted(cepo) if s in base])
            out.append({"algo": f"cepo-{other}", "metric": metric, "step": "", "mean": m,
                        "ci95": h, "n": n})
    return out


def main(argv=None) -> dict:
    args, train_args = parse_args(argv)
    from bench.algos_report import read_outputs, write_outputs

    if args.report_only:
        curve_rows, credit_rows, meta = read_outputs(args.out)
        summary = summarize(curve_rows, credit_rows, meta["algos"])
        write_outputs(args.out, curve_rows, credit_rows, summary, meta)
        print(f"wrote {args.out}/algos.md from {args.out}/runs.csv and credit.csv")
        return {"out": args.out, "summary": summary, "meta": meta}

    print(f"bench.algos: {len(args.algos)} algorithms x {args.seeds} seeds x {args.steps} steps, "
          f"{args.jobs} at a time; runs in {args.work}", flush=True)
    started = time.perf_counter()
    runs = run_study(args, train_args)
    args.out.mkdir(parents=True, exist_ok=True)
    curve_rows, credit_rows = collect(runs, args.out)
    summary = summarize(curve_rows, credit_rows, args.algos)
    meta = {"machine": report.machine_name("cpu"), "cpu": report._cpu_model(),
            "cores": os.cpu_count(), "load_before": report.loadavg(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.algos", *(sys.argv[1:] if argv is None
                                                              else argv)]),
            "algos": args.algos, "seeds": args.seeds, "steps": args.steps,
            "val_every": args.val_every, "jobs": args.jobs, "train_args": train_args,
            "wall_s": round(time.perf_counter() - started, 1)}
    write_outputs(args.out, curve_rows, credit_rows, summary, meta)
    print(f"wrote {args.out}/algos.md ({meta['wall_s']:.0f} s)")
    return {"out": args.out, "summary": summary, "meta": meta}


if __name__ == "__main__":
    main()
