"""cepo.plot: the curves follow metrics.jsonl; torn tails and bad lines handled."""

import json

import pytest

from cepo import plot


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_series_takes_the_last_record_of_a_step_and_skips_non_numbers():
    history = [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": None},
               {"step": 2, "reward/mean": 0.3}, {"step": 1, "reward/mean": 0.2},
               {"step": 3, "reward/mean": True}, {"step": 4, "reward/mean": float("nan")}]
    assert plot.series(history, "reward/mean") == ([1, 2], [0.2, 0.3])


def test_read_history_ignores_a_torn_tail_and_names_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1, "lr": 1.0}], tail='{"step": 2, "lr"')
    assert plot.read_history(path) == [{"step": 1, "lr": 1.0}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        plot.read_history(path)


def test_plot_run_draws_each_metric_at_its_steps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    records = [{"step": k, "reward/mean": k / 10, "reward/accuracy": k / 20,
                "cepo/lambda": 1 - k / 10, "lr": 1e-3, "ppo/clip_frac": 0.01 * k}
               for k in range(1, 6)]
    records.insert(0, {"step": 0, "val/accuracy": 0.05})
    records.append({"step": 5, "val/accuracy": 0.4})
    _write(tmp_path / "metrics.jsonl", records)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read it back
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / plot.CURVES_FILE and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    lines = {(title, line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for title, ax in axes.items() for line in ax.get_lines()}
    assert lines[("reward", "train")] == ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert lines[("accuracy", "val")] == ([0, 5], [0.05, 0.4])
    assert lines[("clip fractions", "PPO ratio")][1] == pytest.approx([0.01, 0.02, 0.03,
                                                                       0.04, 0.05])
    assert ("format", "train") not in lines  # not logged: the panel says so
    assert any(t.get_text() == "not logged by this run" for t in axes["format"].texts)


def test_main_names_a_missing_metrics_file(tmp_path):
    with pytest.raises(SystemExit, match="no metrics file"):
        plot.main([str(tmp_path)])
