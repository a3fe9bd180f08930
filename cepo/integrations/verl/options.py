"""The ``cepo:`` block of a verl config: schedule, teachers and where verl keeps the answers.

A top-level block of its own because verl's ``AlgoConfig`` rejects unknown keys under
``algorithm``. The schedule and teacher fields are the project's own settings (`ContrastConfig`,
`TeacherConfig`), with the same names and defaults as ``python -m cepo.train`` (its old names
``lam0``, ``lam_warmup_steps``, ``lam_offset`` still work); the rest says where a verl batch
holds the ground truth and the grader's verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cepo.config import (
    DEFAULT_EPS_W,
    DEFAULT_LAM_OFFSET,
    RENAMED,
    ConfigError,
    ContrastConfig,
    TeacherConfig,
)
from cepo.schedule import lam_at

ALGOS = ("cepo", "rlsd")
TEACHER_KEYS = ("hint_template", "neg_choice", "num_neg", "neg_fallback", "teacher_model",
                "teacher_images")
SCHEDULE_KEYS = tuple(f.name for f in dataclasses.fields(ContrastConfig))
OLD_NAMES = {old.split(".", 1)[1]: new.split(".", 1)[1] for old, new in RENAMED.items()
             if old.startswith("cepo.")}


@dataclass(frozen=True)
class VerlCEPOOptions:
    """Resolved options (eps_w and lambda_offset filled in by algorithm)."""

    algo: str = "cepo"
    schedule: ContrastConfig = field(default_factory=ContrastConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # dotted path into a row's fields: verl's RL datasets keep it in reward_model.ground_truth
    ground_truth_field: str = "reward_model.ground_truth"
    # key of the reward function's extra info holding the 0/1 verdict; without it a rollout is
    # correct when its score reaches `correct_score`
    accuracy_key: str = "acc"
    correct_score: float = 1.0
    partition: str = "cepo"  # TransferQueue partition of the teacher rows (cleared every step)

    @property
    def eps_w(self) -> float:
        return float(self.schedule.eps_w)

    def lam(self, global_step: int) -> float:
        """λ of verl's ``global_steps`` (1-based; restored on resume, so λ continues)."""
        s = self.schedule
        return lam_at(global_step, s.lambda_init, s.lambda_warmup_steps, s.lambda_offset)


def options_from_config(block: Mapping[str, Any] | None) -> VerlCEPOOptions:
    """`VerlCEPOOptions` from the ``cepo:`` block (a dict or an OmegaConf node; None: defaults)."""
    values = _plain(block) if block is not None else {}
    if not isinstance(values, dict):
        raise ConfigError(f"the cepo: block must be a mapping, got {type(values).__name__}")
    for old, new in OLD_NAMES.items():
        if old in values:
            if new in values:
                raise ConfigError(f"cepo.{old} is the old name of cepo.{new}: give one of them")
            values[new] = values.pop(old)
    known = {"algo", "ground_truth_field", "accuracy_key", "correct_score", "partition",
             *SCHEDULE_KEYS, *TEACHER_KEYS}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join("cepo." + k for k in unknown)
        raise ConfigError(f"unknown key(s) in the cepo: block: {names}"
                          f"; known: {', '.join(sorted(known))}")
    algo = values.get("algo", "cepo")
    if algo not in ALGOS:
        raise ConfigError(f"cepo.algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    try:
        schedule = ContrastConfig(**{k: values[k] for k in SCHEDULE_KEYS if k in values})
        teacher = TeacherConfig(**{k: values[k] for k in TEACHER_KEYS if k in values})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cepo: block: {err}") from None
    schedule = dataclasses.replace(
        schedule,
        eps_w=DEFAULT_EPS_W[algo] if schedule.eps_w is None else schedule.eps_w,
        lambda_offset=(DEFAULT_LAM_OFFSET[algo] if schedule.lambda_offset is None
                       else schedule.lambda_offset),
    )
    if teacher.teacher_images is None:  # by algorithm, as python -m cepo.train resolves it
        teacher = dataclasses.replace(teacher, teacher_images=algo != "cepo")
    rest = {k: values[k] for k in ("ground_truth_field", "accuracy_key", "correct_score",
                                    "partition") if k in values}
    return VerlCEPOOptions(algo=algo, schedule=schedule, teacher=teacher, **rest)


def _plain(block: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - verl always brings omegaconf
        return dict(block)
    if isinstance(block, DictConfig):
        return OmegaConf.to_container(block, resolve=True)
    return dict(block) if isinstance(block, Mapping) else block
