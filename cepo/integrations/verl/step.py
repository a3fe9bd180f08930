"""The CEPO advantage step on the rows of a verl batch, without verl (docs/METHOD.md,
"Advantages" and "Teachers").

verl keeps every rollout as unpadded 1-D tensors (``prompts``, ``responses``, ``response_mask``)
grouped by ``uid``, in any order. This module

1. picks r- per group with the project's `cepo.negatives.select_wrong_answers`,
2. lays out the teacher rows, all of them for ONE log-prob call (T+ rows first, then T-):

       student:   prompt                 | response
       teacher:   prompt + hint(answer)  | response      hint = `hint_ids(template, answer)`

   (image-aware: a teacher row keeps the student's images and the prompt's positions),

3. reweights the group advantage A with `cepo_kernels.cepo_advantages` from the teachers'
   log-probs. A group without a usable r- takes the student as T- (``neg_fallback="student"``:
   RLSD for that group) or T+ (``"positive"``: Δ = 0, A unchanged); ``algo="rlsd"`` always takes
   the student. Rows with A = 0 everywhere, or without a ground truth, get no teacher rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cepo.contexts import hint_ids
from cepo.diagnostics import token_diagnostics
from cepo.negatives import select_wrong_answers
from cepo.scoring import neg_stand_in
from cepo_kernels import cepo_advantages

from .options import VerlCEPOOptions


@dataclass
class Rows:
    """What the step reads of one verl batch (N rows, batch order)."""

    uids: list[str]  # group id per row
    prompts: list[torch.Tensor]  # [L_i] prompt token ids, unpadded
    responses: list[torch.Tensor]  # [T_i]
    response_mask: list[torch.Tensor]  # [T_i] 1 at tokens the loss counts
    advantages: torch.Tensor  # [N, T] GRPO A per token (response_mask applied), 0 beyond T_i
    student_logprobs: torch.Tensor  # [N, T] old log-probs (the RLSD stand-in for T-)
    scores: torch.Tensor  # [N] sequence reward
    ground_truths: list[str | None]
    answers: list[str | None]  # extracted final answers (None: none)
    accuracy: list[float]  # grader verdict, 0 = rejected
    texts: list[str]  # decoded responses (the reference r- choice reads them)
    order: list[int] = field(default_factory=list)  # sampling index within the group
    # per row [L_i] or, for M-RoPE models, [D, L_i] positions of prompt + response (None: text)
    position_ids: list[torch.Tensor] | None = None
    multi_modal_inputs: list[dict] | None = None  # per row, copied to its teacher rows

    def __post_init__(self):
        n = len(self.uids)
        for name in ("prompts", "responses", "response_mask", "ground_truths", "answers",
                     "accuracy", "texts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Rows.{name} has {len(getattr(self, name))} entries for {n} rows")
        for name in ("advantages", "student_logprobs"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n or t.shape[1] < self.width:
                raise ValueError(f"Rows.{name} must be [N={n}, T>={self.width}], got "
                                 f"{tuple(t.shape)}")
        if not self.order:
            self.order = list(range(n))

    @property
    def width(self) -> int:
        return max((len(r) for r in self.responses), default=0)

    def padded_mask(self) -> torch.Tensor:
        """[N, T] bool response mask."""
        out = torch.zeros(len(self.uids), self.width, dtype=torch.bool)
        for i, m in enumerate(self.response_mask):
            out[i, : len(m)] = m.bool()
        return out


@dataclass
class TeacherRow:
    """One row to score: ``prompts`` = prompt + hint, ``responses`` unchanged."""

    source: int  # the batch row it scores
    kind: str  # "pos" or "neg<k>"
    prompts: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    position_ids: torch.Tensor  # [L] or [D, L] of prompt + hint + response
    multi_modal_inputs: dict | None = None  # the student row's (its images), unchanged


@dataclass
class TeacherPlan:
    rows: list[TeacherRow]  # T+ rows, then T- rows: one log-prob call
    wrong: dict[str, list[str]]  # uid -> the chosen r- (may be empty)
    scored: torch.Tensor  # [N] bool: rows with teacher rows


def group_rows(rows: Rows) -> dict[str, list[int]]:
    """uid -> its row indices in sampling order (`Rows.order`), groups in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, uid in enumerate(rows.uids):
        groups.setdefault(uid, []).append(i)
    return {u: sorted(ix, key=lambda i: (rows.order[i], i)) for u, ix in groups.items()}


