"""The README's API example runs as written (keeps the README true)."""

import pathlib
import re


def test_readme_api_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## The kernels in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["ev"].advantages.shape == (2, 16)
    assert scope["out"].loss.requires_grad


# --------------------------------------------------------------------------- offline run figures

ROOT = pathlib.Path(__file__).parents[1]


def _offline_results() -> pathlib.Path:
    from bench import offline_run

    block = offline_run.readme_block(ROOT / "README.md")
    found = re.search(r"`(bench/results/[^/`]+/offline_run)/`", block)
    assert found, "the README's offline-run block names no results folder"
    return ROOT / found.group(1)


def test_readme_offline_run_figures_are_the_committed_results():
    """Every figure of the README's offline-run block is what the committed results render to
    (regenerate both with `python -m bench.offline_run --readme README.md`)."""
    from bench import offline_run

    results = _offline_results()
    assert offline_run.readme_block(ROOT / "README.md") == offline_run.render(results)


def test_committed_offline_run_is_the_current_default():
    """The committed run is `python -m cepo.train` as it is now: same config, same warm-up."""
    import json

    import yaml

    from bench import offline_run
    from cepo.config import build_config, flatten, to_dict

    results = _offline_results()
    saved = flatten(yaml.safe_load((results / "config.yaml").read_text()))
    current = flatten(to_dict(build_config([])))
    current.pop("output_dir")
    assert saved == current
    summary = json.loads((results / "summary.json").read_text())
    assert summary["warmup"] == offline_run.warmup_recipe()
    steps = [json.loads(line)["step"] for line in (results / "metrics.jsonl").open()]
    assert max(steps) == current["steps"] == summary["trainer_summary"]["steps"]


def test_offline_run_render_follows_the_files(tmp_path):
    """Changing a committed number changes the rendered block (nothing is hard-coded)."""
    import json
    import shutil

    from bench import offline_run

    shutil.copytree(_offline_results(), tmp_path / "r")
    path = tmp_path / "r" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if "reward/accuracy" in r:
            r["reward/accuracy"] = 0.625
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "| train accuracy | 0.625 | 0.625 |" in offline_run.render(tmp_path / "r")


def test_answer_tokens_wrong_direction_share():
    """Only the tokens inside the last \\boxed{} count; the sign of A decides which way is
    wrong (Δ < 0 is wrong on A > 0, Δ > 0 on A < 0)."""
    from bench.offline_run import answer_wrong_dir

    def tokens(deltas):  # "1+1=2, \boxed{12}." with the given Δ on "1" and "2" in the box
        return [[t, d, 1.0, 0.0] for t, d in zip(
            ["1", "+", "1", "=", "2", ", \\", "boxed", "{", "1", "2", "}."],
            [-9, -9, -9, -9, -9, -9, -9, -9, *deltas, -9])]

    samples = [
        {"teachers": True, "advantage": 1.0, "tokens": tokens([0.5, -0.1])},
        {"teachers": True, "advantage": -0.5, "tokens": tokens([0.2, -0.3])},
        {"teachers": True, "advantage": -0.5, "tokens": tokens([-0.2, -0.3])},
        {"teachers": False, "advantage": 1.0, "tokens": tokens([-1.0, -1.0])},  # not scored
    ]
    share = answer_wrong_dir(samples)
    assert share["answer_tokens_pos"] == 2 and share["answer_wrong_dir_pos"] == 0.5
    assert share["answer_tokens_neg"] == 4 and share["answer_wrong_dir_neg"] == 0.25
