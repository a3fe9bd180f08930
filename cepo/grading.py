"""Answer extraction and equivalence grading with a hard time limit.

`extract_boxed` takes the last ``\\boxed{...}`` of a response (brace-matched, in one linear pass:
it runs in the parent, outside any time limit, on text the policy wrote). `Grader` decides
whether an extracted answer equals the ground truth: an exact match after light normalisation is
settled here; everything else goes to math-verify (symbolic/numeric equivalence, e.g.
``\\frac{1}{2}`` = ``0.5``) in a child process. The child is why: sympy can spin inside C code
where no signal reaches it, so the only limit that always holds is killing the process. A graded
answer that runs past the limit counts as wrong, the child is restarted and the step goes on. A
batch has a budget too (`Grader.batch_budget_s`): once it is spent, the answers still waiting are
scored 0 without grading and counted (`Grader.skipped`), so one step cannot take
answers x limit.

``backend="mathruler"`` grades with mathruler's `grade_answer` instead (the reference code's
grader; an optional extra, ``pip install 'cepo[mathruler]'``), in the same child, with the same
limit, and without the exact-match shortcut, so its verdicts are mathruler's own.

This module must not import torch: the child runs ``python -m cepo.grading`` and should start in
about a second.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 120.0
DEFAULT_BATCH_BUDGET_S = 120.0  # math-verify time per graded batch, over all its answers
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACES = re.compile(r"[{}]")
GRADERS = ("math_verify", "mathruler")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in `text`, or None when there is none.

    An unclosed last box (a truncated response) falls back to the last complete one before it.
    One pass over the braces with a stack of open ones: linear in len(text), however many boxes
    are left open.
    """
    openers = {match.end() - 1 for match in _BOXED.finditer(text)}  # each box's "{"
    if not openers:
        return None
    stack: list[int] = []
    last: tuple[int, int] | None = None  # (open, close) of the complete box opened last
    for brace in _BRACES.finditer(text):
        i = brace.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:  # a "}" closes the innermost open brace; a stray one closes nothing
            start = stack.pop()
            if start in openers and (last is None or start > last[0]):
                last = (start, i)
    return None if last is None else text[last[0] + 1 : last[1]].strip()


_STRIP = (
    (re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\$"), ""),
    (re.compile(r"\^\s*\{?\\circ\}?|°|\\degree"), ""),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\s+"), ""),
    (re.compile(r"\.$"), ""),
)


def normalize_answer(answer: str) -> str:
    """Light canonical form for the fast exact-match path and for de-duplicating wrong answers:
    no spaces, ``$``, ``\\left``/``\\right``, degree marks or trailing full stop."""
    for pattern, repl in _STRIP:
        answer = pattern.sub(repl, answer)
    return answer


def _math_verify_equal(answer: str, ground_truth: str, timeout_s: int) -> bool:
    """math-verify's verdict (gold first: it is not symmetric). Runs inside the child process."""
    from math_verify import parse, verify

    gold = parse(f"${ground_truth}$", parsing_timeout=timeout_s)
    pred = parse(f"${answer}$", parsing_timeout=timeout_s)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout_s))


def _mathruler_equal(answer: str, ground_truth: str) -> bool:
    """mathruler's verdict (the reference code's grader). Runs inside the child process."""
    from mathruler.grader import grade_answer

    return bool(grade_answer(answer, ground_truth))


def check_grader(backend: str) -> None:
    """Refuse an unknown grader, or mathruler when it is not installed, before any work."""
    if backend not in GRADERS:
        raise ValueError(f"grader must be one of {', '.join(GRADERS)}, got {backend!r}")
    if backend == "mathruler":
        import importlib.util

        missing = [m for m in ("mathruler", "pylatexenc") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"grader 'mathruler' needs {' and '.join(missing)}: pip install 'cepo[mathruler]' "
                "(or use grader=math_verify)"
            )


