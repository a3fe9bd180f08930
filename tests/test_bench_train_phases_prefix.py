"""``python -m bench.train_phases --prompt-heavy`` without running it: the summary's ratios from
raw step records, the goals it judges, and the README paragraph rendered from the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_phases_prefix as tpp

ROOT = Path(__file__).resolve().parents[1]


def _runs(times: dict) -> list[dict]:
    """Per variant one run of two steps: a slow warm-up step (left out), then the given times."""
    runs = []
    for (algo, share), (score, update, step) in times.items():
        steps = [{"step": s, "time/score": score * k, "time/update": update * k,
                  "time/step": step * k, "cpu/step": step * k / 2, "tokens/generated": 1000.0,
                  "tokens/update": 800.0, "rollout/response_length": 100.0}
                 for s, k in ((1, 9.0), (2, 1.0))]
        runs.append({"algo": algo, "sharing": share, "repeat": 0, "steps": steps})
    return runs


def test_summary_ratios_and_goals():
    times = {("grpo", "true"): (1.0, 2.0, 10.0), ("grpo", "false"): (3.0, 5.0, 16.0),
             ("cepo", "true"): (1.5, 2.0, 10.5), ("cepo", "false"): (6.0, 5.0, 20.0)}
    summary = tpp.summarize(_runs(times), warmup=1)
    r, v = summary["ratios"], summary["variants"]
    assert v["cepo/true"]["score_tok_s"] == pytest.approx(1000 / 1.5)
    assert v["grpo/false"]["update_tok_s"] == pytest.approx(800 / 5.0)
    assert r["cepo_score_speedup"] == pytest.approx(4.0)
    assert r["grpo_update_speedup"] == pytest.approx(2.5)
    assert r["cepo_vs_grpo_step_true"] == pytest.approx(1.05)
    assert r["cepo_vs_grpo_step_false"] == pytest.approx(1.25)
    result = {"command": "x", "steps": 2, "repeats": 1, "warmup": 1, "wall_s": 60.0,
              "prompt": {"tokens": 300, "visual": 256}, "summary": summary,
              "meta": {"machine": "m", "date_utc": "d", "cpu": "c", "cores": 2, "torch": "t",
                       "loadavg_before": "1", "loadavg_after": "2"}}
    text = tpp.markdown(result)
    assert "score phase ≥ 2× faster with sharing: met (4.00×" in text
    assert "CEPO step ≤ 1.10× a GRPO step: met (1.05×)" in text
    times[("cepo", "true")] = (4.0, 2.0, 12.0)
    text = tpp.markdown({**result, "summary": tpp.summarize(_runs(times), warmup=1)})
    assert "missed (1.50×" in text and "missed (1.20×)" in text


def test_readme_paragraph_is_the_committed_result():
    results = ROOT / "bench/results/cpu-amd-epyc-2c/train_phases_prefix"
    assert json.loads((results / "train_phases_prefix.json").read_text())["runs"]
    assert tpp.readme_block(ROOT / "README.md") == tpp.render(results)
