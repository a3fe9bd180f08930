"""The outputs of bench.algos: runs.csv, credit.csv, summary.csv, algos.md, algos.png, meta.json.

Every number in summary.csv and algos.md is computed (bench.algos.summarize) from the rows of
runs.csv and credit.csv, which name the run directory each came from.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

CURVE_COLUMNS = ["algo", "seed", "step", "val_accuracy", "run_dir"]
CREDIT_COLUMNS = ["algo", "seed", "run_dir", "wall_s", "cpu_s", "decisive_credit_share",
                  "decisive_token_share", "wrong_dir_all", "wrong_dir_decisive", "tokens",
                  "tokens_decisive", "credit", "credit_decisive"]
SUMMARY_COLUMNS = ["algo", "metric", "step", "mean", "ci95", "n"]
COLORS = {"grpo": "#7f7f7f", "rlsd": "#1f77b4", "cepo": "#d62728"}


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row[k]) for k in columns})


def _cell(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)  # exact: --report-only re-reads it
    return v


def _pm(m: float, h: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def _get(summary: list[dict], algo: str, metric: str, step="") -> tuple[float, float, int]:
    for r in summary:
        if r["algo"] == algo and r["metric"] == metric and r["step"] == step:
            return r["mean"], r["ci95"], r["n"]
    return math.nan, math.nan, 0


def verdict(summary: list[dict], algos: list[str], metric: str) -> str:
    """CEPO minus each other algorithm on `metric`, paired by seed, and whether its 95% CI
    excludes 0 (a plain reading of the interval, not a corrected test)."""
    if "cepo" not in algos or len(algos) < 2:
        return ""
    parts = []
    for other in (a for a in algos if a != "cepo"):
        m, h, n = _get(summary, f"cepo-{other}", metric)
        name = f"CEPO − {other.upper()}"
        if math.isnan(h):
            parts.append(f"{name}: {_pm(m, h)} (too few seeds for an interval)")
            continue
        word = ("CEPO higher" if m > 0 else "CEPO lower") if abs(m) > h else \
            "not separated (the interval holds 0)"
        parts.append(f"{name}: {m:+.3f} ± {h:.3f} ({n} seeds), {word}")
    label = {"auc": "Area under the curve", "final_accuracy": "Final accuracy"}[metric]
    return f"{label}, paired by seed: " + "; ".join(parts) + "."


def markdown(curve_rows, credit_rows, summary, meta) -> str:
    algos = meta["algos"]
    steps = sorted({r["step"] for r in curve_rows})
    seeds = f"{meta['seeds']} seed" + ("s" if meta["seeds"] > 1 else "")
    lines = [f"# {' vs '.join(a.upper() for a in algos)}, {seeds} each ({meta['machine']})", "",
             (f"`{meta['command']}` · {meta['steps']} steps per run, validation every "
              f"{meta['val_every']} steps and at step 0 · {meta['jobs']} runs at a time · "
              f"{meta['wall_s']:.0f} s in all · {meta['date']} · load before: "
              f"{meta['load_before']}"), "",
             ("Mean ± 95% CI over seeds (Student t, n − 1 degrees of freedom), computed from "
              "`runs.csv` (one row per run and validated step, naming its run directory) and "
              "`credit.csv` (one row per run); run directories are relative to this folder."), "",
             "## Validation accuracy", "", "| step | " + " | ".join(algos) + " |",
             "|---:|" + "---:|" * len(algos)]
    for step in steps:
        cells = [_pm(*_get(summary, a, "val_accuracy", step)[:2]) for a in algos]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for metric, label in (("auc", "area under the curve (mean accuracy over training)"),
                          ("final_accuracy", "final accuracy")):
        cells = [_pm(*_get(summary, a, metric)[:2]) for a in algos]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", verdict(summary, algos, "auc"), "", verdict(summary, algos, "final_accuracy"),
              "", "![validation accuracy and credit share](algos.png)", "",
              "## Where the credit goes", "",
              ("Decisive tokens: the response tokens of the answer inside its last `\\boxed{...}` "
              "(`cepo.credit.decisive_mask`). Credit share: Σ|Â_t − A| over the decisive tokens "
              "/ Σ|Â_t − A| over all tokens of the rollouts the run logged to samples.jsonl, per "
              "run, then mean ± CI over runs. Token share: the decisive tokens' share of those "
              "tokens (the credit share if credit were spread evenly). Wrong direction: the "
              "share of teacher-scored tokens with sign(A)·Δ_t < 0."), "",
              "| | " + " | ".join(algos) + " |", "|---|" + "---:|" * len(algos)]
    for metric, label in (("decisive_credit_share", "credit share on decisive tokens"),
                          ("decisive_token_share", "decisive tokens' share of tokens"),
                          ("wrong_dir_all", "wrong-direction Δ, all tokens"),
                          ("wrong_dir_decisive", "wrong-direction Δ, decisive tokens"),
                          ("wall_s", "seconds per run"), ("cpu_s", "CPU seconds per run")):
        digits = 1 if metric in ("wall_s", "cpu_s") else 3
        cells = [_pm(*_get(summary, a, metric)[:2], digits=digits) for a in algos]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "— : not defined (GRPO: Â = A on every token, no teachers).", "",
              "## Runs", "", "| algo | seed | run directory | seconds | CPU seconds |",
              "|---|---:|---|---:|---:|"]
    lines += [f"| {r['algo']} | {r['seed']} | `{r['run_dir']}` | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} |"
              for r in credit_rows]
    if meta["train_args"]:
        lines += ["", "Extra `cepo.train` flags: `" + " ".join(meta["train_args"]) + "`"]
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: list[dict], algos: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for algo in algos:
        rows = sorted((r for r in summary if r["algo"] == algo and r["metric"] == "val_accuracy"),
                      key=lambda r: r["step"])
        x = [r["step"] for r in rows]
        m = [r["mean"] for r in rows]
        h = [0.0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows]
        c = COLORS.get(algo)
        ax.plot(x, m, marker="o", color=c, label=algo.upper())
        ax.fill_between(x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)],
                        color=c, alpha=0.18, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_title("validation accuracy, mean ± 95% CI over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    for i, algo in enumerate(algos):
        m, h, _ = _get(summary, algo, "decisive_credit_share")
        t, _, _ = _get(summary, algo, "decisive_token_share")
        if not math.isnan(m):
            bx.bar(i, m, yerr=None if math.isnan(h) else h, color=COLORS.get(algo), capsize=4)
        else:
            bx.text(i, 0.01, "Â = A", ha="center", va="bottom", fontsize=9, color="#555555")
        if not math.isnan(t):
            bx.plot([i - 0.4, i + 0.4], [t, t], color="black", lw=1, ls="--")
    bx.set_xticks(range(len(algos)), [a.upper() for a in algos])
    bx.set_ylim(0, 1)
    bx.set_title("credit Σ|Â−A| on decisive tokens\n(dashed: their share of tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def read_outputs(out: Path) -> tuple[list[dict], list[dict], dict]:
    """runs.csv, credit.csv and meta.json of a finished study, typed as bench.algos wrote them."""
    for name in ("runs.csv", "credit.csv", "meta.json"):
        if not (out / name).is_file():
            raise SystemExit(f"{out / name}: missing (run python -m bench.algos first)")
    with open(out / "runs.csv", newline="") as f:
        curve = [{**r, "seed": int(r["seed"]), "step": int(r["step"]),
                  "val_accuracy": float(r["val_accuracy"])} for r in csv.DictReader(f)]
    with open(out / "credit.csv", newline="") as f:
        credit = [{**{k: float(v) for k, v in r.items() if k not in ("algo", "run_dir")},
                   "algo": r["algo"], "run_dir": r["run_dir"], "seed": int(r["seed"])}
                  for r in csv.DictReader(f)]
    return curve, credit, json.loads((out / "meta.json").read_text())


def write_outputs(out: Path, curve_rows, credit_rows, summary, meta) -> None:
    write_csv(out / "runs.csv", curve_rows, CURVE_COLUMNS)
    write_csv(out / "credit.csv", credit_rows, CREDIT_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    (out / "algos.md").write_text(markdown(curve_rows, credit_rows, summary, meta))
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot(out / "algos.png", summary, meta["algos"])
