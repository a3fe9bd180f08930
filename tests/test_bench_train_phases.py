"""Smoke test of ``python -m bench.train_phases`` at 1 step x 1 run per algorithm: the JSON holds
raw steps, summary and machine info, and its ratios agree with a recomputation from the raw step
times. A short warm-up model in tmp keeps it off ~/.cache and fast on a fresh machine."""

from __future__ import annotations

import json

import pytest

from bench import train_phases
from cepo.offline.tiny import build_tiny_model
from cepo.offline.warmup import WarmupConfig, build_warm_tiny


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train_phases")
    warm = build_warm_tiny(tmp / "warm", WarmupConfig(steps=60),
                           base=str(build_tiny_model(tmp / "mini", vocab="mini")))
    out = tmp / "out"
    assert train_phases.main(["--steps", "1", "--repeats", "1", "--out", str(out),
                              "--model.name", str(warm), "--prompts_per_step", "4",
                              "--rollout.group_size", "4"]) == 0
    assert "| cepo |" in (out / "train_phases.md").read_text()
    return json.loads((out / "train_phases.json").read_text())


def test_structure(result):
    assert {"command", "meta", "summary", "runs", "steps", "repeats", "warmup"} <= result.keys()
    assert result["warmup"] == 0  # one step: nothing to leave out
    for key in ("cpu", "cores", "torch", "date_utc", "settings"):
        assert result["meta"][key]
    assert result["meta"]["settings"]["prompts_per_step"] == 4
    assert sorted(r["algo"] for r in result["runs"]) == ["cepo", "grpo", "rlsd"]
    assert set(result["summary"]) == {"grpo", "rlsd", "cepo"}


def test_times_positive_and_phases_within_step(result):
    for run in result["runs"]:
        assert [r["step"] for r in run["steps"]] == [1]
        for r in run["steps"]:
            phases = [r[f"time/{p}"] for p in train_phases.PHASES]
            assert all(t > 0 for t in phases) and r["tokens/generated"] > 0
            assert sum(phases) <= r["time/step"]
    for s in result["summary"].values():
        assert s["step_s"] > 0 and s["step_tok_s"] > 0
        assert sum(p["s"] for p in s["phases"].values()) == pytest.approx(s["step_s"])
        assert s["phases"]["other"]["s"] >= 0


def test_overhead_is_the_ratio_of_recorded_step_times(result):
    step = {run["algo"]: run["steps"][0]["time/step"] for run in result["runs"]}
    tokens = {run["algo"]: run["steps"][0]["tokens/generated"] for run in result["runs"]}
    for algo in ("grpo", "rlsd", "cepo"):
        s = result["summary"][algo]
        assert s["vs_grpo_step"] == pytest.approx(step[algo] / step["grpo"])
        assert s["vs_grpo_step_median"] == pytest.approx(step[algo] / step["grpo"])
        assert s["vs_grpo_step_per_repeat"] == [pytest.approx(step[algo] / step["grpo"])]
        assert s["vs_grpo_per_token"] == pytest.approx(
            step[algo] / tokens[algo] / (step["grpo"] / tokens["grpo"]))
        assert 0 < s["phases"]["score"]["share"] < 1
    assert result["summary"]["grpo"]["teacher_share_est"] == 0.0
