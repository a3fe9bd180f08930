"""Error bars of the paper suite (`--samples`) and the paired comparison (`--compare`)."""

from __future__ import annotations

import json
import math

import pytest

from cepo.evalsuite import report, stats

# Student t 0.975 quantiles from published tables
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163,
        30: 2.042272456, 1000: 1.962339081}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_tables(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-8)
    assert stats.t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-8)


def test_benchmark_ci_is_a_t_interval_over_per_question_means():
    scores = {"q1": [1, 1, 0], "q2": [0, 0, 0], "q3": [1, 1, 1], "q4": [1, 0, 0]}
    means = [2 / 3, 0.0, 1.0, 1 / 3]  # by hand
    mean = sum(means) / 4
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / 3)
    est = stats.benchmark_ci(scores)
    assert est.mean == pytest.approx(0.5) and est.n == 4 and est.df == 3
    assert est.half_width == pytest.approx(T975[3] * sd / 2)
    assert (est.low, est.high) == pytest.approx((0.5 - est.half_width, 0.5 + est.half_width))


def test_more_samples_per_question_narrow_the_interval():
    """Same per-question accuracies; k = 1 (0/1 draws) vs k = 4 (averaged draws)."""
    k1 = {f"q{i}": [float(i % 2)] for i in range(8)}
    k4 = {f"q{i}": [1.0, 1.0, 0.0, 0.0] if i % 2 else [0.0, 1.0, 0.0, 1.0] for i in range(8)}
    assert stats.benchmark_ci(k4).half_width < stats.benchmark_ci(k1).half_width


def test_average_ci_combines_benchmarks_with_welch_degrees_of_freedom():
    a = stats.benchmark_ci({f"q{i}": [float(i < 3)] for i in range(10)})
    b = stats.benchmark_ci({f"q{i}": [float(i < 4)] for i in range(5)})
    avg = stats.average_ci([a, b])
    var = [a.se ** 2, b.se ** 2]
    df = sum(var) ** 2 / (var[0] ** 2 / 9 + var[1] ** 2 / 4)
    assert avg.mean == pytest.approx((0.3 + 0.8) / 2)
    assert avg.se == pytest.approx(math.sqrt(sum(var)) / 2)
    assert avg.df == pytest.approx(df)
    assert avg.half_width == pytest.approx(stats.t_quantile(0.975, df) * avg.se)


def test_one_question_has_no_interval():
    est = stats.benchmark_ci({"q": [1.0, 0.0]})
    assert est.mean == 0.5 and math.isnan(est.half_width)


def _write(run_dir, scores, *, seed=0, samples=1, backend="native"):
    results = report.make_results(backend=backend, model="Qwen/Qwen3-VL-2B-Instruct",
                                  checkpoint=None, samples=samples, seed=seed,
                                  settings={"temperature": 1.0}, scores=scores)
    return report.save(results, run_dir / "eval-paper-native")


def test_compare_two_runs_with_a_known_difference(tmp_path):
    """A solves every question, B the first half: A - B = 50 points on each benchmark."""
    from cepo.eval import main

    qids = [f"q{i}" for i in range(10)]
    a = {key: {q: [1.0] for q in qids} for key in ("dynamath", "mmmu")}
    b = {key: {q: [float(i < 5)] for i, q in enumerate(qids)} for key in ("dynamath", "mmmu")}
    _write(tmp_path / "A", a)
    _write(tmp_path / "B", b)
    diff = main(["--compare", str(tmp_path / "A"), str(tmp_path / "B")])
    d = [0.0] * 5 + [1.0] * 5  # per-question differences, by hand
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in d) / 9)
    for key in ("dynamath", "mmmu"):
        assert diff[key]["mean"] == pytest.approx(50.0)
        assert diff[key]["half_width"] == pytest.approx(100 * T975[9] * sd / math.sqrt(10))
    se = math.sqrt(2 * (sd / math.sqrt(10)) ** 2) / 2
    assert diff["average"]["mean"] == pytest.approx(50.0)
    # equal variances, 9 df each: Welch gives 18 df; t(0.975, 18) = 2.100922040 (tables)
    assert diff["average"]["half_width"] == pytest.approx(100 * 2.100922040 * se)
    same = main(["--compare", str(tmp_path / "A"), str(tmp_path / "A")])
    assert same["average"]["mean"] == 0.0 and same["average"]["half_width"] == 0.0


def test_compare_pairs_questions_by_id_not_by_order(tmp_path):
    a = {"wemath": {"x": [1.0], "y": [0.0], "z": [1.0]}}
    b = {"wemath": {"z": [0.0], "y": [0.0], "x": [1.0]}}  # another order; only z differs
    diff = report.compare(report.load(_write(tmp_path / "A", a)),
                          report.load(_write(tmp_path / "B", b)))
    assert diff["wemath"]["mean"] == pytest.approx(100 / 3)


def test_compare_refuses_different_questions_or_seeds(tmp_path):
    a = report.load(_write(tmp_path / "A", {"mmmu": {"q1": [1.0], "q2": [0.0]}}))
    b = report.load(_write(tmp_path / "B", {"mmmu": {"q1": [1.0], "q3": [0.0]}}))
    with pytest.raises(ValueError, match=r"mmmu: the runs scored different questions"):
        report.compare(a, b)
    c = report.load(_write(tmp_path / "C", {"mmmu": {"q1": [1.0], "q2": [0.0]}}, seed=1))
    with pytest.raises(ValueError, match=r"the runs differ in seed: 0 .* vs 1"):
        report.compare(a, c)


def test_results_with_bad_scores_are_refused(tmp_path):
    path = _write(tmp_path / "A", {"mmmu": {"q1": [1.5]}})
    with pytest.raises(ValueError, match=r"mmmu question 'q1': scores must be in \[0, 1\]"):
        report.load(path)
    path.write_text(json.dumps({"format": report.FORMAT, "benchmarks": {"mmmu": [1, 0]}}))
    with pytest.raises(TypeError, match=r"mmmu: field 'scores' must map question ids"):
        report.load(path)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.load(tmp_path / "nowhere")


def test_table_shows_the_paper_rows_for_the_same_size():
    results = report.make_results(backend="native", model="Qwen/Qwen3-VL-4B-Instruct",
                                  checkpoint=None, samples=2, seed=0, settings={},
                                  scores={"mmmu": {"a": [1.0, 0.0], "b": [1.0, 1.0]}})
    text = report.table(results, report.summarize(results))
    assert "| paper 4B CEPO | 65.37 | 61.16 | 47.37 | 54.11 | 74.77 | 60.56 |" in text
    assert "| paper 4B OPSD | – | – | – | – | – | 56.23 |" in text
    assert "75.00 ± " in text and "Not run: DynaMath, LogicVista, MathVision-mini, WeMath" in text
    assert "paper 2B" not in text and "scored natively" in text


@pytest.mark.parametrize("name,size", [
    ("Qwen/Qwen3-VL-2B-Instruct", "2B"), ("/models/qwen3-vl-4b-cepo", "4B"),
    ("Qwen/Qwen3-VL-32B-Instruct", None), ("tiny-warm", None), ("Qwen/Qwen3-VL-2.4B", None),
])
def test_paper_size(name, size):
    from cepo.evalsuite.benchmarks import paper_size

    assert paper_size(name) == size
