"""``python -m bench.offline_run``: the offline default run whose figures the README quotes.

    python -m bench.offline_run                      # run, save results, print the README block
    python -m bench.offline_run --readme README.md   # ... and write it between the markers
    python -m bench.offline_run --render-only --readme README.md   # committed results -> README

The run is exactly ``python -m cepo.train`` with no arguments, on a fresh cache in a temporary
folder, so its wall time includes building the tiny and warmed-up models. It is deterministic
(same machine, same versions: same metrics). Saved to ``bench/results/<machine>/offline_run/``:
``summary.json`` (command, wall time, load average, machine, warm-up recipe, the trainer's own
summary), the run's ``config.yaml``, ``metrics.jsonl`` and ``samples.jsonl``. Every figure of
the README block is computed from those files by `render` (a pure function of them), and
tests/test_readme.py checks that the README holds what they render to.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import report

OUT = report.REPO / "bench/results" / report.machine_name("cpu") / "offline_run"
README_BEGIN = "<!-- offline-run:begin (python -m bench.offline_run --readme README.md) -->"
README_END = "<!-- offline-run:end -->"
FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl")
WINDOW = 3  # steps averaged at the start and at the end of the run


def warmup_recipe() -> dict:
    """The warm-up recipe the run used (a changed recipe makes the committed results stale)."""
    from cepo.offline import warmup

    return {"recipe": warmup._RECIPE_VERSION, **dataclasses.asdict(warmup.WarmupConfig())}


def run(out: Path) -> dict:
    """Run the offline default on a fresh cache; copy its files and a summary into `out`."""
    with tempfile.TemporaryDirectory(prefix="offline_run-") as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, CEPO_CACHE_DIR=str(Path(tmp) / "cache"))
        cmd = [sys.executable, "-m", "cepo.train", "--output_dir", str(run_dir)]
        load_before, clock = report.loadavg(), time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - clock
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run and its grader process
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES[1:]:
            shutil.copyfile(run_dir / name, out / name)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        del config["output_dir"]  # a temporary folder
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        trainer = json.loads((run_dir / "summary.json").read_text())
    summary = {
        "command": "python -m cepo.train",
        "cache": "fresh (tiny and warmed-up models built during the run)",
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # ~ wall time on an idle machine
        "loadavg_before": load_before,
        "loadavg_after": report.loadavg(),
        "machine": report.machine_name("cpu"),
        "cpu": report._cpu_model(),
        "cores": os.cpu_count(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": report._git("rev-parse", "--short", "HEAD"),
        "warmup": warmup_recipe(),
        "trainer_summary": {k: v for k, v in trainer.items()
                            if k not in ("checkpoint", "metrics")},  # temporary paths
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# Rendering: a pure function of the committed files


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _window(records: list[dict], key: str, end: bool) -> float:
    values = [r[key] for r in records if key in r]
    n = min(WINDOW, len(values) // 2) or 1  # short runs: the two windows never overlap
    part = values[-n:] if end else values[:n]
    return sum(part) / len(part)


def _boxed_span(tokens: list[list]) -> list[int]:
    """Indices of the tokens that overlap the response's last ``\\boxed{...}`` content."""
    text = "".join(t[0] for t in tokens)
    at = text.rfind("boxed{")
    if at < 0:
        return []
    begin = at + len("boxed{")
    end = text.find("}", begin)
    end = len(text) if end < 0 else end
    spans, pos = [], 0
    for i, tok in enumerate(tokens):
        if pos < end and pos + len(tok[0]) > begin and tok[0].strip():
            spans.append(i)
        pos += len(tok[0])
    return spans


def answer_wrong_dir(samples: list[dict]) -> dict[str, float | int]:
    """Share of answer tokens (inside the last ``\\boxed{}``) whose Δ points the wrong way:
    Δ < 0 on a rollout with A > 0, Δ > 0 on one with A < 0; over the teacher-scored samples."""
    counts = {"pos": [0, 0], "neg": [0, 0]}
    for s in samples:
        if not s["teachers"] or s["advantage"] == 0:
            continue
        side = "pos" if s["advantage"] > 0 else "neg"
        sign = 1 if side == "pos" else -1
        for i in _boxed_span(s["tokens"]):
            counts[side][0] += s["tokens"][i][1] * sign < 0
            counts[side][1] += 1
    return {**{f"answer_wrong_dir_{k}": (w / n if n else float("nan"))
               for k, (w, n) in counts.items()},
            **{f"answer_tokens_{k}": n for k, (_, n) in counts.items()}}


def _example_pair(samples: list[dict]) -> tuple[dict, dict] | None:
    """The first step's best and worst rollout of one group where both got teacher weights and
    the wrong one boxed an answer (early: λ decays to 0): the README's worked example."""
    for a, b in itertools.pairwise(samples):
        if (a["step"] == b["step"] and a["rollout"] // 8 == b["rollout"] // 8 and a["teachers"]
                and b["teachers"] and a["advantage"] > 0 > b["advantage"]
                and "boxed{" in b["response"]):
            return a, b
    return None


def _weights(sample: dict, threshold: float = 0.05) -> str:
    """The tokens whose weight differs from 1 by more than `threshold`, as ``tok`` (w)."""
    parts = [f"`{t[0].strip() or repr(t[0])}` {t[2]:.2f}" for t in sample["tokens"]
             if abs(t[2] - 1) > threshold]
    return ", ".join(parts) if parts else "none"