def plan_teachers(rows: Rows, options: VerlCEPOOptions, tokenizer,
                  placeholder_ids: Sequence[int] = ()) -> TeacherPlan:
    """r- per group and the teacher rows of every row that needs them.

    ``teacher_images=False`` gives rows with images the reference code's image-blind teachers:
    every image/video placeholder token (`placeholder_ids`) becomes the pad token, no pixels are
    attached and all positions are text positions.
    """
    cfg = options.teacher
    blind = not cfg.teacher_images
    pad_id = getattr(tokenizer, "pad_token_id", None)
    wrong: dict[str, list[str]] = {}
    for uid, ix in group_rows(rows).items():
        wrong[uid] = select_wrong_answers(
            [rows.answers[i] for i in ix], [float(rows.scores[i]) for i in ix],
            [rows.accuracy[i] for i in ix], choice=cfg.neg_choice, k=cfg.num_neg,
            texts=[rows.texts[i] for i in ix]) if options.algo == "cepo" else []
    scored = torch.tensor([bool((rows.advantages[i] != 0).any()) and rows.ground_truths[i]
                           is not None for i in range(len(rows.uids))], dtype=torch.bool)
    hints: dict[str, torch.Tensor] = {}

    def hinted(i: int, answer: str, kind: str) -> TeacherRow:
        if answer not in hints:
            hints[answer] = hint_ids(tokenizer, cfg.hint_template, answer)
        prompt, hint, response = rows.prompts[i], hints[answer], rows.responses[i]
        student = rows.position_ids[i] if rows.position_ids is not None else None
        mm = rows.multi_modal_inputs[i] if rows.multi_modal_inputs is not None else None
        total = len(prompt) + len(hint) + len(response)
        if blind and mm:
            if not placeholder_ids or pad_id is None:
                raise ValueError("image-blind teachers (teacher_images=False) need the image "
                                 "placeholder token ids and a tokenizer with a pad token")
            marks = torch.tensor(list(placeholder_ids), dtype=prompt.dtype)
            prompt = prompt.masked_fill(torch.isin(prompt, marks), pad_id)
            positions = torch.arange(total, dtype=torch.int64)
            if student is not None and student.dim() > 1:
                positions = positions.expand(*student.shape[:-1], total).clone()
            mm = None
        else:
            positions = teacher_position_ids(student, len(prompt), len(hint), len(response))
        return TeacherRow(i, kind, torch.cat([prompt, hint.to(prompt.dtype)]), response,
                          rows.response_mask[i], positions, mm or None)

    active = scored.nonzero().flatten().tolist()
    out = [hinted(i, str(rows.ground_truths[i]), "pos") for i in active]
    for k in range(cfg.num_neg):  # a group with fewer than K answers cycles them
        out += [hinted(i, wrong[rows.uids[i]][k % len(wrong[rows.uids[i]])], f"neg{k}")
                for i in active if wrong[rows.uids[i]]]
    return TeacherPlan(out, wrong, scored)


def teacher_position_ids(student: torch.Tensor | None, prompt_len: int, hint_len: int,
                         response_len: int) -> torch.Tensor:
    """Positions of prompt + hint + response from the student row's positions.

    The prompt keeps its own (with M-RoPE, the image's grid positions: the images are the
    student's); the hint and the response are text after the prompt, so every position row
    continues one step per token from where the student's response started. That is what the
    model's rope index gives for the longer prompt, without the processor; a student row whose
    response positions are not such a run is refused.
    """
    total = prompt_len + hint_len + response_len
    if student is None:
        return torch.arange(total, dtype=torch.int64)
    flat = student.reshape(-1, student.shape[-1])  # [D, Lp + T]
    if flat.shape[1] != prompt_len + response_len or response_len == 0:
        raise ValueError(f"position_ids of shape {tuple(student.shape)} do not cover a prompt of "
                         f"{prompt_len} and a response of {response_len} tokens")
    start = flat[:, prompt_len: prompt_len + 1]  # [D, 1] the first response token's
    if not torch.equal(flat[:, prompt_len:], start + torch.arange(response_len)):
        raise ValueError("the response's position_ids are not consecutive text positions: cannot "
                         "place a hint before it")
    out = torch.cat([flat[:, :prompt_len], start + torch.arange(hint_len + response_len)], dim=1)
    return out.reshape(*student.shape[:-1], total).to(student.dtype)


def teacher_fields(plan: TeacherPlan) -> dict[str, list]:
    """The teacher rows as verl's agent loop stores a rollout (unpadded tensors per row, plus
    ``multi_modal_inputs`` when the rows have images)."""
    fields: dict[str, list] = {k: [] for k in (
        "prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids")}
    for row in plan.rows:
        ids = torch.cat([row.prompts, row.responses.to(row.prompts.dtype)])
        fields["prompts"].append(row.prompts)
        fields["responses"].append(row.responses)
        fields["response_mask"].append(row.response_mask)
        fields["loss_mask"].append(row.response_mask)
        fields["input_ids"].append(ids)
        fields["position_ids"].append(row.position_ids)
    if any(row.multi_modal_inputs for row in plan.rows):
        fields["multi_modal_inputs"] = [row.multi_modal_inputs or {} for row in plan.rows]
    return fields