class Grader:
    """Grades (answer, ground truth) pairs; math-verify runs in a child with a per-pair deadline
    and a per-batch budget.

    The child starts on first use and is reused; `close()` (also registered at exit) ends it.
    """

    def __init__(self, timeout_s: float = 5.0, batch_budget_s: float = DEFAULT_BATCH_BUDGET_S,
                 *, backend: str = "math_verify"):
        for name, value in (("timeout_s", timeout_s), ("batch_budget_s", batch_budget_s)):
            if not 0 < value < float("inf"):  # also refuses NaN
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        check_grader(backend)
        self.backend = backend
        self.timeout_s = timeout_s
        self.batch_budget_s = batch_budget_s
        self.timeouts = 0  # pairs that ran past the limit, over the grader's lifetime
        self.skipped = 0  # pairs scored 0 ungraded because their batch's budget was spent
        self._startup_s = 0.0  # seconds spent starting children: never charged to a budget
        self._proc: subprocess.Popen | None = None
        atexit.register(self.close)

    def grade(self, answer: str | None, ground_truth: str) -> bool:
        return self.grade_many([(answer, ground_truth)])[0]

    def grade_many(
        self, pairs: list[tuple[str | None, str]], *, budget_s: float | None = None
    ) -> list[bool]:
        """One verdict per pair; math-verify gets `budget_s` seconds for the whole batch
        (default `batch_budget_s`), after which the pairs still waiting count as wrong."""
        budget_s = self.batch_budget_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget_s - self._startup_s
        results: list[bool | None] = []
        for answer, truth in pairs:
            if answer is None or not answer.strip():
                results.append(False)
            elif self.backend == "math_verify" and normalize_answer(answer) == normalize_answer(
                truth
            ):
                results.append(True)
            else:
                results.append(None)  # needs math-verify
        skipped = 0
        for i, (answer, truth) in enumerate(pairs):
            if results[i] is None:
                left = deadline + self._startup_s - time.monotonic()
                if left <= 0:
                    skipped += 1
                    results[i] = False
                else:
                    results[i] = self._ask_child(answer, truth, min(self.timeout_s, left))
        if skipped:
            self.skipped += skipped
            logger.warning("grading budget of %.3gs for the batch spent: %d answer(s) counted as "
                           "wrong without grading", budget_s, skipped)
        return [bool(r) for r in results]

    def _ask_child(self, answer: str, truth: str, limit_s: float) -> bool:
        request = json.dumps({"answer": answer, "truth": truth}) + "\n"
        for attempt in range(2):  # a child that died between requests is restarted once
            proc = self._child()
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
                break
            except BrokenPipeError:
                self.close()
                if attempt:
                    raise RuntimeError("the grading child keeps exiting") from None
        line = self._read_line(proc, limit_s + 1.0)  # 1 s for the pipe round trip
        if line is None:
            self.timeouts += 1
            logger.warning(
                "grading %r against %r exceeded %.0fs; counted as wrong",
                answer[:80],
                truth[:80],
                limit_s,
            )
            self.close()
            return False
        return bool(json.loads(line)["equal"])

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                return None
        line = proc.stdout.readline()
        return line or None

    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so `-m cepo.grading` finds this package
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cepo.grading", "--worker", str(max(1, int(self.timeout_s))),
             self.backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        # The child says when math-verify is imported, so start-up never counts against a pair.
        clock = time.monotonic()
        ready = self._read_line(self._proc, _STARTUP_TIMEOUT_S)
        self._startup_s += time.monotonic() - clock
        if ready is None:
            self.close()
            raise RuntimeError(
                f"the grading child (python -m cepo.grading) did not start within "
                f"{_STARTUP_TIMEOUT_S:.0f}s; check that math-verify is installed"
            )
        return self._proc

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            self._proc = None


def _worker(timeout_s: int, backend: str = "math_verify") -> None:
    """Child loop: one JSON request per stdin line, one ``{"equal": bool}`` per stdout line."""
    logging.disable(logging.WARNING)  # math-verify logs parse failures; the parent reads stdout
    if backend == "mathruler":
        import mathruler.grader  # noqa: F401 - import before saying ready

        def equal_fn(answer, truth):
            return _mathruler_equal(answer, truth)
    else:
        import math_verify  # noqa: F401 - import before saying ready

        def equal_fn(answer, truth):
            return _math_verify_equal(answer, truth, timeout_s)

    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            equal = equal_fn(request["answer"], request["truth"])
        except Exception:  # noqa: BLE001 - a grader error means "not shown equal"
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), *sys.argv[3:])
    else:
        sys.exit("usage: python -m cepo.grading --worker TIMEOUT_SECONDS [math_verify|mathruler]")
