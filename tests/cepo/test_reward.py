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
