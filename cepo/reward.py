"""The Geo3k reward of docs/METHOD.md, "Grading and reward": 0.9 · accuracy + 0.1 · format.

format   = the response contains a complete ``\\boxed{...}``;
accuracy = the content of the last one grades equal to the ground truth (`cepo.grading`).
Both are reported separately, and the extracted answers are kept: the teacher module picks its
wrong answers r- from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cepo.grading import Grader, extract_boxed

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1


@dataclass
class Rewards:
    """Per-rollout reward and its parts, N = prompts x group size."""

    reward: torch.Tensor  # [N] fp32, 0.9 * accuracy + 0.1 * format
    accuracy: torch.Tensor  # [N] fp32 in {0, 1}
    format: torch.Tensor  # [N] fp32 in {0, 1}
    answers: list[str | None]  # N extracted final answers (None: no complete \boxed{})


def compute_rewards(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    grader: Grader,
    *,
    budget_s: float | None = None,
) -> Rewards:
    """Score every response against its ground truth (one ground truth per response); grading
    gets `budget_s` seconds for the batch (default: the grader's `batch_budget_s`)."""
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"{len(responses)} responses but {len(ground_truths)} ground truths; "
            "pass one per response"
        )
    answers = [extract_boxed(text) for text in responses]
    correct = grader.grade_many(list(zip(answers, ground_truths)), budget_s=budget_s)
    accuracy = torch.tensor(correct, dtype=torch.float32)
    fmt = torch.tensor([a is not None for a in answers], dtype=torch.float32)
    return Rewards(
        reward=ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt,
        accuracy=accuracy,
        format=fmt,
        answers=answers,
    )
