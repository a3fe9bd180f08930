"""The TRL trainer's λ: the native schedule (`cepo.schedule.lam_at`) of the generation index TRL's
global step gives (docs/METHOD.md, "Schedules")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer  # noqa: E402
from cepo.integrations.trl.config import generation_index  # noqa: E402
from cepo.schedule import lam_at  # noqa: E402


def _args(tmp_path, **overrides) -> CEPOConfig:
    return CEPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False,
                      report_to="none", **overrides)


def test_lambda_schedule_and_step_mapping():
    assert [lam_at(k, 0.5, 25) for k in (1, 2, 26, 27)] == [0.5, 0.5 * (1 - 1 / 25), 0.0, 0.0]
    # default TRL layout: one optimizer step per generation
    assert [generation_index(s, 0, gradient_accumulation_steps=4, steps_per_generation=4,
                             num_iterations=1) for s in range(3)] == [1, 2, 3]
    # the paper's 2 optimizer steps per rollout batch (steps_per_generation = 2 x GA)
    assert [generation_index(s, 0, gradient_accumulation_steps=2, steps_per_generation=4,
                             num_iterations=1) for s in range(4)] == [1, 1, 2, 2]
    # num_iterations reuses one generation for several passes
    assert [generation_index(s, 0, gradient_accumulation_steps=1, steps_per_generation=1,
                             num_iterations=2) for s in range(4)] == [1, 1, 2, 2]
    # several generations inside one optimizer step: the micro-step decides
    assert [generation_index(0, m, gradient_accumulation_steps=4, steps_per_generation=1,
                             num_iterations=1) for m in range(4)] == [1, 2, 3, 4]


def test_lambda_warmup_zero_keeps_lambda_init_as_the_native_schedule(tmp_path):
    """docs/METHOD.md, "Schedules": T_warm = 0 keeps λ = λ0; the TRL trainer's λ is the native
    `lam_at` of its generation index (one schedule for both trainers)."""
    args = _args(tmp_path, cepo_lambda_warmup_steps=0, cepo_lambda_init=0.3)
    for step in (0, 7, 100):
        me = SimpleNamespace(args=args, cepo_generation=lambda step=step: step + 1)
        assert CEPOGRPOTrainer.cepo_lambda(me) == 0.3 == lam_at(step + 1, 0.3, 0)
    args = _args(tmp_path, cepo_lambda_warmup_steps=4)
    me = SimpleNamespace(args=args, cepo_generation=lambda: 3)
    assert CEPOGRPOTrainer.cepo_lambda(me) == pytest.approx(0.5 * (1 - 2 / 4))
