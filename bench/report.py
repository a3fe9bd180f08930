"""Benchmark outputs: results.csv, results.md (tables + goals), PNG plots and meta.json.

``python -m bench.report DIR [--prefix P]`` regenerates results.md from DIR's CSV and meta.json
and prints it; ``--prefix bench/results/<machine>/`` makes the image links work from the repo
root (for embedding in README.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from bench.goals import GOAL_N, _ok, _times, goals, spread

COLUMNS = [
    "workload", "impl", "n", "d", "v", "dtype", "device", "status", "reason", "backend",
    "mem_mib", "mem_vs_naive", "mem_vs_floor", "time_median_s", "time_p20_s", "time_p80_s",
    "time_min_s", "time_max_s", "repeats", "time_vs_naive", "time_vs_floor", "cpu_median_s",
    "cpu_vs_naive", "flops", "tflops",
    "err_vs_naive", "mem_method", "min_repeats", "max_repeats", "budget_s", "probe_n", "seed",
    "extra", "wall_s", "load_before", "load_after",
]
NUMERIC = {"n", "d", "v", "mem_mib", "mem_vs_naive", "mem_vs_floor", "time_median_s",
           "time_p20_s", "time_p80_s", "time_min_s", "time_max_s", "repeats", "time_vs_naive",
           "time_vs_floor", "cpu_median_s", "cpu_vs_naive", "flops", "tflops", "err_vs_naive",
           "min_repeats", "max_repeats", "budget_s", "probe_n", "seed", "wall_s",
           "load_before", "load_after"}
PACKAGES = ["torch", "triton", "liger-kernel", "trl", "cut-cross-entropy", "transformers",
            "numpy", "matplotlib"]
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Machine and versions


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    """``cpu-<model>-<cores>c`` or ``cuda-<gpu name>``: the results subfolder."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "cuda-unavailable"
        return "cuda-" + _slug(torch.cuda.get_device_name(0).replace("NVIDIA", ""))
    return f"cpu-{_slug(_cpu_model())}-{os.cpu_count()}c"


