"""bench.algos: the study's statistics are computed from the runs it names (recomputed here from
each named run directory with an independent formula and t table)."""

from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest

from bench import algos
from cepo.credit import decisive_mask

# t_{0.975, df} from a printed table (not bench.algos.T975)
T_TABLE = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642,
           40: 2.021075390, 60: 2.000297822, 120: 1.979930405}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_t_critical_and_mean_ci_against_a_printed_table():
    for df, t in T_TABLE.items():
        assert algos.t_critical(df) == pytest.approx(t, abs=2e-4), df
    xs = [0.2, 0.4, 0.3, 0.5, 0.1]
    mean, half, n = algos.mean_ci(xs + [math.nan])  # NaN (an undefined share) is left out
    assert (mean, n) == (pytest.approx(0.3), 5)
    assert half == pytest.approx(T_TABLE[4] * statistics.stdev(xs) / math.sqrt(5), rel=1e-4)
    assert math.isnan(algos.mean_ci([0.5])[1]) and algos.mean_ci([])[2] == 0
    assert algos.area([0, 10, 30], [0.0, 0.5, 0.5]) == pytest.approx((2.5 + 10) / 30)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("algos")
    out = algos.main(["--quick", "--out", str(root / "out"), "--work", str(root / "work")])
    return out["out"]


def test_quick_study_statistics_come_from_the_named_runs(quick):
    runs = read_csv(quick / "runs.csv")
    credit_rows = read_csv(quick / "credit.csv")
    summary = {(r["algo"], r["metric"], r["step"]): r for r in read_csv(quick / "summary.csv")}
    assert {(r["algo"], r["seed"]) for r in credit_rows} == \
        {(a, str(s)) for a in algos.ALGOS for s in range(2)}
    # every runs.csv row is the val/accuracy its run directory logged
    curves = {}
    for r in credit_rows:
        run_dir = (quick / r["run_dir"]).resolve()
        logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[r["algo"], r["seed"]] = [(v["step"], v["val/accuracy"]) for v in logged
                                        if "val/accuracy" in v]
        assert [s for s, _ in curves[r["algo"], r["seed"]]] == [0, 1, 2]
    assert sorted((r["algo"], r["seed"], int(r["step"]), float(r["val_accuracy"]))
                  for r in runs) == sorted((a, s, st, acc) for (a, s), c in curves.items()
                                           for st, acc in c)
    for algo in algos.ALGOS:
        per_seed = [c for (a, _), c in curves.items() if a == algo]
        for i, step in enumerate((0, 1, 2)):
            accs = [c[i][1] for c in per_seed]
            row = summary[algo, "val_accuracy", str(step)]
            assert float(row["mean"]) == pytest.approx(statistics.mean(accs), abs=1e-9)
            half = T_TABLE[1] * statistics.stdev(accs) / math.sqrt(2)
            assert float(row["ci95"]) == pytest.approx(half, abs=1e-3)
        aucs = [np.trapezoid([a for _, a in c], [s for s, _ in c]) / 2 for c in per_seed]
        assert float(summary[algo, "auc", ""]["mean"]) == pytest.approx(np.mean(aucs))
        assert float(summary[algo, "final_accuracy", ""]["mean"]) == \
            pytest.approx(np.mean([c[-1][1] for c in per_seed]))
        assert summary[algo, "auc", ""]["n"] == "2"
    # CEPO minus each baseline, paired by seed
    def auc(c):
        return np.trapezoid([a for _, a in c], [s for s, _ in c]) / 2

    for other in ("grpo", "rlsd"):
        diffs = [auc(curves["cepo", s]) - auc(curves[other, s]) for s in ("0", "1")]
        row = summary[f"cepo-{other}", "auc", ""]
        assert float(row["mean"]) == pytest.approx(np.mean(diffs), abs=1e-9)
        assert float(row["ci95"]) == pytest.approx(
            T_TABLE[1] * statistics.stdev(diffs) / math.sqrt(2), abs=1e-3)
    # the credit share, recomputed from each named run's samples.jsonl
    for r in credit_rows:
        run_dir = (quick / r["run_dir"]).resolve()
        num = den = 0.0
        for line in (run_dir / "samples.jsonl").read_text().splitlines():
            rec = json.loads(line)
            gap = np.abs(np.array([t[3] for t in rec["tokens"]]) - rec["advantage"])
            num += gap[np.array(decisive_mask([t[0] for t in rec["tokens"]]), bool)].sum()
            den += gap.sum()
        share = float(r["decisive_credit_share"])
        if r["algo"] == "grpo":
            assert den == 0 and math.isnan(share)  # Â = A: no token credit to place
        else:
            assert share == pytest.approx(num / den, rel=1e-6)
    md = (quick / "algos.md").read_text()
    assert all(r["run_dir"] in md for r in credit_rows)
    assert (quick / "algos.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_stop_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        algos.main(["--algos", "grpo,ppo", "--work", str(tmp_path / "w")])
    assert "unknown ['ppo']" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_report_only_recomputes_the_same_summary(quick):
    before = (quick / "summary.csv").read_text()
    (quick / "summary.csv").unlink()
    algos.main(["--report-only", "--out", str(quick)])
    assert (quick / "summary.csv").read_text() == before
