"""How often math-verify (cepo's grader) and mathruler (the reference code's) agree.

    python -m bench.grader_agreement        # writes bench/results/grader_agreement.json

A fixed probe set of (answer, ground truth) pairs of the kinds Geo3k answers take (numbers,
fractions, radicals, π, pairs, units, degrees, unboxed "None"), each with the verdict a careful
human gives. Both graders run through `cepo.grading.Grader` (child process, 5 s limit per pair),
so the numbers are those a training run sees. tests/cepo/test_grader_mathruler.py checks that
the committed file still matches what both graders say.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "grader_agreement.json"

# (answer, ground truth, equal for a careful human)
PROBES: list[tuple[str, str, bool]] = [
    # plain numbers
    ("3", "3", True), ("3.0", "3", True), ("03", "3", True), ("3", "4", False),
    ("-2", "2", False), ("2.50", "2.5", True), ("1,000", "1000", True), ("1e3", "1000", True),
    ("12.0", "12", True), ("14", "14.00", True), ("5.", "5", True), ("0.333", "1/3", False),
    # fractions
    ("\\frac{1}{2}", "0.5", True), ("1/2", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True), ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.33", False), ("\\frac{3}{2}", "1\\frac{1}{2}", True),
    ("\\frac{5}{2}", "2.5", True), ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("-\\frac{1}{2}", "-0.5", True), ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("8.5", "\\frac{17}{2}", True), ("2.4", "\\frac{12}{5}", True),
    ("\\frac{12}{5}", "2.5", False), ("7", "\\frac{14}{2}", True),
    # radicals and π
    ("2\\sqrt{3}", "2\\sqrt{3}", True), ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("2\\sqrt{3}", "3.464", False), ("\\sqrt{3}", "3^{1/2}", True),
    ("4\\sqrt{2}", "\\sqrt{32}", True), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{8\\sqrt{3}}{3}", "\\frac{8}{\\sqrt{3}}", True), ("5\\sqrt{2}", "5\\sqrt{3}", False),
    ("3\\sqrt{2}", "4.24", False), ("\\pi", "3.14", False), ("2\\pi", "2 \\pi", True),
    ("12\\pi", "37.70", False),
    # equations and pairs
    ("x=5", "5", True), ("\\left(2,3\\right)", "(2,3)", True), ("(2, 3)", "(3, 2)", False),
    # degrees and units
    ("30^\\circ", "30", True), ("30°", "30", True), ("45^{\\circ}", "45", True),
    ("30^\\circ", "60", False), ("5 \\text{ cm}", "5", True), ("5\\text{cm}", "5", True),
    ("12 units", "12", True), ("60 degrees", "60", True), ("5 \\text{ cm}^2", "5", True),
    # not an answer
    ("None", "5", False),
]


def measure(timeout_s: float = 5.0) -> dict:
    """Both graders' verdicts on `PROBES` and how often they agree (with each other, with a
    human)."""
    from cepo.grading import Grader

    pairs = [(a, t) for a, t, _ in PROBES]
    verdicts = {}
    for backend in ("math_verify", "mathruler"):
        grader = Grader(timeout_s=timeout_s, backend=backend)
        try:
            verdicts[backend] = grader.grade_many(pairs)
        finally:
            grader.close()
    human = [h for _, _, h in PROBES]
    mv, mr = verdicts["math_verify"], verdicts["mathruler"]
    return {
        "pairs": len(PROBES),
        "agree": sum(a == b for a, b in zip(mv, mr)),
        "math_verify_matches_human": sum(a == h for a, h in zip(mv, human)),
        "mathruler_matches_human": sum(b == h for b, h in zip(mr, human)),
        "disagreements": [
            {"answer": a, "truth": t, "human": h, "math_verify": x, "mathruler": y}
            for (a, t, h), x, y in zip(PROBES, mv, mr) if x != y
        ],
        "verdicts": [
            {"answer": a, "truth": t, "human": h, "math_verify": x, "mathruler": y}
            for (a, t, h), x, y in zip(PROBES, mv, mr)
        ],
    }


def main() -> None:
    result = measure()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"{result['agree']}/{result['pairs']} agree; math-verify matches a human on "
          f"{result['math_verify_matches_human']}, mathruler on "
          f"{result['mathruler_matches_human']} -> {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()
