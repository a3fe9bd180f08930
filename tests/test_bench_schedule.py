"""How ``python -m bench`` times its cases (fake timers and workers, nothing is measured): every
preset takes at least 3 repeats, the implementations of a shape are timed round-robin, the load
average goes into each row, and the goals table judges the policy update too."""

from __future__ import annotations

import pytest

from bench import goals as G
from bench import run
from bench.measure import Case, interleave


def _case(impl, rmin=3, rmax=5, budget=2.0, workload="scoring", n=512):
    return Case(workload=workload, impl=impl, n=n, d=8, v=16, min_repeats=rmin,
                max_repeats=rmax, budget_s=budget)


def test_interleave_is_round_robin_with_at_least_min_repeats():
    seconds = {"naive": 5.0, "ours": 0.1, "trl": 1.0}  # fake call durations
    cases = {k: _case(k) for k in seconds}
    samples = {"naive": [5.0], "ours": [], "trl": []}  # naive's memory call already timed
    order = interleave({k: (lambda k=k: seconds[k]) for k in seconds}, cases, samples)
    # naive: 3 calls in all (1 given + 2 made, budget spent); trl: 3 (3 s ≥ 2 s);
    # ours: budget never spent in 3 calls (0.3 s) -> up to max_repeats = 5
    assert [len(samples[k]) for k in ("naive", "ours", "trl")] == [3, 5, 3]
    assert order == [
        "naive", "ours", "trl",    # round 1: all three
        "naive", "ours", "trl",    # round 2: naive reaches 3
        "ours", "trl",             # round 3: trl reaches 3
        "ours", "ours"]            # rounds 4-5: ours alone up to max_repeats


def test_interleave_never_runs_one_implementation_twice_in_a_row_while_others_wait():
    cases = {k: _case(k, rmin=3, rmax=3) for k in "abcd"}
    samples = {k: [] for k in cases}
    order = interleave({k: (lambda: 1.0) for k in cases}, cases, samples)
    assert order == list("abcd") * 3
    assert all(len(s) == 3 for s in samples.values())


def test_interleave_drops_a_failing_implementation_and_times_the_rest():
    cases = {k: _case(k, rmin=3, rmax=3) for k in ("bad", "good")}
    samples = {k: [] for k in cases}
    order = interleave({"bad": lambda: None, "good": lambda: 1.0}, cases, samples)
    assert order == ["bad", "good", "good", "good"]
    assert samples == {"bad": [], "good": [1.0, 1.0, 1.0]}


class _FakeWorker:
    def __init__(self, log, seconds):
        self.log, self.seconds, self.case = log, seconds, None

    def ask(self, op, **kw):
        if op == "setup":
            self.case = kw["case"]
        impl = self.case["impl"]
        self.log.append((op, impl))
        if op == "setup":
            return {"ok": True, "samples": []}
        if op == "time":
            return {"s": self.seconds[impl]}
        return {"row": dict(self.case, status="ok")}


def test_run_shape_sets_up_all_then_times_round_robin(monkeypatch):
    loads = iter([2.5, 3.75])
    monkeypatch.setattr(run, "_load1", lambda: next(loads))
    log = []
    cases = [_case(k, rmin=3, rmax=3) for k in ("naive", "trl", "ours")]
    rows = run._run_shape(cases, {}, lambda: _FakeWorker(log, dict(naive=2, trl=3, ours=1)))
    timed = [impl for op, impl in log if op == "time"]
    assert [x for x in log if x[0] == "setup"] == log[:3]  # memory calls first, in order
    assert timed == ["naive", "trl", "ours"] * 3
    assert [impl for op, impl in log[-3:]] == ["naive", "trl", "ours"]
    assert all(op == "finish" for op, _ in log[-3:])
    assert [(r["impl"], r["load_before"], r["load_after"]) for r in rows] == [
        ("naive", 2.5, 3.75), ("trl", 2.5, 3.75), ("ours", 2.5, 3.75)]


@pytest.mark.parametrize("preset", sorted(run.PRESETS))
def test_every_preset_times_each_case_at_least_3_times(preset):
    device, mode = preset
    args = run.parse_args([f"--{mode}", "--device", device])
    cases = run.build_cases(args)
    assert cases and all(c.min_repeats >= G.MIN_REPEATS for c in cases)


def _row(workload, impl, t, lo=None, hi=None, n=4096, mem=100.0, repeats=3):
    return dict(workload=workload, impl=impl, n=n, d=256, status="ok", mem_mib=mem,
                time_median_s=t, time_min_s=lo if lo is not None else t * 0.99,
                time_max_s=hi if hi is not None else t * 1.01, repeats=repeats,
                cpu_median_s=t, time_vs_naive=None)


def _verdicts(rows):
    return {g: (m, v) for g, m, v in G.goals(rows, "cpu")}


def test_goals_judge_the_update_against_naive_and_trl():
    rows = [_row("scoring", "ours", 1.0, mem=10), _row("scoring", "naive", 2.0, mem=1000),
            # update: ours 1.9× slower than naive (the loaded-machine result) -> MISSED
            _row("update", "ours", 1.9, n=1024), _row("update", "naive", 1.0, n=1024),
            _row("update", "trl", 4.0, n=1024, mem=50),
            # update at a smaller N is not the one judged
            _row("update", "ours", 0.1, n=512), _row("update", "naive", 1.0, n=512),
            # update_w: ours 0.43× naive -> met
            _row("update_w", "ours", 0.43, n=512), _row("update_w", "naive", 1.0, n=512)]
    v = _verdicts(rows)
    m, verdict = v["CPU update (d/d hidden): ours ≤ 0.9× naive time"]
    assert verdict == "MISSED" and "N = 1024" in m and "1.90× wall" in m
    m, verdict = v["CPU update (d/d hidden): ours ≤ trl, memory ≤ 1.05×"]
    assert verdict == "MISSED (memory)" and "memory 2.00× of trl" in m  # faster, 2× memory
    m, verdict = v["CPU update (d/d hidden, d/d weight): ours ≤ 0.9× naive time"]
    assert verdict == "met" and "0.43× wall" in m
    assert v["CPU update (d/d hidden, d/d weight): ours ≤ trl, memory ≤ 1.05×"][1] == \
        "not measured"


def test_goal_verdicts_flag_overlapping_ranges_and_too_few_repeats():
    rows = [_row("scoring", "ours", 1.0, lo=0.5, hi=2.5, mem=10),
            _row("scoring", "naive", 2.0, lo=1.8, hi=2.2, mem=1000),
            _row("update", "ours", 1.0, n=1024, repeats=1),
            _row("update", "naive", 2.0, n=1024)]
    v = _verdicts(rows)
    m, verdict = v["CPU scoring time: ours ≤ 0.9× naive (torch backend)"]
    assert verdict == "met (ranges overlap)"
    assert "ours 1.000 s [0.500–2.500] (n=3)" in m
    assert v["CPU update (d/d hidden): ours ≤ 0.9× naive time"][1] == \
        "met (fewer than 3 repeats: not reliable)"
