"""One CEPO experience step: everything a training step needs before the policy update.

    prompts -> rollouts (G per prompt) -> rewards -> GRPO advantages A
            -> teacher contexts (r+, r-) -> student + teacher log-probs -> Δ, w, Â

`make_experience` is what the training loop calls once per rollout batch, with the λ of that
step (the schedule of docs/METHOD.md, "Schedules" lives with the trainer). With λ = 0, ε_w = 0 or
``algo="grpo"`` the teacher passes are skipped and Â = A on every response token.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from cepo.config import DEFAULT_EPS_W, TeacherConfig, check_eps_w
from cepo.contexts import build_teacher_contexts
from cepo.data import Example, encode_prompts
from cepo.diagnostics import token_diagnostics
from cepo.grading import DEFAULT_BATCH_BUDGET_S, Grader, check_grader
from cepo.group_advantages import group_advantages, mixed_groups
from cepo.reward import Rewards, compute_rewards
from cepo.rollout import HFRolloutEngine, RolloutConfig, RolloutEngine, Rollouts
from cepo.scoring import Scores, score_rollouts, score_student
from cepo_kernels.validation import check_weights_hparams


@dataclass(frozen=True)
class ExperienceConfig:
    """Settings of one experience step; defaults are docs/METHOD.md, "Presets" (preset `paper`)."""

    algo: Literal["cepo", "rlsd", "grpo"] = "cepo"
    eps_w: float = DEFAULT_EPS_W["cepo"]  # checked by cepo.config.check_eps_w
    grader_timeout_s: float = 5.0  # hard limit per graded answer
    grader_batch_budget_s: float = DEFAULT_BATCH_BUDGET_S  # grading time per step, all answers
    grader: str = "math_verify"  # or "mathruler" (the reference code's grader)
    kernel_backend: str = "auto"  # cepo_kernels backend: "auto" | "triton" | "torch"
    prefix_sharing: str = "auto"  # each prompt encoded once per group: "auto" | "true" | "false"
    uniform_zero: bool = True  # all-equal groups get A = 0 exactly (False: the reference's A)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self):
        if self.algo not in ("cepo", "rlsd", "grpo"):
            raise ValueError(f"algo must be 'cepo', 'rlsd' or 'grpo', got {self.algo!r}")
        check_eps_w(self.eps_w, "eps_w")
        check_grader(self.grader)
        if str(self.prefix_sharing).lower() not in ("auto", "true", "false"):
            raise ValueError(f"prefix_sharing must be 'auto', 'true' or 'false', "
                             f"got {self.prefix_sharing!r}")


@dataclass
class Experience:
    """The result of one step, N = P x G rollouts with T response columns."""

    rollouts: Rollouts
    rewards: Rewards
    advantages: torch.Tensor  # [N] GRPO advantages A_i
    scores: Scores  # [N, T] old log-probs, teacher log-probs, Δ, w, Â
    wrong_answers: list[list[str]]  # P: the r- chosen per group (empty: fallback or no teachers)
    lam: float
    eps_w: float  # the clip of the token weights this step was scored with
    metrics: dict[str, float]

    @property
    def response_mask(self) -> torch.Tensor:  # [N, T]
        return self.rollouts.response_mask

    @property
    def old_logprobs(self) -> torch.Tensor:  # [N, T]
        return self.scores.old_logprobs

    @property
    def token_advantages(self) -> torch.Tensor:  # [N, T] Â
        return self.scores.token_advantages


@functools.lru_cache(maxsize=None)
def default_grader(timeout_s: float, backend: str = "math_verify") -> Grader:
    """One grader per time limit and backend per process, so its child starts once per run."""
    return Grader(timeout_s=timeout_s, backend=backend)


def make_experience(
    model: torch.nn.Module,
    processor,
    examples: Sequence[Example],
    *,
    lam: float,
    config: ExperienceConfig | None = None,
    engine: RolloutEngine | None = None,
    grader: Grader | None = None,
) -> Experience:
    """Sample, reward and score one batch of prompts; returns Â for the update.

    Args:
        model: the actor (plain or peft), also used for the teachers.
        processor: its processor (chat template, tokenizer, image processor).
        examples: P prompts; those longer than ``rollout.max_prompt_tokens`` are dropped.
        lam: λ of this step, in [0, 1].
        engine: rollout engine (default: `HFRolloutEngine` on `model`).
        grader: answer grader (default: one shared per process).
    """
    config = config or ExperienceConfig()
    check_weights_hparams(lam, config.eps_w)  # the kernels' own range check, before any work
    engine = engine or HFRolloutEngine(model, processor)
    grader = grader or default_grader(config.grader_timeout_s, config.grader)
    timings = {}

    clock = time.perf_counter()
    prompts, dropped = encode_prompts(
        processor, examples, max_prompt_tokens=config.rollout.max_prompt_tokens
    )
    if not prompts:
        raise ValueError(
            f"all {len(examples)} prompts are longer than max_prompt_tokens="
            f"{config.rollout.max_prompt_tokens}; raise it or filter the dataset"
        )
    rollouts = engine.generate(prompts, config.rollout)
    timings["time/rollout"] = time.perf_counter() - clock

    clock = time.perf_counter()
    timeouts_before, skipped_before = grader.timeouts, grader.skipped
    rewards = compute_rewards(rollouts.texts, rollouts.ground_truths(), grader,
                              budget_s=config.grader_batch_budget_s)
    advantages = group_advantages(  # [N]
        rewards.reward, rollouts.group_size, uniform_zero=config.uniform_zero
    )
    timings["time/reward"] = time.perf_counter() - clock

    clock = time.perf_counter()
    # Teachers see logits divided by the rollout temperature, like the student
    # (docs/METHOD.md, "Teachers").
    temperature = config.rollout.temperature or 1.0
    teachers_on = config.algo != "grpo" and lam > 0 and config.eps_w > 0
    wrong_answers: list[list[str]] = [[] for _ in prompts]
    if teachers_on:
        contexts = build_teacher_contexts(rollouts, rewards, processor.tokenizer, config.teacher)
        wrong_answers = contexts.wrong_answers
        scores = score_rollouts(
            model,
            rollouts,
            advantages,
            contexts,
            config.teacher,
            lam=lam,
            eps_w=config.eps_w,
            algo=config.algo,
            temperature=temperature,
            backend=config.kernel_backend,
            prefix_sharing=config.prefix_sharing,
        )
    else:
        scores = score_student(
            model,
            rollouts,
            advantages,
            micro_batch_size=config.teacher.micro_batch_size,
            temperature=temperature,
            backend=config.kernel_backend,
            prefix_sharing=config.prefix_sharing,
        )
    timings["time/score"] = time.perf_counter() - clock

    metrics = step_metrics(rollouts, rewards, advantages, scores, wrong_answers, lam,
                           eps_w=config.eps_w)
    metrics["rollout/dropped_prompts"] = float(dropped)
    if rollouts.sampler_logprobs is not None:  # vLLM: does it sample from the scored policy?
        mask = rollouts.response_mask.bool()
        gap = (rollouts.sampler_logprobs - scores.old_logprobs).abs()[mask]
        metrics["rollout/sampler_logprob_gap"] = gap.mean().item() if gap.numel() else 0.0
    metrics["reward/grader_timeouts"] = float(grader.timeouts - timeouts_before)
    metrics["reward/grader_skipped"] = float(grader.skipped - skipped_before)  # budget spent
    metrics.update(timings)
    return Experience(rollouts, rewards, advantages, scores, wrong_answers, lam, config.eps_w,
                      metrics)


def step_metrics(
    rollouts: Rollouts,
    rewards: Rewards,
    advantages: torch.Tensor,
    scores: Scores,
    wrong_answers: list[list[str]],
    lam: float,
    *,
    eps_w: float,
) -> dict[str, float]:
    """Scalar diagnostics of one step (names follow the reference's ``cepo/*`` metrics).

    Δ and w statistics cover the teacher-scored response tokens only (`cepo.diagnostics`).
    """
    mask = rollouts.response_mask.bool()  # [N, T]
    g = rollouts.group_size
    mixed = mixed_groups(rewards.reward, g)  # [P]
    metrics = {
        "reward/mean": rewards.reward.mean().item(),
        "reward/accuracy": rewards.accuracy.mean().item(),
        "reward/format": rewards.format.mean().item(),
        "rollout/response_length": mask.sum(1).float().mean().item(),
        "rollout/truncated": rollouts.truncated.float().mean().item(),
        "rollout/mixed_groups": mixed.float().mean().item(),
        "cepo/lambda": float(lam),
    }
    adv_tokens = advantages[:, None].expand_as(mask)[mask]
    metrics["cepo/adv_pre"] = adv_tokens.abs().mean().item() if adv_tokens.numel() else 0.0
    post = scores.token_advantages[mask]
    metrics["cepo/adv_post"] = post.abs().mean().item() if post.numel() else 0.0
    scored = mask & scores.teacher_scored[:, None]
    if scored.any():
        metrics.update(token_diagnostics(scores.delta, advantages, scored, scores.token_weight,
                                         eps_w=eps_w))
        metrics["cepo/groups_without_neg"] = float(
            sum(1 for p, w in enumerate(wrong_answers) if mixed[p] and not w)
        )
    return metrics
