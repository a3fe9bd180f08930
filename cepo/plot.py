"""``python -m cepo.plot RUN_DIR``: one picture of a run, ``RUN_DIR/curves.png``.

The trainer writes it at the end of every run; this command redraws it at any time (also while a
run is going). Six panels against the training step: reward, accuracy (train and validation),
format (train and validation), the λ schedule, the learning rate, and the clip fractions (PPO
ratio and CEPO token weight). Panels whose metrics a run did not log stay empty with a note.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"

# (title, [(metric key, label), ...]); keys are those of metrics.jsonl
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("reward", [("reward/mean", "train")]),
    ("accuracy", [("reward/accuracy", "train"), ("val/accuracy", "val")]),
    ("format", [("reward/format", "train"), ("val/format", "val")]),
    ("λ (teacher share)", [("cepo/lambda", "λ")]),
    ("learning rate", [("lr", "lr")]),
    ("clip fractions", [("ppo/clip_frac", "PPO ratio"),
                        ("cepo/weight_clip_frac", "token weight w")]),
]


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # torn tail: the line being written when the run stopped
                break
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
    return records


def series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; the last record of a step wins, non-numbers are skipped."""
    by_step: dict[int, float] = {}
    for record in history:
        value = record.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value) and "step" in record:
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_history(history: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Draw the panels of `PANELS` from `history` into the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for ax, (name, keys) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in keys:
            steps, values = series(history, key)
            if steps:
                marker = "o" if len(steps) < 30 or key.startswith("val/") else None
                ax.plot(steps, values, marker=marker, markersize=3, label=label)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn and len(keys) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` into `out` (default ``RUN_DIR/curves.png``)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a run directory of "
                                "python -m cepo.train?)")
    return plot_history(read_history(metrics), out or run_dir / CURVES_FILE, title=run_dir.name)


def draw_curves(run_dir: str | Path) -> Path | None:
    """`plot_run` for the trainer's end of run: None (with a warning) when matplotlib is not
    installed or the metrics cannot be drawn; a picture is never worth a failed run."""
    try:
        return plot_run(run_dir)
    except ImportError:
        logger.warning("curves.png not drawn: matplotlib is not installed")
    except (OSError, ValueError) as err:
        logger.warning("curves.png not drawn: %s", err)
    return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cepo.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory (the --output_dir of cepo.train)")
    parser.add_argument("--out", default=None, help=f"PNG to write (default RUN_DIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except ImportError:
        raise SystemExit("cepo.plot needs matplotlib: pip install matplotlib") from None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