def loadavg() -> str:
    """1, 5 and 15-minute load averages (runnable processes; above the core count the
    machine is oversubscribed and wall-clock times stretch)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _rel(path: Path) -> str:
    """A path relative to the repository when it is inside it (meta.json gets committed)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def collect_meta(args, machine: str, argv: list[str]) -> dict:
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = None
    if args.device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
               "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    dirty = _git("status", "--porcelain", "cepo_kernels")
    return {
        "machine": machine,
        "command": "python " + " ".join(argv if argv[:2] == ["-m", "bench"] else
                                        ["-m", "bench", *argv[1:]]),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": mem_gib,
        "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions,
        "cepo_kernels_git": _git("rev-parse", "--short", "HEAD") + (" +dirty" if dirty else ""),
        "config": {k: (_rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_before": loadavg(),
    }


# --------------------------------------------------------------------------------------------
# Rows: ratios, CSV


def _key(r: dict) -> tuple:
    return (r["workload"], r["n"], r["d"], r["dtype"], r["device"])


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per run: memory and time of every row over the naive and the floor row of its case."""
    ref = {(name, _key(r)): r for r in rows if r.get("status") == "ok"
           for name in ("naive", "floor") if r["impl"] == name}
    for r in rows:
        for name in ("naive", "floor"):
            base = ref.get((name, _key(r)))
            for metric, col in (("mem_mib", "mem_vs_"), ("time_median_s", "time_vs_"),
                                ("cpu_median_s", "cpu_vs_")):
                ok = (base is not None and r.get("status") == "ok" and base.get(metric)
                      and r.get(metric) is not None)
                r[col + name] = r[metric] / base[metric] if ok else None
    return rows


def write_csv(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in add_ratios(rows):
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return path


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in NUMERIC & r.keys():
                r[k] = None if r[k] == "" else float(r[k])
                if k in ("n", "d", "v", "repeats") and r[k] is not None:
                    r[k] = int(r[k])
            rows.append(r)
    return rows


# --------------------------------------------------------------------------------------------
# Markdown


def _f(x, fmt: str, none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _load_range(rows: list[dict], meta: dict) -> str:
    """The range of the per-shape 1-minute load averages, against the core count."""
    loads = [x for r in rows for x in (r.get("load_before"), r.get("load_after"))
             if x is not None]
    if not loads:
        return ""
    return (f", per shape {min(loads):.2f}–{max(loads):.2f} (above {meta['cores']} the "
            "cores are oversubscribed and wall-clock times stretch)")


def _load_note(rows: list[dict], workload: str, n: int, d: int) -> list[str]:
    """The 1-minute load average before and after this shape's interleaved measurements."""
    got = [r for r in _ok(rows, workload=workload, n=n, d=d) if r.get("load_before") is not None]
    if not got:
        return []
    return ["", f"1-minute load average over these measurements: {got[0]['load_before']:.2f} "
            f"before, {got[0]['load_after']:.2f} after."]


def _headline_table(rows: list[dict], workload: str, n: int, d: int) -> list[str]:
    cpu = rows[0]["device"] != "cuda"
    flop_unit, scale = ("GFLOP/s", 1e3) if cpu else ("TFLOP/s", 1.0)
    cols = ["implementation", "backend", "incr. peak MiB", "naive ÷ impl (memory)",
            "time s, median [min–max] (n)", "impl ÷ naive (time)"]
    cols += ["impl ÷ naive (CPU time)"] if cpu else []
    cols += ["impl ÷ floor (time)", flop_unit]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        if (r["workload"], r["n"], r["d"]) != (workload, n, d):
            continue
        if r["status"] != "ok":
            if r["status"] != "unavailable":
                cells = [r["impl"], "", f"{r['status']}: {r.get('reason', '')[:80]}"]
                lines.append("| " + " | ".join(cells + [""] * (len(cols) - 3)) + " |")
            continue
        saving = 1 / r["mem_vs_naive"] if r.get("mem_vs_naive") else None
        cells = [r["impl"], r["backend"], _f(r["mem_mib"], ",.1f"), _times(saving),
                 spread(r).replace(" s [", " [").replace("(n=", "("),
                 _times(r.get("time_vs_naive"))]
        cells += [_times(r.get("cpu_vs_naive"))] if cpu else []
        cells += [_times(r.get("time_vs_floor")), _f(r["tflops"] * scale, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], meta: dict, img_prefix: str = "") -> str:
    rows = add_ratios(rows)
    device = meta["config"]["device"]
    v = meta.get("versions", {})
    lines = [f"## Benchmark: {meta['machine']}", "",
             f"`{meta['command']}` — {meta['date_utc']}, {meta['elapsed_s']:.0f} s; "
             f"{meta['cpu']} ({meta['cores']} cores, {meta['ram_gib']} GiB, "
             f"{meta['torch_threads']} torch threads)"
             + (f", GPU {meta['gpu']['name']}" if meta.get("gpu") else "")
             + f"; load average (1, 5, 15 min) before/after {meta['loadavg_before']} / "
             f"{meta.get('loadavg_after', '?')}" + _load_range(rows, meta) + ".", "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
             + f", cepo_kernels @ {meta['cepo_kernels_git']}.", "",
             f"V = {rows[0]['v']:,}, dtype {meta['config']['dtype']}. "
             + ("Memory: incremental peak RSS (VmHWM) over a baseline taken after the inputs "
                "exist, " + ("one fresh process per implementation and shape. "
                             if meta["config"].get("isolate") in (None, "case")
                             else "one process per implementation. ")
                if device == "cpu" else
                "Memory: incremental peak of the CUDA caching allocator (inputs excluded). ")
             + ("Time: median and min–max of the timed repeats (n) after a warm-up on the first "
                "64 tokens; in CPU quick mode the memory call is the first timed repeat (one "
                "call at N = 4096 takes 10-30 s here); " if device == "cpu"
                and meta["config"].get("mode") == "quick" else
                "Time: median and min–max of the timed repeats (n) after a warm-up call; ")
             + "the implementations of a shape are timed round-robin (one call of each in "
             "turn, each in its own process), so a change in the machine's load hits all "
             "alike; "
             + "ratios are computed within this run. FLOP/s count 2·S·N·D·V forward "
             "(S = 3 for scoring) and 2·N·D·V per gradient.", ""]
    if device == "cpu" and any(r["d"] < 2048 for r in rows):
        lines += [f"D = {', '.join(str(x) for x in sorted({r['d'] for r in rows}))} on CPU "
                  "to keep the run short (the models have D = 2048, 2560): the "
                  "logits' size (what dominates memory) does not depend on D, but the time "
                  "ratios do (a larger D makes the matmul a larger share of every "
                  "implementation's time).", ""]
    lines += ["### Goals", "", "| goal | measured | status |", "|---|---|---|"]
    lines += [f"| {g} | {m} | **{s}** |" for g, m, s in goals(rows, device)]
    for workload in ("scoring", "update", "update_w"):
        wrows = _ok(rows, workload=workload)
        if not wrows:
            continue
        for d in sorted({r["d"] for r in wrows}):
            ns = sorted({r["n"] for r in wrows if r["d"] == d})
            n = GOAL_N[device] if GOAL_N[device] in ns else ns[-1]
            title = {"scoring": "Experience scoring: 3 streams + Δ, Â, no grad",
                     "update": "Policy update: forward + backward, d/d hidden",
                     "update_w": "Policy update: forward + backward, d/d hidden and d/d weight"}
            lines += ["", f"### {title[workload]} — N = {n:,}, D = {d}", ""]
            lines += _headline_table(rows, workload, n, d) + _load_note(rows, workload, n, d)
            others = [m for m in ns if m != n]
            if others:
                lines += ["", f"<details><summary>N = {', '.join(map(str, others))}</summary>",
                          ""]
                for m in others:
                    lines += ([f"N = {m:,}:", ""] + _headline_table(rows, workload, m, d)
                              + _load_note(rows, workload, m, d) + [""])
                lines += ["</details>"]
    ours = [r for r in _ok(rows, impl="ours") if r["device"] == "cuda"]
    if ours:
        from bench.roofline import compare

        lines += ["", "### Analytic model", "",
                  compare(ours, (meta.get("gpu") or {}).get("name")).rstrip()]
    errs = [r for r in rows if r.get("err_vs_naive") is not None]
    if errs:
        worst = max(errs, key=lambda r: r["err_vs_naive"])
        lines += ["", f"Agreement with naive on the first {int(worst['probe_n'])} tokens of "
                  f"every case (log-probs, d/d hidden, d/d weight): max |diff| = "
                  f"{worst['err_vs_naive']:.2e} ({worst['impl']}, {worst['workload']})."]
    from bench.baselines import IMPLS

    names = [name for name in IMPLS if any(r["impl"] == name for r in rows)]
    lines += ["", "### Implementations", "", "| name | what runs |", "|---|---|"]
    lines += [f"| {name} | {IMPLS[name].summary} |" for name in names]
    missing = {}
    for r in rows:
        if r["status"] == "unavailable":
            missing.setdefault(r["impl"], r["reason"])
    if missing:
        lines += ["", "### Not run on this machine", "", "| implementation | reason |",
                  "|---|---|"] + [f"| {k} | {why} |" for k, why in missing.items()]
    failed = [r for r in rows if r["status"] in ("error", "skipped")]
    if failed:
        lines += ["", "### Failed or skipped cases", ""] + [
            f"- {r['workload']} {r['impl']} N={r['n']} D={r['d']}: {r['status']}: {r['reason']}"
            for r in failed]
    if (REPO / meta["config"]["out"] / "memory_vs_n.png").exists() or img_prefix:
        lines += ["", f"![incremental peak memory vs N]({img_prefix}memory_vs_n.png)",
                  f"![time vs N]({img_prefix}time_vs_n.png)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots


def plot(rows: list[dict], out: Path) -> list[Path]:
    """memory_vs_n.png and time_vs_n.png: one panel per workload, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    workloads = [w for w in ("scoring", "update", "update_w")
                 if any(r["workload"] == w for r in ok)]
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    ds = sorted({r["d"] for r in ok})
    styles = ["-", "--", ":"]
    markers = ["o", "s", "^", "v", "D", "P", "X", "*"]
    paths = []
    for metric, ylabel, fname in (("mem_mib", "incremental peak memory (MiB)", "memory_vs_n.png"),
                                  ("time_median_s", "time per call (s, median, min–max)",
                                   "time_vs_n.png")):
        fig, axes = plt.subplots(1, len(workloads), figsize=(5.2 * len(workloads), 4.2),
                                 squeeze=False)
        for ax, w in zip(axes[0], workloads):
            for i, impl in enumerate(impls):
                for j, d in enumerate(ds):
                    pts = sorted((r["n"], r) for r in ok
                                 if (r["workload"], r["impl"], r["d"]) == (w, impl, d))
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ys = [max(p[1][metric], 1e-3) for p in pts]
                    label = impl + (f" D={d}" if len(ds) > 1 else "")
                    kw = dict(color=f"C{i}", linestyle=styles[j % 3], label=label,
                              marker=markers[i % len(markers)], markersize=7 - (i % 3),
                              linewidth=2.6 if impl == "ours" else 1.3, alpha=0.85)
                    if metric == "time_median_s":
                        err = [[max(y - p[1]["time_min_s"], 0) for y, p in zip(ys, pts)],
                               [max(p[1]["time_max_s"] - y, 0) for y, p in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, capsize=2, **kw)
                    else:
                        ax.plot(xs, ys, **kw)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(w)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        r0 = ok[0] if ok else {"v": 0, "device": "?", "dtype": "?"}
        fig.suptitle(f"V = {r0['v']:,}, D = {', '.join(map(str, ds))}, {r0['device']}, "
                     f"{r0['dtype']}", fontsize=10)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(rows: list[dict], meta: dict, out: Path, plots: bool = True) -> None:
    write_csv(rows, out)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if plots and any(r.get("status") == "ok" for r in rows):
        try:
            plot(rows, out)
        except ImportError as exc:
            print(f"bench: no plots ({exc})", file=sys.stderr)
    (out / "results.md").write_text(markdown(rows, meta))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("dir", type=Path, help="a results folder (results.csv + meta.json)")
    p.add_argument("--prefix", default="", help="prefix for image links, e.g. bench/results/X/")
    p.add_argument("--plots", action="store_true", help="also redraw the PNGs")
    p.add_argument("--readme", type=Path, default=None,
                   help="write into this README between the bench markers instead of stdout")
    args = p.parse_args(argv)
    rows = read_csv(args.dir / "results.csv")
    meta = json.loads((args.dir / "meta.json").read_text())
    if args.plots:
        plot(rows, args.dir)
    text = markdown(rows, meta, img_prefix=args.prefix)
    if args.readme is None:
        sys.stdout.write(text)
    else:
        write_readme_section(args.readme, text)
    return 0


README_BEGIN = "<!-- bench:begin (python -m bench.report ... --readme) -->"
README_END = "<!-- bench:end -->"


def save_run(out: Path, stem: str, result: dict, table: str, prog: str) -> None:
    """A bench run's raw result (``<stem>.json``, what README blocks render) and table, saved."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"{prog}: done in {result['wall_s']:.0f} s → {out}")


def write_readme_section(readme: Path, text: str, begin: str = README_BEGIN,
                         end: str = README_END, demote: bool = True) -> None:
    """Replace the README's generated section (between the markers) with ``text``, its headings
    pushed one level down if ``demote``, so the README table always comes from the results."""
    doc = readme.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{readme} has no {begin!r} ... {end!r} markers")
    body = "\n".join("#" + line if demote and line.startswith("#") else line
                     for line in text.splitlines())
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def read_readme_section(readme: Path, begin: str = README_BEGIN, end: str = README_END) -> str:
    """The text between the markers, as `write_readme_section` wrote it (``demote=False``)."""
    return readme.read_text().split(begin, 1)[1].split(end, 1)[0].removeprefix("\n")


if __name__ == "__main__":
    sys.exit(main())
