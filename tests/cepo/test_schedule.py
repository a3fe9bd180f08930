"""λ and lr schedules: pure functions of the training step (docs/METHOD.md, "Schedules" and
"Presets")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cepo.schedule import lam_at, lr_at

METHOD = Path(__file__).resolve().parents[2] / "docs" / "METHOD.md"


def test_lambda_schedule_spec_section_4():
    # λ_k = 0.5 · max(0, 1 − (k − 1)/25): 0.5 at step 1, 0.5·(1 − 12/25) = 0.26 at step 13,
    # 0.02 at step 25, 0 from step 26 on (the teacher passes are then skipped)
    assert lam_at(1, 0.5, 25) == 0.5
    assert lam_at(13, 0.5, 25) == pytest.approx(0.26)
    assert lam_at(25, 0.5, 25) == pytest.approx(0.02)
    assert lam_at(26, 0.5, 25) == 0.0 and lam_at(50, 0.5, 25) == 0.0
    assert lam_at(40, 0.3, 0) == 0.3  # T_warm = 0: constant
    with pytest.raises(ValueError):
        lam_at(0, 0.5, 25)


def test_lambda_warmup_zero_is_constant_as_documented():
    # docs/METHOD.md, "Schedules" says T_warm = 0 keeps λ = λ0 for the whole run (both trainers
    # use this one function; the TRL side is pinned in tests/integrations/test_trl_schedule.py)
    section = METHOD.read_text().split("## Schedules", 1)[1].split("\n## ", 1)[0]
    assert "T_warm = 0 keeps λ = λ0 for the whole run" in " ".join(section.split())
    assert [lam_at(k, 0.5, 0) for k in (1, 2, 25, 26, 1000)] == [0.5] * 5
    assert [lam_at(k, 0.5, 0, offset=1) for k in (1, 30)] == [0.5, 0.5]
    assert lam_at(26, 0.5, 25) == 0.0  # whereas T_warm = 25 has reached 0


def test_lr_warmup_then_cosine():
    lr = dict(lr=1.0, total_steps=50, schedule="cosine", warmup_steps=5)
    assert [lr_at(k, **lr) for k in range(1, 6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(6, **lr) == 1.0  # the first decay step still has the peak
    # step 28 is halfway through the 45 decay steps: ½(1 + cos(π · 22/45))
    assert lr_at(28, **lr) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 45)))
    assert 0 < lr_at(50, **lr) < 0.01  # small but not zero: the last step still learns
    floor = dict(lr, min_lr_ratio=0.1)
    assert lr_at(50, **floor) >= 0.1


def test_lr_constant_and_errors():
    assert lr_at(1, lr=2.0, total_steps=50, schedule="constant") == 2.0
    assert lr_at(1, lr=2.0, total_steps=50, schedule="constant", warmup_steps=4) == 0.5
    assert lr_at(50, lr=2.0, total_steps=50, schedule="constant", warmup_steps=4) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, lr=1.0, total_steps=5, schedule="linear")