def render(results: Path) -> str:
    """The README block for the committed results in `results` (no training, no model)."""
    summary = json.loads((results / "summary.json").read_text())
    metrics = _records(results / "metrics.jsonl")
    samples = _records(results / "samples.jsonl")
    steps = max(r["step"] for r in metrics)
    rel = report._rel(results)
    val = [(r.get("step", 0), r["val/accuracy"]) for r in metrics
           if "val/accuracy" in r]
    warm = summary["warmup"]
    lines = [
        ("The synthetic task of the offline run is a sum of three digits, written in the problem "
        "and drawn in the image (`What is 3 + 5 + 2?`). The warm-up "
        f"({warm['steps']} steps of {warm['batch_size']}) teaches two ways to answer it: worked "
        "steps, `3+5=8, 8+2=10, so \\boxed{10}.`, which never slip "
        f"({warm['careful_fraction']:.0%} of its unhinted targets), and all terms at once, "
        f"`3+5+2=11, so \\boxed{{11}}.`, off by 1 or 2 in {warm['slip_fraction']:.0%} of "
        "those targets. So the model starts partly right, and right and wrong rollouts differ in "
        "a few tokens: the one where a rollout turns hasty and the answer. "
        f"{warm['hint_fraction']:.0%} of the targets follow a teacher hint: a true hint with "
        "worked steps, a wrong one with a slipped hasty sum, so the teachers told the right and "
        "the wrong answer disagree on those tokens. RL is rewarded for the worked steps."),
        "",
        (f"Measured here ({summary['cpu']}, {summary['cores']} cores shared with other jobs, "
        f"load average {summary['loadavg_before']} at the start): "
        f"`{summary['command']}` ({steps} steps by default) took "
        f"{summary['wall_s'] / 60:.1f} min on a fresh cache, the warm-up build included, using "
        f"{summary['cpu_s'] / 60:.1f} min of CPU time (about its wall time on an idle machine: "
        "one thread). "
        f"The run is deterministic; these figures are `{rel}/` "
        "(regenerate with `python -m bench.offline_run --readme README.md`)."),
        "",
        "| first vs last 3 steps | start | end |",
        "|---|---|---|",
    ]
    for key, label in (("reward/accuracy", "train accuracy"), ("reward/mean", "train reward"),
                       ("reward/format", "train format")):
        lines.append(f"| {label} | {_window(metrics, key, False):.3f} | "
                     f"{_window(metrics, key, True):.3f} |")
    lines += ["", "Validation accuracy (128 problems, temperature 0.6) by step: "
              + ", ".join(f"{s}: {a:.3f}" for s, a in val) + "."]
    wrong = {k: [r[f"cepo/frac_wrong_dir_{k}"] for r in metrics
                 if f"cepo/frac_wrong_dir_{k}" in r] for k in ("pos", "neg")}
    ans = answer_wrong_dir(samples)
    lines += ["", ("Do the teachers use the hint? Share of tokens whose Δ points the wrong way "
              "(0.5 = chance), mean over steps: all tokens "
              f"{sum(wrong['pos']) / max(len(wrong['pos']), 1):.2f} on A > 0 rollouts, "
              f"{sum(wrong['neg']) / max(len(wrong['neg']), 1):.2f} on A < 0; the answer tokens "
              f"inside `\\boxed{{}}` of `samples.jsonl`: "
              f"{ans['answer_wrong_dir_pos']:.2f} on A > 0 ({ans['answer_tokens_pos']} tokens), "
              f"{ans['answer_wrong_dir_neg']:.2f} on A < 0 ({ans['answer_tokens_neg']} tokens).")]
    pair = _example_pair(samples)
    if pair is not None:
        good, bad = pair
        lines += ["", (f"`samples.jsonl`, step {good['step']} (`{good['problem']}`, answer "
                  f"{good['answer']}; the teachers told {good['answer']} and "
                  f"{good['wrong_answer']}):"), "",
                  (f"- `{good['response']}` (A = {good['advantage']:+.2f}): w ≠ 1 on "
                  f"{_weights(good)};"),
                  (f"- `{bad['response']}` (A = {bad['advantage']:+.2f}): w ≠ 1 on "
                  f"{_weights(bad)}."),
                  "", ("(w > 1 on a token of a right rollout: more credit; on a wrong one: a "
                  "larger penalty; tokens not listed have |w − 1| ≤ 0.05.)")]
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, text: str) -> None:
    """Replace the text between this block's markers of ``readme``."""
    from bench.report import write_readme_section

    write_readme_section(readme, text, README_BEGIN, README_END, demote=False)


def readme_block(readme: Path) -> str:
    """The text between the markers, as `write_readme` wrote it."""
    from bench.report import read_readme_section

    return read_readme_section(readme, README_BEGIN, README_END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.offline_run", description=__doc__.split(
        "\n")[0].split(": ", 1)[1])
    p.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    p.add_argument("--readme", type=Path, default=None, help="write the block into this README")
    p.add_argument("--render-only", action="store_true", help="no run: render committed results")
    args = p.parse_args(argv)
    if not args.render_only:
        run(args.out)
    text = render(args.out)
    if args.readme is None:
        sys.stdout.write(text)
    else:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
