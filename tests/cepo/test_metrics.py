"""Run logging: the JSON-lines file (truncated on resume), reductions, CEPO weight statistics."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.metrics import MetricsWriter, read, reduce_across, summarize, weight_stats


def test_jsonl_writer_and_resume_truncation(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(4):
        writer.log(step, {"reward/mean": step / 10, "x": torch.tensor(1.5), "bad": math.nan})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert read(tmp_path / "metrics.jsonl")[1] == {"step": 1, "reward/mean": 0.1, "x": 1.5,
                                                   "bad": None}
    resumed = MetricsWriter(tmp_path, resume_step=2)  # steps 3+ are re-done after a resume
    assert [r["step"] for r in resumed.history] == [0, 1, 2]
    resumed.log(3, {"reward/mean": 0.9})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert MetricsWriter(tmp_path / "other", enabled=False).history == []
    assert not (tmp_path / "other").exists()


def test_optional_backends_are_skipped_when_missing(tmp_path, caplog):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("wandb"):
        pytest.skip("tensorboard/wandb installed here")
    writer = MetricsWriter(tmp_path, tensorboard=True, wandb=True)
    writer.log(1, {"a": 1.0})
    writer.close()
    assert "not installed" in caplog.text and read(tmp_path / "metrics.jsonl")


def test_summarize_start_vs_end():
    history = [{"step": 0, "val/accuracy": 0.1, "val/reward": 0.1, "val/format": 0.5}]
    history += [{"step": s, "reward/mean": s / 10, "reward/accuracy": 0.0, "reward/format": 1.0}
                for s in range(1, 7)]
    history[-1].update({"val/accuracy": 0.3, "val/reward": 0.4, "val/format": 1.0})
    out = summarize(history)
    assert out["steps"] == 6
    assert out["reward/mean start"] == pytest.approx(0.2)  # steps 1-3
    assert out["reward/mean end"] == pytest.approx(0.5)  # steps 4-6
    assert (out["val/accuracy start"], out["val/accuracy end"]) == (0.1, 0.3)


def test_reduce_on_one_process_is_identity():
    metrics = {"a": 1.0, "b_max": 2.0}
    assert reduce_across(metrics, None) is metrics


def test_weight_clip_fraction():
    from types import SimpleNamespace

    # eps_w = 0.5: log w = sign(A)·Δ is clipped above log 1.5 = 0.405 and below log 0.5 = -0.693
    delta = torch.tensor([[0.1, 1.0, -1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    exp = SimpleNamespace(
        advantages=torch.tensor([1.0, -1.0]),
        response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        scores=SimpleNamespace(delta=delta, teacher_scored=torch.tensor([True, True]),
                               weight=torch.ones(2, 4)),
    )
    # row 0 (A>0): 0.1 in, 1.0 high, -1.0 low; row 1 (A<0): -0.5, -0.5 both inside
    stats = weight_stats(exp, 0.5)
    assert stats["cepo/weight_clip_frac"] == pytest.approx(2 / 5)
    assert stats["cepo/weight_clip_frac_high"] == pytest.approx(1 / 5)
    exp.scores.teacher_scored = torch.tensor([False, False])
    assert weight_stats(exp, 0.5) == {}
