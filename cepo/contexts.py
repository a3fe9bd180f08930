"""Teacher contexts (docs/METHOD.md, "Teachers"): the prefixes the r+ and r− teachers score
every response after.

Both teachers are the student model with a hint between the prompt and the response:

    student:        [pad | prompt                 | response]
    teacher r+/r-:  [pad | prompt + hint(answer)  | response]     hint = template.format(answer=...)

r+ is the ground truth; r− a wrong answer of a rejected rollout of the same group
(`cepo.negatives`). The scoring itself is `cepo.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cepo.batch import Prefix
from cepo.negatives import NEG_CHOICES, NegChoice, select_wrong_answers
from cepo.reward import Rewards
from cepo.rollout import Rollouts

NEG_FALLBACKS = ("student", "positive")


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher contexts are built; defaults are docs/METHOD.md, "Teachers" and "Presets"
    (preset `paper`)."""

    hint_template: str = " {answer}"  # r+ and r- always share it, so only the answer differs
    # False: image-blind as the reference's CEPO teachers (pads for the image); None: by algorithm,
    # False for cepo, True for rlsd (the reference's RLSD teacher sees the image)
    teacher_images: bool | None = True  # False: image-blind (reference); None: False for cepo
    # worst: lowest-reward rejected rollout with a boxed answer; most_frequent: the commonest
    # wrong answer; reference: the reference code's (lowest reward below 0.5, boxed or not)
    neg_choice: NegChoice = "worst"  # reference: the reference code's (unboxed allowed, " None")
    num_neg: int = 1  # K wrong answers; K > 1 mixes them as logmeanexp_k (extension)
    neg_fallback: Literal["student", "positive"] = "student"  # group without a usable r-
    teacher_model: Literal["actor", "base"] = "actor"  # "base": peft adapters disabled
    micro_batch_size: int = 8  # rollouts per scoring forward

    def __post_init__(self):
        if "{answer}" not in self.hint_template and self.hint_template:
            raise ValueError(f"hint_template must contain '{{answer}}', got {self.hint_template!r}")
        if self.neg_choice not in NEG_CHOICES:
            raise ValueError(
                f"neg_choice must be one of {', '.join(NEG_CHOICES)}, got {self.neg_choice!r}"
            )
        if self.neg_fallback not in NEG_FALLBACKS:
            raise ValueError(
                f"neg_fallback must be 'student' or 'positive', got {self.neg_fallback!r}"
            )
        if self.teacher_model not in ("actor", "base"):
            raise ValueError(f"teacher_model must be 'actor' or 'base', got {self.teacher_model!r}")
        if self.num_neg < 1 or self.micro_batch_size < 1:
            raise ValueError("num_neg and micro_batch_size must be >= 1")


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