@dataclass
class StepResult:
    advantages: torch.Tensor  # [N, T] Â (0 beyond each response)
    pos_logprobs: torch.Tensor  # [N, T] log P_T+ (student's where not scored)
    neg_logprobs: torch.Tensor  # [N, T] log P_T- (after fallback)
    delta: torch.Tensor  # [N, T]
    has_neg: torch.Tensor  # [N] bool: T- was a wrong-answer teacher
    metrics: dict[str, float]


def reweight(rows: Rows, plan: TeacherPlan, teacher_logprobs: Sequence[torch.Tensor],
             options: VerlCEPOOptions, lam: float) -> StepResult:
    """Â from the teachers' per-response-token log-probs (one [T_i] tensor per teacher row)."""
    if len(teacher_logprobs) != len(plan.rows):
        raise ValueError(f"{len(teacher_logprobs)} teacher log-prob rows for "
                         f"{len(plan.rows)} teacher rows")
    n, width = rows.advantages.shape
    mask = torch.zeros(n, width, dtype=torch.bool)
    mask[:, : rows.width] = rows.padded_mask()
    student = rows.student_logprobs.float()
    pos = student.clone()
    negs = [student.clone() for _ in range(options.teacher.num_neg)]
    has_neg = torch.zeros(n, dtype=torch.bool)
    for row, lp in zip(plan.rows, teacher_logprobs):
        t = len(row.responses)
        if lp.shape != (t,):
            raise ValueError(f"teacher log-probs of row {row.source} ({row.kind}) have shape "
                             f"{tuple(lp.shape)}, expected ({t},)")
        if row.kind == "pos":
            pos[row.source, :t] = lp.float()
        else:
            negs[int(row.kind[3:])][row.source, :t] = lp.float()
            has_neg[row.source] = True
    fallback = plan.scored & ~has_neg  # T- of these rows: the project's stand-in
    stand_in = neg_stand_in(student, pos, algo=options.algo,
                            neg_fallback=options.teacher.neg_fallback)
    for neg in negs:
        neg[fallback] = stand_in[fallback]
    if len(negs) == 1:
        neg = negs[0]
    else:  # K wrong answers mix as logmeanexp_k (as the fused scoring does)
        neg = torch.logsumexp(torch.stack(negs), dim=0) - math.log(len(negs))
    adv = rows.advantages.float() * mask
    eps_w = options.eps_w
    a_hat = cepo_advantages(adv, pos, neg, mask, lam=lam, eps_w=eps_w)
    keep = plan.scored[:, None]  # rows without teachers keep A
    a_hat = torch.where(keep, a_hat, adv)
    delta = torch.where(keep & mask, pos - neg, 0.0)
    metrics = diagnostics(rows, plan, adv, delta, mask, has_neg, lam, eps_w)
    return StepResult(a_hat, pos, neg, delta, has_neg, metrics)


def diagnostics(rows: Rows, plan: TeacherPlan, adv: torch.Tensor, delta: torch.Tensor,
                mask: torch.Tensor, has_neg: torch.Tensor, lam: float,
                eps_w: float) -> dict[str, float]:
    """``cepo/*`` scalars: Δ by the sign of A, wrong-direction shares, clipping, r- coverage."""
    scored = mask & plan.scored[:, None]
    sign = torch.sign(adv)
    metrics = {"cepo/lambda": float(lam), "cepo/teacher_rows": float(len(plan.rows)),
               "cepo/rows_scored": float(plan.scored.sum()),
               "cepo/rows_fallback": float((plan.scored & ~has_neg).sum())}
    groups = group_rows(rows)
    mixed = [u for u, ix in groups.items() if len({float(rows.scores[i]) for i in ix}) > 1]
    metrics["cepo/frac_groups_with_neg"] = (
        sum(bool(plan.wrong.get(u)) for u in mixed) / len(mixed) if mixed else 0.0)
    if scored.any():
        seq_adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N] A of each row
        # clipped w_t: with λ = 1 and |A| = 1, Â = sign(A)·w_t
        weight = cepo_advantages(sign, delta, torch.zeros_like(delta), mask, lam=1.0,
                                 eps_w=eps_w) * sign
        metrics.update(token_diagnostics(delta, seq_adv, scored, weight, eps_w=eps_w))
    return metrics

