"""Saved suite results (``results.json``), the paper-layout table and the paired comparison.

``results.json`` keeps every question's k scores, so error bars and comparisons are computed
from it later; it is plain JSON (nothing loaded from a run directory executes code).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cepo.evalsuite import stats
from cepo.evalsuite.benchmarks import BENCHMARKS, BY_KEY, PAPER_NOTES, PAPER_RESULTS, paper_size

FORMAT = "cepo-evalsuite/1"
RESULTS = "results.json"
EVAL_DIRS = ("eval-paper", "eval-paper-native")  # lmms-eval, native


def make_results(*, backend: str, model: str, checkpoint: str | None, samples: int, seed: int,
                 settings: dict, scores: dict[str, dict[str, list[float]]],
                 extra: dict | None = None) -> dict:
    return {"format": FORMAT, "backend": backend, "model": model, "checkpoint": checkpoint,
            "samples": samples, "seed": seed, "settings": settings,
            "benchmarks": {key: {"task": BY_KEY[key].task, "scores": scores[key]}
                           for key in scores}, **(extra or {})}


def save(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def resolve(source: str | Path) -> Path:
    """A results file from itself, an eval directory, a checkpoint or a run directory."""
    path = Path(source)
    if path.is_file():
        return path
    if (path / RESULTS).is_file():
        return path / RESULTS
    dirs = [path]
    if not any((path / d / RESULTS).is_file() for d in EVAL_DIRS):
        from cepo.checkpoint import resolve_checkpoint_path

        try:
            dirs = [resolve_checkpoint_path(path)]
        except FileNotFoundError:
            pass
    found = [d / e / RESULTS for d in dirs for e in EVAL_DIRS if (d / e / RESULTS).is_file()]
    if len(found) > 1:
        raise ValueError(f"{source}: several suite results ({[str(f) for f in found]}); "
                         "pass the results.json to compare")
    if not found:
        raise FileNotFoundError(f"{source}: no {RESULTS} (run `python -m cepo.eval --suite paper` "
                                "first, or pass the file)")
    return found[0]


def load(source: str | Path) -> dict:
    path = resolve(source)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ValueError(f"{path}: not a suite results file (expected format {FORMAT!r})")
    benchmarks = results.get("benchmarks")
    if not isinstance(benchmarks, dict):
        raise TypeError(f"{path}: field 'benchmarks' must map benchmark names to results")
    for key, bench in benchmarks.items():
        if key not in BY_KEY:
            raise ValueError(f"{path}: unknown benchmark {key!r}")
        if not isinstance(bench, dict) or not isinstance(bench.get("scores"), dict):
            raise TypeError(f"{path}: {key}: field 'scores' must map question ids to lists")
        for qid, s in bench["scores"].items():
            if not isinstance(s, list):
                raise TypeError(f"{path}: {key} question {qid!r}: scores must be a list")
            if not s or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in s):
                raise ValueError(f"{path}: {key} question {qid!r}: scores must be in [0, 1]")
    results["path"] = str(path)
    return results


def summarize(results: dict) -> dict:
    """Per-benchmark and average estimates (accuracy in %) of a results dict."""
    per = {key: stats.benchmark_ci(b["scores"]) for key, b in results["benchmarks"].items()}
    summary = {key: _percent(e) for key, e in per.items()}
    if per:
        summary["average"] = _percent(stats.average_ci(list(per.values())))
    return summary


def _percent(e: stats.Estimate) -> dict:
    return {"mean": 100 * e.mean, "half_width": 100 * e.half_width, "n": e.n}


def _cell(entry: dict | None, signed: bool = False) -> str:
    if entry is None:
        return "–"
    mean = f"{entry['mean']:+.2f}" if signed else f"{entry['mean']:.2f}"
    hw = entry["half_width"]
    return mean if math.isnan(hw) else f"{mean} ± {hw:.2f}"


def table(results: dict, summary: dict) -> str:
    """Markdown table in the paper's layout, with the paper's rows for the same model size."""
    header = ["", *(b.title for b in BENCHMARKS), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    k = results["samples"]
    label = f"this run ({results['backend']}, k={k})"
    lines.append("| " + " | ".join([label, *(_cell(summary.get(b.key)) for b in BENCHMARKS),
                                    _cell(summary.get("average"))]) + " |")
    size = paper_size(results["model"])
    notes = [(f"Accuracy %, mean ± 95% CI half-width (t-interval over per-question means, "
              f"k={k} sample(s) per question; cepo.evalsuite.stats).")]
    missing = [b.title for b in BENCHMARKS if b.key not in summary]
    if missing:
        notes.append(f"Not run: {', '.join(missing)}; this run's Avg covers the benchmarks run.")
    if size is None:
        notes.append(f"No paper numbers for {results['model']!r} (the paper reports "
                     "Qwen3-VL-2B and -4B).")
    else:
        for method, row in PAPER_RESULTS[size].items():
            cells = ["–" if v is None else f"{v:.2f}" for v in row]
            lines.append("| " + " | ".join([f"paper {size} {method}", *cells]) + " |")
        notes.append(f"Paper rows: Table 2 (Qwen3-VL-{size}, one sample, lmms-eval). "
                     + PAPER_NOTES[size])
        if results["backend"] == "native":
            notes.append("This run was scored natively (project prompt and grader), not by "
                         "lmms-eval: README, 'Paper evaluation', lists the differences.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def compare(a: dict, b: dict) -> dict:
    """Paired difference A - B per benchmark and for the average, in accuracy points."""
    for field in ("backend", "samples", "seed", "settings"):
        if a.get(field) != b.get(field):
            raise ValueError(f"the runs differ in {field}: {a.get(field)!r} ({a['path']}) vs "
                             f"{b.get(field)!r} ({b['path']}); a paired difference needs the "
                             "same evaluation (questions, samples, seeds, settings)")
    common = [x.key for x in BENCHMARKS if x.key in a["benchmarks"] and x.key in b["benchmarks"]]
    if not common:
        raise ValueError(f"{a['path']} and {b['path']} share no benchmark")
    per = {key: stats.paired_ci(a["benchmarks"][key]["scores"], b["benchmarks"][key]["scores"],
                                what=key) for key in common}
    out = {key: _percent(e) for key, e in per.items()}
    out["average"] = _percent(stats.average_ci(list(per.values())))
    return out


def compare_table(a: dict, b: dict, diff: dict) -> str:
    header = ["A − B", *(x.title for x in BENCHMARKS), "Avg"]
    row = [*(_cell(diff.get(x.key), signed=True) for x in BENCHMARKS),
           _cell(diff["average"], signed=True)]
    avg = diff["average"]
    verdict = ("the 95% CI of the average excludes 0" if not math.isnan(avg["half_width"])
               and abs(avg["mean"]) > avg["half_width"] else "the 95% CI of the average "
               "includes 0: no significant difference")
    return ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " +
            " | ".join(["points", *row]) + " |\n\n"
            f"- A: {a['path']}\n- B: {b['path']}\n- Paired over the same questions "
            f"(k={a['samples']}, seed {a['seed']}); {verdict}.\n")
