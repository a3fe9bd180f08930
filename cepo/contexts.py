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

import torch

from cepo.batch import Prefix
from cepo.config import TeacherConfig
from cepo.negatives import select_wrong_answers
from cepo.reward import Rewards
from cepo.rollout import Rollouts

# what T− is for a group without a usable r− (`cepo.scoring.neg_stand_in`)
NEG_FALLBACKS = ("student", "positive")


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
