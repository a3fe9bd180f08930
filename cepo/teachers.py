"""Teacher contexts (docs/METHOD.md, "Teachers") and the fused scoring of student and teachers
(docs/METHOD.md, "Advantages").

Both teachers are the student model with a hint between the prompt and the response:

    student:        [pad | prompt                 | response]
    teacher r+/r-:  [pad | prompt + hint(answer)  | response]     hint = template.format(answer=...)

r+ is the ground truth; r- a wrong answer extracted from a rejected rollout of the same group.
All three rows keep the response in their last T columns, so response token j is scored from the
same relative place in every stream. `score_rollouts` runs the three forwards per micro-batch and
hands the hidden states to `cepo_kernels.contrastive_evidence`, which returns old log-probs, Δ,
the clipped weights and Â without ever building [B, T, V] logits.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from cepo.batch import Prefix, collate
from cepo.config import NEG_CHOICES, REFERENCE_THRESHOLD, NegChoice, TeacherConfig
from cepo.grading import normalize_answer
from cepo.models import output_head, response_hidden
from cepo.reward import Rewards
from cepo.rollout import Rollouts
from cepo_kernels import contrastive_evidence, fused_linear_logprobs

IGNORE_INDEX = -100
# --------------------------------------------------------------------------- choosing r-


def select_wrong_answers(
    answers: Sequence[str | None],
    rewards: Sequence[float],
    accuracy: Sequence[float],
    *,
    choice: NegChoice = "worst",
    k: int = 1,
    texts: Sequence[str] | None = None,
) -> list[str]:
    """Up to `k` distinct wrong answers r- from one group's rollouts, best candidate first.

    Candidates are rejected rollouts (accuracy 0) whose final answer could be extracted; a rollout
    without a ``\\boxed{}`` answer is never used. ``worst``: lowest reward first, ties in group
    order (the paper's argmin). ``most_frequent``: the group's most common wrong answer first, ties
    by first appearance. ``reference``: the reference code's choice, which needs the response
    `texts`: rollouts with reward below 0.5, boxed or not, lowest reward first (ties in group
    order), each read by `reference_answer` (so an unboxed one gives "None"). Answers equal after
    `normalize_answer` count as one.
    """
    if choice == "reference":
        if texts is None or len(texts) != len(rewards):
            raise ValueError("choice='reference' needs the group's response texts")
        candidates = [(rewards[i], i, reference_answer(texts[i]))
                      for i in range(len(rewards)) if rewards[i] < REFERENCE_THRESHOLD]
    else:
        candidates = [
            (rewards[i], i, a)
            for i, a in enumerate(answers)
            if a is not None and a.strip() and accuracy[i] == 0
        ]
    if choice in ("worst", "reference"):
        ordered = [a for _, _, a in sorted(candidates, key=lambda c: (c[0], c[1]))]
    elif choice == "most_frequent":
        counts = Counter(normalize_answer(a) for _, _, a in candidates)
        by_count = sorted(candidates, key=lambda c: (-counts[normalize_answer(c[2])], c[1]))
        ordered = [a for _, _, a in by_count]
    else:
        raise ValueError(f"choice must be one of {', '.join(NEG_CHOICES)}, got {choice!r}")
    picked, seen = [], set()
    for a in ordered:
        key = normalize_answer(a)
        if key not in seen:
            seen.add(key)
            picked.append(a)
        if len(picked) == k:
            break
    return picked


def reference_answer(text: str) -> str:
    """A response's answer as the reference code reads it for r-: the content of the last
    ``\\boxed{`` (mathruler's `extract_boxed_content`: an unclosed last box or none at all gives
    the string "None"), and the response's first 50 characters when that box is empty."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content, depth = text[start + len("\\boxed{"):], 0
    for i, char in enumerate(content):
        depth += (char == "{") - (char == "}")
        if depth == -1:
            return content[:i].strip() or text[:50]
    return "None"


# --------------------------------------------------------------------------- contexts


@dataclass
class TeacherContexts:
    """The teacher prefixes of every rollout (N = P x G), responses excluded."""

    pos: list[Prefix]  # N: prompt + hint(r+)
    neg: list[list[Prefix]]  # K lists of N: prompt + hint(r-_k), cycled when a group has < K
    has_neg: torch.Tensor  # [N] bool: the group has at least one usable r-
    wrong_answers: list[list[str]]  # P: the r- answers chosen per group (may be empty)


def build_teacher_contexts(
    rollouts: Rollouts, rewards: Rewards, tokenizer, config: TeacherConfig
) -> TeacherContexts:
    """Teacher prefixes for every rollout, from the group's ground truth and wrong answers.

    A group with fewer than K distinct wrong answers repeats the ones it has (K = 2 with one
    answer is then exactly the K = 1 case). A group with none is marked in `has_neg`; its r-
    stream is replaced at scoring time (`neg_fallback`).
    """
    g = rollouts.group_size
    pos, neg, has_neg, chosen = [], [[] for _ in range(config.num_neg)], [], []
    for p, prompt in enumerate(rollouts.prompts):
        rows = slice(p * g, (p + 1) * g)
        wrong = select_wrong_answers(
            rewards.answers[rows],
            rewards.reward[rows].tolist(),
            rewards.accuracy[rows].tolist(),
            choice=config.neg_choice,
            k=config.num_neg,
            texts=rollouts.texts[rows],
        )
        chosen.append(wrong)
        base = prompt.prefix(with_images=bool(config.teacher_images))
        pos_prefix = base.extend(hint_ids(tokenizer, config.hint_template, prompt.example.answer))
        neg_prefixes = [pos_prefix] * config.num_neg  # placeholders: never scored without r-
        if wrong:
            cycled = [wrong[k % len(wrong)] for k in range(config.num_neg)]
            neg_prefixes = [
                base.extend(hint_ids(tokenizer, config.hint_template, a)) for a in cycled
            ]
        for _ in range(g):
            pos.append(pos_prefix)
            has_neg.append(bool(wrong))
            for k in range(config.num_neg):
                neg[k].append(neg_prefixes[k])
    return TeacherContexts(pos, neg, torch.tensor(has_neg, dtype=torch.bool), chosen)


def hint_ids(tokenizer, template: str, answer: str) -> torch.Tensor:
    """Token ids [H] of the hint ``template.format(answer=answer)`` (no special tokens)."""
    text = template.format(answer=answer) if template else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Per-token results for all N rollouts, [N, T]; 0 at padding."""

    old_logprobs: torch.Tensor  # log P_S(y_t) under the sampling model (PPO's pi_old)
    pos_logprobs: torch.Tensor  # log P_T+(y_t) (= old_logprobs on rows not teacher-scored)
    neg_logprobs: torch.Tensor  # log P_T-(y_t), mixture when K > 1
    delta: torch.Tensor  # pos - neg
    weight: torch.Tensor  # clipped w_t (1 where not scored)
    token_advantages: torch.Tensor  # Â_t
    teacher_scored: torch.Tensor  # [N] bool: rows whose teachers were run (A != 0)
    backend: str  # cepo_kernels backend that ran


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
) -> Scores:
    """Old log-probs, Δ, w and Â for every response token, one kernel call per micro-batch.

    `advantages` [N] are the GRPO advantages. ``algo="rlsd"`` replaces the wrong-answer teacher by
    the student (docs/METHOD.md, "Advantages"), so only the r+ teacher runs. Rows with A = 0 get
    Â = 0 whatever the teachers say, so their teacher forwards are skipped and their teacher
    log-probs are reported equal to the student's. A group without a usable r- takes the student
    (``neg_fallback="student"``: RLSD for that group) or the r+ teacher (``"positive"``: Δ = 0,
    GRPO).
    """
    if algo not in ("cepo", "rlsd"):
        raise ValueError(f"algo must be 'cepo' or 'rlsd', got {algo!r}")
    if config.teacher_model == "base" and not hasattr(model, "disable_adapter"):
        raise ValueError("teacher_model='base' needs a peft model (adapters to disable)")
    weight, bias = output_head(model)
    device = weight.device
    n, width = rollouts.response_ids.shape
    labels_all = rollouts.response_ids.masked_fill(~rollouts.response_mask.bool(), IGNORE_INDEX)
    out = {f: torch.zeros(n, width) for f in _FIELDS}
    out["token_weight"].fill_(1.0)
    scored = advantages.cpu() != 0
    backend_used = backend
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, config.micro_batch_size):
            rows = list(range(start, min(n, start + config.micro_batch_size)))
            t = max(int(rollouts.response_mask[rows].sum(1).max()), 1)  # drop shared padding
            policy_h, pos_h, neg_h = _micro_batch_hidden(
                model, rollouts, contexts, config, rows, t, scored, algo, device
            )
            labels = labels_all[rows, :t].to(device)  # [b, t]
            ev = contrastive_evidence(
                policy_h,
                pos_h,
                neg_h,
                weight,
                labels,
                advantages[rows].float().to(device),
                lam=lam,
                eps_w=eps_w,
                bias=bias,
                temperature=temperature,
                backend=backend,
            )
            backend_used = ev.backend
            valid = labels != IGNORE_INDEX
            for f in _FIELDS:
                fill = 1.0 if f == "token_weight" else 0.0
                out[f][rows, :t] = torch.where(valid, getattr(ev, f).float(), fill).cpu()
    finally:
        model.train(was_training)
    return Scores(
        old_logprobs=out["policy"],
        pos_logprobs=out["pos"],
        neg_logprobs=out["neg"],
        delta=out["delta"],
        weight=out["token_weight"],
        token_advantages=out["advantages"],
        teacher_scored=scored,
        backend=backend_used,
    )


_FIELDS = ("policy", "pos", "neg", "delta", "token_weight", "advantages")


def _micro_batch_hidden(model, rollouts, contexts, config, rows, t, scored, algo, device):
    """Hidden states [b, t, D] of the student, the r+ teacher and the r- teacher(s) for `rows`.

    The r- tensor is [K, b, t, D] when K > 1. Rows that need no teacher reuse the student's.
    """
    resp_ids = rollouts.response_ids[rows, :t]
    resp_mask = rollouts.response_mask[rows, :t]

    def forward(prefixes: list[Prefix], sub: list[int]) -> torch.Tensor:
        inputs = collate(prefixes, rollouts.pad_token_id, resp_ids[sub], resp_mask[sub])
        return response_hidden(model, inputs.to(device), t)

    policy_h = response_hidden(model, rollouts.student_inputs(rows, width=t).to(device), t)
    pos_h = policy_h.clone()
    negs = [policy_h.clone() for _ in range(config.num_neg)]
    active = [i for i, r in enumerate(rows) if scored[r]]
    if active:
        # every teacher row of the micro-batch in one forward: r+ rows, then each r- set
        targets = [(pos_h, active, [contexts.pos[rows[i]] for i in active])]
        with_neg = [i for i in active if contexts.has_neg[rows[i]]]
        if algo == "cepo" and with_neg:
            targets += [(negs[k], with_neg, [contexts.neg[k][rows[i]] for i in with_neg])
                        for k in range(config.num_neg)]
        with _teacher_weights(model, config):
            hidden = forward([p for _, _, prefixes in targets for p in prefixes],
                             [i for _, sub, _ in targets for i in sub])
        for (out, sub, _), part in zip(targets, hidden.split([len(s) for _, s, _ in targets])):
            out[sub] = part
        if algo == "cepo" and config.neg_fallback == "positive":
            fallback = [i for i in active if not contexts.has_neg[rows[i]]]
            for k in range(config.num_neg):
                negs[k][fallback] = pos_h[fallback]
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
) -> Scores:
    """GRPO scoring (λ = 0 or no teachers): old log-probs only, Â = A on every response token."""
    weight, bias = output_head(model)
    device = weight.device
    n, width = rollouts.response_ids.shape
    mask = rollouts.response_mask.bool()
    labels_all = rollouts.response_ids.masked_fill(~mask, IGNORE_INDEX)
    policy = torch.zeros(n, width)
    backend_used = backend
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, micro_batch_size):
            rows = list(range(start, min(n, start + micro_batch_size)))
            t = max(int(rollouts.response_mask[rows].sum(1).max()), 1)
            inputs = rollouts.student_inputs(rows, width=t)
            hidden = response_hidden(model, inputs.to(device), t)  # [b, t, D]
            labels = labels_all[rows, :t].to(device)
            lp = fused_linear_logprobs(
                hidden, weight, labels, bias=bias, temperature=temperature, backend=backend
            )
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
        weight=torch.ones(n, width),
        token_advantages=token_adv,
        teacher_scored=torch.zeros(n, dtype=torch.bool),
        backend=backend_used,
    )
