"""The choice of r−, the wrong answer shown to the T− teacher (docs/METHOD.md, "Teachers").

One function for both trainers: the native one picks from the graded rollouts of a group
(`cepo.contexts.build_teacher_contexts`), the TRL one from the gathered verdicts of its
generation batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cepo.config import NEG_CHOICES, REFERENCE_THRESHOLD, NegChoice
from cepo.grading import normalize_answer


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
