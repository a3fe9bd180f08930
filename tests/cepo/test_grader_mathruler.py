"""grader=mathruler (the reference code's grader) next to math-verify, on a fixed probe set.

The committed bench/results/grader_agreement.json records both graders' verdicts on the probe
pairs of `bench.grader_agreement`; this test re-grades them and requires the same verdicts, so a
changed grader (or package version) shows up here with the pairs that moved.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.grader_agreement import PROBES, RESULT
from cepo.config import ConfigError, build_config
from cepo.grading import Grader, check_grader
from cepo.reward import compute_rewards

needs_mathruler = pytest.mark.skipif(
    importlib.util.find_spec("mathruler") is None or importlib.util.find_spec("pylatexenc") is None,
    reason="the optional mathruler extra is not installed",
)


@needs_mathruler
def test_probe_verdicts_and_agreement_match_the_committed_result():
    from bench.grader_agreement import measure

    saved = json.loads(RESULT.read_text())
    now = measure()
    assert len(PROBES) >= 50 and now["pairs"] == len(PROBES) == saved["pairs"]
    moved = [(v["answer"], v["truth"]) for v, w in zip(now["verdicts"], saved["verdicts"])
             if v != w]
    assert moved == []
    assert now == saved
    # the recorded numbers are what the verdicts say
    rows = saved["verdicts"]
    assert saved["agree"] == sum(r["math_verify"] == r["mathruler"] for r in rows) == 45
    assert saved["math_verify_matches_human"] == sum(r["math_verify"] == r["human"]
                                                     for r in rows) == 50
    assert saved["mathruler_matches_human"] == sum(r["mathruler"] == r["human"]
                                                   for r in rows) == 46


@needs_mathruler
def test_mathruler_grades_rewards_without_the_exact_match_shortcut():
    """'30°' = '30' for cepo's normalising shortcut, not for mathruler: the reward follows."""
    responses = ["so \\boxed{30°}", "so \\boxed{\\frac{1}{2}}", "no box"]
    truths = ["30", "0.5", "5"]
    graders = [Grader(timeout_s=5.0), Grader(timeout_s=5.0, backend="mathruler")]
    try:
        mv, mr = (compute_rewards(responses, truths, g) for g in graders)
    finally:
        for g in graders:
            g.close()
    assert mv.accuracy.tolist() == [1.0, 1.0, 0.0]
    assert mr.accuracy.tolist() == [0.0, 1.0, 0.0]
    assert mr.format.tolist() == [1.0, 1.0, 0.0]


def test_unknown_or_missing_grader_is_refused_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="grader must be one of math_verify, mathruler"):
        Grader(backend="sympy")
    with pytest.raises(ConfigError, match="grader="):
        build_config(["--grader", "sympy"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pylatexenc" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs pylatexenc: pip install 'cepo\[mathruler\]'"):
        check_grader("mathruler")
    with pytest.raises(ConfigError, match="grader='mathruler'.*pylatexenc"):
        build_config(["--grader", "mathruler"])


@needs_mathruler
def test_grader_option_reaches_the_config():
    assert build_config(["--grader", "mathruler"]).grader == "mathruler"
    assert build_config([]).grader == "math_verify"
