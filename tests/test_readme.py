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
    from cepo.config import EXECUTION_ONLY, RENAMED, build_config, flatten, to_dict

    results = _offline_results()
    saved = flatten(yaml.safe_load((results / "config.yaml").read_text()))
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}  # a run from before a rename
    current = flatten(to_dict(build_config([])))
    current.pop("output_dir")
    for key in EXECUTION_ONLY:  # how, not what, the run computes: absent from an older run
        if key not in saved:
            current.pop(key)
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


# ------------------------------------------------------------------------- train phases figures


def _train_phases_results() -> pathlib.Path:
    from bench import train_phases

    block = train_phases.readme_block(ROOT / "README.md")
    found = re.search(r"`(bench/results/[^/`]+/train_phases)/`", block)
    assert found, "the README's train-phases block names no results folder"
    return ROOT / found.group(1)


def test_readme_train_phases_figures_are_the_committed_results():
    """Every figure of the README's teacher-overhead paragraph is what the committed
    train_phases.json renders to (regenerate with `python -m bench.train_phases --readme
    README.md`, or `--render-only` to rewrite the paragraph alone)."""
    from bench import train_phases

    results = _train_phases_results()
    assert train_phases.readme_block(ROOT / "README.md") == train_phases.render(results)


def test_committed_train_phases_is_the_current_default():
    """The committed timing was measured on today's `python -m cepo.train` default."""
    import json

    from bench import train_phases

    result = json.loads((_train_phases_results() / "train_phases.json").read_text())
    assert train_phases.config_drift(result["meta"]["settings"]) == []
    text = " ".join(train_phases.render(_train_phases_results()).split())
    assert "Measured on the current default config" in text


def test_train_phases_render_follows_the_file(tmp_path):
    """Changing a committed number changes the paragraph; a result measured on another config
    (or one that did not record it) says so."""
    import json

    from bench import train_phases

    result = json.loads((_train_phases_results() / "train_phases.json").read_text())
    result["summary"]["cepo"]["vs_grpo_step"] = 1.875
    result["summary"]["cepo"]["vs_grpo_step_per_repeat"] = [1.5, 2.25]
    result["summary"]["cepo"]["teacher_share_est"] = 0.4
    result["meta"]["settings"]["rollout.max_new_tokens"] = 7
    result["meta"]["settings"].pop("rollout.temperature", None)
    (tmp_path / "train_phases.json").write_text(json.dumps(result))
    text = " ".join(train_phases.render(tmp_path).split())
    assert "a CEPO step takes 1.88× a GRPO step" in text
    assert "1.50–2.25× run by run" in text and "about 40 points of it the teachers" in text
    assert "other than today's default" in text and "rollout.max_new_tokens 7 (now " in text
    assert "rollout.temperature not recorded (now " in text
    assert "at most 7 tokens" in text


def test_train_phases_readme_markers(tmp_path):
    """The paragraph is replaced between its markers only; a README without them is refused."""
    import pytest

    from bench import train_phases

    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{train_phases.README_BEGIN}\nold\n{train_phases.README_END}\nb\n")
    train_phases.write_readme(readme, "new\n")
    assert readme.read_text() == (f"a\n{train_phases.README_BEGIN}\nnew\n"
                                  f"{train_phases.README_END}\nb\n")
    assert train_phases.readme_block(readme) == "new\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        train_phases.write_readme(tmp_path / "bare.md", "new\n")
