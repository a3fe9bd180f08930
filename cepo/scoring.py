"""The one scoring core (docs/METHOD.md, "Advantages"): rollouts -> student and teacher log-probs,
Δ, the clipped token weights w and Â, for the native trainer and the TRL one alike.

All three streams keep the response in their last T columns (`cepo.contexts`), so response
token j is scored from the same relative place in every stream. `score_rollouts` runs the forwards
per micro-batch and hands the hidden states to `evidence`, the single call of
`cepo_kernels.contrastive_evidence`, which returns old log-probs, Δ, w and Â without ever building
[B, T, V] logits. The TRL trainer builds its hidden states from TRL's batch and calls `evidence`
and `neg_stand_in` too, so the r− fallback and the kernel call are written once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from cepo.batch import IGNORE_INDEX, Prefix, collate, response_labels, response_width
from cepo.config import TeacherConfig
from cepo.contexts import TeacherContexts
from cepo.models import OutputHead, output_head, response_hidden
from cepo.prefix import context_after, grouped_response_hidden, use_prefix_sharing
from cepo.rollout import Rollouts
from cepo_kernels import contrastive_evidence, fused_linear_logprobs


@dataclass
class Scores:
    """Per-token results for all N rollouts, [N, T]; 0 at padding."""

    old_logprobs: torch.Tensor  # log P_S(y_t) under the sampling model (PPO's pi_old)
    pos_logprobs: torch.Tensor  # log P_T+(y_t) (= old_logprobs on rows not teacher-scored)
    neg_logprobs: torch.Tensor  # log P_T-(y_t), mixture when K > 1
    delta: torch.Tensor  # pos - neg
    token_weight: torch.Tensor  # clipped w_t (1 where not scored)
    token_advantages: torch.Tensor  # Â_t
    teacher_scored: torch.Tensor  # [N] bool: rows whose teachers were run (A != 0)
    backend: str  # cepo_kernels backend that ran


def stand_in_is_student(*, algo: str, neg_fallback: str) -> bool:
    """Whether a row without a usable r− scores its T− stream with the student (``algo="rlsd"``,
    or ``neg_fallback="student"``: RLSD for that group) rather than the r+ teacher
    (``"positive"``: Δ = 0, GRPO, the reference code's choice). docs/METHOD.md, "Teachers"."""
    return not (algo == "cepo" and neg_fallback == "positive")


def neg_stand_in(policy_h: torch.Tensor, pos_h: torch.Tensor, *, algo: str,
                 neg_fallback: str) -> torch.Tensor:
    """The T− hidden states of rows without a usable r− (`stand_in_is_student`)."""
    return policy_h if stand_in_is_student(algo=algo, neg_fallback=neg_fallback) else pos_h


def evidence(policy_h: torch.Tensor, pos_h: torch.Tensor, neg_h: torch.Tensor, head: OutputHead,
             labels: torch.Tensor, advantages: torch.Tensor, *, lam: float, eps_w: float,
             temperature: float, backend: str, validate: bool, mask: torch.Tensor | None = None):
    """Old log-probs, Δ, w and Â of one micro-batch: `cepo_kernels.contrastive_evidence` on the
    hidden states [b, t, D] (r− [K, b, t, D] when K > 1) in the lm_head's dtype.

    `validate` checks labels and the finiteness of the hidden states and the lm_head (a full read
    of W and a host sync): the callers ask for it on the first micro-batch of a step only.
    """
    weight, bias = head
    dtype = weight.dtype
    return contrastive_evidence(
        policy_h.to(dtype), pos_h.to(dtype), neg_h.to(dtype), weight, labels,
        advantages.float().to(labels.device), mask=mask, lam=lam, eps_w=eps_w, bias=bias,
        temperature=temperature, ignore_index=IGNORE_INDEX, backend=backend, validate=validate)


# Scores field <- ContrastiveEvidence field
_EVIDENCE = {"old_logprobs": "policy", "pos_logprobs": "pos", "neg_logprobs": "neg",
             "delta": "delta", "token_weight": "token_weight", "token_advantages": "advantages"}


@torch.no_grad()
def score_rollouts(
    model: torch.nn.Module,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    contexts: TeacherContexts,
    config: TeacherConfig,
    *,
    lam: float,
    eps_w: float,
    algo: Literal["cepo", "rlsd"] = "cepo",
    temperature: float = 1.0,
    backend: str = "auto",
    prefix_sharing: str = "auto",
) -> Scores:
    """Old log-probs, Δ, w and Â for every response token, one kernel call per micro-batch.

    `advantages` [N] are the GRPO advantages. ``algo="rlsd"`` replaces the wrong-answer teacher by
    the student (docs/METHOD.md, "Advantages"), so only the r+ teacher runs. Rows with A = 0 get
    Â = 0 whatever the teachers say, so their teacher forwards are skipped and their teacher
    log-probs are reported equal to the student's. A group without a usable r- takes
    `neg_stand_in`. `prefix_sharing` (auto, true, false): each prompt encoded once for all its
    rows and streams (`cepo.prefix`), the same log-probs up to float rounding.
    """
    if algo not in ("cepo", "rlsd"):
        raise ValueError(f"algo must be 'cepo' or 'rlsd', got {algo!r}")
    if config.teacher_model == "base" and not hasattr(model, "disable_adapter"):
        raise ValueError("teacher_model='base' needs a peft model (adapters to disable)")
    head = output_head(model)
    device = head.weight.device
    n, width = rollouts.response_ids.shape
    out = {f: torch.zeros(n, width) for f in _EVIDENCE}
    out["token_weight"].fill_(1.0)
    scored = advantages.cpu() != 0
    backend_used = backend
    was_training = model.training
    model.eval()
    shared = _Shared(rollouts, config) if use_prefix_sharing(prefix_sharing, model) else None
    try:
        for start in range(0, n, config.micro_batch_size):
            rows = list(range(start, min(n, start + config.micro_batch_size)))
            t = response_width(rollouts.response_mask, rows)  # drop shared padding
            policy_h, pos_h, neg_h = _micro_batch_hidden(
                model, rollouts, contexts, config, rows, t, scored, algo, device, shared
            )
            if shared is not None:
                shared.done_before(rows[-1] + 1)
            labels = response_labels(rollouts.response_ids, rollouts.response_mask, rows,
                                     t).to(device)  # [b, t]
            ev = evidence(policy_h, pos_h, neg_h, head, labels, advantages[rows], lam=lam,
                          eps_w=eps_w, temperature=temperature, backend=backend,
                          validate=start == 0)
            backend_used = ev.backend
            valid = labels != IGNORE_INDEX
            for field, name in _EVIDENCE.items():
                fill = 1.0 if field == "token_weight" else 0.0
                out[field][rows, :t] = torch.where(valid, getattr(ev, name).float(), fill).cpu()
    finally:
        model.train(was_training)
    return Scores(**out, teacher_scored=scored, backend=backend_used)


class _Shared:
    """The prompt encodings of one scoring pass (`cepo.prefix`): the student prompt of every
    group, and the teachers' (the same one, or the image-blind rendering, or the same one under
    the base weights), each encoded once and dropped once the rows past its group are scored."""

    def __init__(self, rollouts: Rollouts, config: TeacherConfig | None):
        self.group_size = rollouts.group_size
        self.prompts = [p.prefix() for p in rollouts.prompts]
        self.student: dict = {}
        self.teacher: dict = {}
        if config is not None:
            images = bool(config.teacher_images)
            self.teacher_prompts = self.prompts if images else [
                p.prefix(with_images=False) for p in rollouts.prompts]
            if images and config.teacher_model == "actor":
                self.teacher = self.student  # same prompt, same weights: one encoding

    def done_before(self, row: int) -> None:
        """Forget the encodings of groups whose rows all lie before `row`."""
        for memo in (self.student, self.teacher):
            for g in [g for g in memo if (g + 1) * self.group_size <= row]:
                del memo[g]

    def hidden(self, model, rows, ids, mask, *, teacher=None) -> torch.Tensor:
        """[b, t, D] of `rows` (the student's, or the teacher prefixes `teacher` [b])."""
        group = [r // self.group_size for r in rows]
        if teacher is None:
            return grouped_response_hidden(model, self.prompts, group, ids, mask,
                                           encoded=self.student)
        hints = [context_after(self.teacher_prompts[g], p) for g, p in zip(group, teacher)]
        return grouped_response_hidden(model, self.teacher_prompts, group, ids, mask,
                                       contexts=hints, encoded=self.teacher)


def _micro_batch_hidden(model, rollouts, contexts, config, rows, t, scored, algo, device,
                        shared: _Shared | None = None):
    """Hidden states [b, t, D] of the student, the r+ teacher and the r- teacher(s) for `rows`.

    The r- tensor is [K, b, t, D] when K > 1. Rows that need no teacher reuse the student's.
    """
    resp_ids = rollouts.response_ids[rows, :t]
    resp_mask = rollouts.response_mask[rows, :t]

    def forward(prefixes: list[Prefix], sub: list[int]) -> torch.Tensor:
        if shared is not None:
            return shared.hidden(model, [rows[i] for i in sub], resp_ids[sub], resp_mask[sub],
                                 teacher=prefixes)
        inputs = collate(prefixes, rollouts.pad_token_id, resp_ids[sub], resp_mask[sub])
        return response_hidden(model, inputs.to(device), t)

    if shared is not None:
        policy_h = shared.hidden(model, rows, resp_ids, resp_mask)
    else:
        policy_h = response_hidden(model, rollouts.student_inputs(rows, width=t).to(device), t)
    pos_h = policy_h.clone()
    neg_parts: list[tuple[list[int], torch.Tensor]] = []  # per r- set: rows, hidden states
    active = [i for i, r in enumerate(rows) if scored[r]]
    with_neg = [i for i in active if contexts.has_neg[rows[i]]] if algo == "cepo" else []
    if active:
        # every teacher row of the micro-batch in one forward: r+ rows, then each r- set
        targets = [(active, [contexts.pos[rows[i]] for i in active])]
        if with_neg:
            targets += [(with_neg, [contexts.neg[k][rows[i]] for i in with_neg])
                        for k in range(config.num_neg)]
        with _teacher_weights(model, config):
            hidden = forward([p for _, prefixes in targets for p in prefixes],
                             [i for sub, _ in targets for i in sub])
        parts = hidden.split([len(sub) for sub, _ in targets])
        pos_h[active] = parts[0]
        neg_parts = [(with_neg, part) for part in parts[1:]]
    # rows without an r- (or not scored, where pos_h is the student's) take the stand-in
    stand_in = neg_stand_in(policy_h, pos_h, algo=algo, neg_fallback=config.neg_fallback)
    negs = [stand_in.clone() for _ in range(config.num_neg)]
    for neg, (sub, part) in zip(negs, neg_parts):
        neg[sub] = part
    neg_h = negs[0] if config.num_neg == 1 else torch.stack(negs)  # [b, t, D] or [K, b, t, D]
    return policy_h, pos_h, neg_h


def _teacher_weights(model, config: TeacherConfig):
    """The weights the teachers run with: the current actor, or the base with adapters off."""
    if config.teacher_model == "base":
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def score_student(
    model: torch.nn.Module,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    temperature: float = 1.0,
    backend: str = "auto",
    prefix_sharing: str = "auto",
) -> Scores:
    """GRPO scoring (λ = 0 or no teachers): old log-probs only, Â = A on every response token."""
    weight, bias = output_head(model)
    device = weight.device
    n, width = rollouts.response_ids.shape
    mask = rollouts.response_mask.bool()
    policy = torch.zeros(n, width)
    backend_used = backend
    was_training = model.training
    model.eval()
    shared = _Shared(rollouts, None) if use_prefix_sharing(prefix_sharing, model) else None
    try:
        for start in range(0, n, micro_batch_size):
            rows = list(range(start, min(n, start + micro_batch_size)))
            t = response_width(rollouts.response_mask, rows)
            if shared is not None:
                hidden = shared.hidden(model, rows, rollouts.response_ids[rows, :t],
                                       rollouts.response_mask[rows, :t])
                shared.done_before(rows[-1] + 1)
            else:
                inputs = rollouts.student_inputs(rows, width=t)
                hidden = response_hidden(model, inputs.to(device), t)  # [b, t, D]
            labels = response_labels(rollouts.response_ids, mask, rows, t).to(device)
            lp = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                       backend=backend, validate=start == 0)
            backend_used = lp.backend
            policy[rows, :t] = torch.where(labels != IGNORE_INDEX, lp.logprobs.float(), 0.0).cpu()
    finally:
        model.train(was_training)
    token_adv = advantages.float().cpu()[:, None] * mask  # [N, T]
    return Scores(
        old_logprobs=policy,
        pos_logprobs=policy.clone(),
        neg_logprobs=policy.clone(),
        delta=torch.zeros(n, width),
        token_weight=torch.ones(n, width),
        token_advantages=token_adv,
        teacher_scored=torch.zeros(n, dtype=torch.bool),
        backend=backend_used,
    )
