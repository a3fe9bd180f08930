"""Answer extraction, equivalence grading with a hard time limit, and the 0.9/0.1 reward."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from cepo.grading import Grader, extract_boxed, normalize_answer
from cepo.reward import compute_rewards


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{12}.", "12"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one counts
        ("\\boxed{ \\sqrt{2} + {3} }", "\\sqrt{2} + {3}"),  # nested braces
        ("\\boxed{3} and a cut-off \\boxed{4", "3"),  # unclosed last box: fall back
        ("\\boxed {7}", "7"),
        ("\\boxed{}", ""),
        ("no box at all", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "answer, truth, equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("60^\\circ", "60", True),
        ("60^{\\circ}", "60", True),
        ("3.60", "3.6", True),
        ("2\\sqrt{221}", "2 \\sqrt{221}", True),
        ("\\sqrt{884}", "2\\sqrt{221}", True),
        ("x = 5", "5", True),
        ("12", "13", False),
        ("13.33", "\\frac{40}{3}", False),
        ("abc", "12", False),
        (None, "12", False),
        ("", "12", False),
    ],
)
def test_grader_equivalence(grader, answer, truth, equal):
    assert grader.grade(answer, truth) is equal


def test_normalize_answer():
    assert normalize_answer(" $ 45^\\circ $. ") == "45"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"


def test_a_hung_grader_is_killed_and_replaced():
    """A child that stops answering costs one time limit, counts as wrong, and is replaced."""
    grader = Grader(timeout_s=1.0)
    try:
        assert grader.grade("\\frac{2}{4}", "0.5")  # starts the child
        child = grader._proc
        os.kill(child.pid, signal.SIGSTOP)  # hangs like sympy stuck in C code
        assert grader.grade("\\frac{3}{6}", "0.5") is False
        assert grader.timeouts == 1
        assert child.poll() is not None  # the hung child was killed
        assert grader.grade("\\frac{4}{8}", "0.5")  # a fresh child answers again
        assert grader._proc.pid != child.pid
    finally:
        grader.close()


def test_a_dead_grader_is_restarted(grader):
    assert grader.grade("\\frac{1}{4}", "0.25")
    grader._proc.kill()
    grader._proc.wait()
    assert grader.grade("\\frac{2}{8}", "0.25") and grader.timeouts == 0


def test_grader_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)


def test_rewards_formula(grader):
    responses = [
        "The answer is \\boxed{0.5}.",  # correct, formatted
        "The answer is \\boxed{7}.",  # wrong, formatted
        "The answer is 0.5",  # right number, but no box: no format, no accuracy
        "\\boxed{1} at first, finally \\boxed{\\frac{1}{2}}",  # last box counts
    ]
    r = compute_rewards(responses, ["\\frac{1}{2}"] * 4, grader)
    torch.testing.assert_close(r.accuracy, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(r.format, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(r.reward, torch.tensor([1.0, 0.1, 0.0, 1.0]))
    assert r.answers == ["0.5", "7", None, "\\frac{1}{2}"]
    with pytest.raises(ValueError, match="one per response"):
        compute_rewards(responses, ["1"], grader)


def _extract_reference(text: str) -> str | None:
    """The straightforward definition (quadratic): from the last box back, the first whose braces
    close."""
    import re

    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end():i].strip()
    return None


def test_extract_boxed_agrees_with_the_definition_on_random_text():
    import random

    rng = random.Random(0)
    pieces = ["\\boxed{", "\\boxed {", "{", "}", "}", "a", "1 ", "\\frac"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert extract_boxed(text) == _extract_reference(text), text


def test_extract_boxed_on_adversarial_text_is_linear():
    """10,000 unclosed boxes and 1 MB answers: the old scan from every box to the end of the text
    took 18 s on the first and hours on the 1 MB of unclosed boxes; now one pass each."""
    opened = "\\boxed{" * 10_000
    assert extract_boxed(opened) is None
    megabyte = "\\boxed{" * 150_000  # 1.05 MB, every box open
    assert extract_boxed(megabyte) is None and extract_boxed(megabyte + "\\boxed{5}") == "5"
    assert extract_boxed("\\boxed{7} " + opened) == "7"
    assert extract_boxed(opened + "\\boxed{42}") == "42"
    assert extract_boxed("\\boxed{1}" + "{" * 1_000_000) == "1"
    assert extract_boxed("\\boxed{" + "x" * 1_000_000 + "}") == "x" * 1_000_000
    assert extract_boxed(("\\boxed{" + "}" * 3) * 100_000) == ""


def test_a_batch_stops_grading_when_its_budget_is_spent():
    """A hung child costs one time limit; the rest of the batch is then scored 0 ungraded."""
    grader = Grader(timeout_s=1.0, batch_budget_s=1.5)
    try:
        assert grader.grade("\\frac{2}{4}", "0.5")  # starts the child
        os.kill(grader._proc.pid, signal.SIGSTOP)
        pairs = [(f"\\frac{{{k}}}{{{2 * k}}}", "0.5") for k in range(3, 8)]
        assert grader.grade_many(pairs) == [False] * 5
        assert (grader.timeouts, grader.skipped) == (1, 4)
        assert grader.grade_many(pairs[:2]) == [True, True]  # a new batch, a new budget
        assert grader.skipped == 4
    finally:
        grader.close()


def test_compute_rewards_with_a_spent_budget_still_scores_exact_matches(grader):
    texts = ["\\boxed{3}", "\\boxed{6/2}", "\\boxed{ 3 }", "no box", "\\boxed{x+1}"]
    before = grader.skipped
    rewards = compute_rewards(texts, ["3"] * 5, grader, budget_s=1e-9)
    assert rewards.accuracy.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert grader.skipped - before == 2  # only the pairs math-verify would have decided
    assert compute_rewards(texts, ["3"] * 5, grader).accuracy.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("kw", [{"timeout_s": float("inf")}, {"timeout_s": float("nan")},
                                {"batch_budget_s": 0}, {"batch_budget_s": float("inf")}])
def test_grader_limits_must_be_finite_and_positive(kw):
    with pytest.raises(ValueError, match="finite number > 0"):
        Grader(**kw)
