"""The training config: presets = docs/METHOD.md, "Presets", layers (preset → YAML → CLI),
coercion, errors, help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cepo import config as C
from cepo.config import ConfigError, build_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_paper_preset_is_spec_section_7():
    cfg = C.finalize(C.paper())
    assert (cfg.model.name, cfg.data.train, cfg.data.train_split, cfg.data.val_split) == (
        "Qwen/Qwen3-VL-2B-Instruct", "hiyouga/geometry3k", "train", "test")
    assert (cfg.steps, cfg.prompts_per_step, cfg.rollout.group_size, cfg.ppo.mini_batches) == (
        50, 32, 8, 2)
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens) == (768, 2048)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.0)
    assert cfg.lora.target_modules == ("all-linear",) and cfg.lora.exclude_modules == r".*visual.*"
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.lr) == (0.01, 1.0, 5e-6)
    assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("cosine", 5)
    assert (cfg.cepo.lambda_init, cfg.cepo.lambda_warmup_steps, cfg.cepo.eps_w) == (0.5, 25, 0.5)
    assert (cfg.ppo.clip_low, cfg.ppo.clip_high, cfg.ppo.clip_dual) == (0.2, 0.28, 3.0)
    assert cfg.ppo.aggregation == "token-mean"
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert (cfg.val.temperature, cfg.val.top_p, cfg.val.every) == (0.6, 0.95, 5)


def test_reference_preset_differs_only_where_spec_says():
    paper, ref = C.to_dict(C.finalize(C.paper())), C.to_dict(C.finalize(C.reference()))
    diff = {k for k, v in C.flatten(ref).items() if C.flatten(paper)[k] != v}
    assert diff == {"preset", "lora.alpha", "optim.schedule", "optim.warmup_steps",
                    "cepo.eps_w", "output_dir",  # and the reference code's own choices:
                    "teacher.neg_choice", "teacher.neg_fallback", "teacher.teacher_images",
                    "advantage.uniform_zero"}
    assert (ref["teacher"]["neg_choice"], ref["teacher"]["neg_fallback"]) == (
        "reference", "positive")
    assert ref["teacher"]["teacher_images"] is False and ref["advantage"]["uniform_zero"] is False
    assert (ref["lora"]["alpha"], ref["optim"]["schedule"], ref["cepo"]["eps_w"]) == (
        64.0, "constant", 0.2)


@pytest.mark.parametrize("algo, lr", [("cepo", 5e-6), ("grpo", 1e-6), ("rlsd", 1e-6)])
def test_lr_follows_the_algorithm_unless_given(algo, lr):
    cfg = build_config(["--config", str(CONFIGS / "paper_2b.yaml"), "--algo", algo])
    assert cfg.optim.lr == lr and cfg.output_dir == f"runs/qwen3vl-2b-{algo}"
    assert build_config(["--config", str(CONFIGS / "paper_2b.yaml"), "--algo", algo,
                         "--lr", "3e-6"]).optim.lr == 3e-6


def test_no_arguments_is_the_offline_run_and_matches_configs_tiny_cpu():
    cfg = build_config([])
    assert cfg.model.name == "tiny-warm" and cfg.data.train == "synthetic"
    assert cfg.preset == "paper" and cfg.output_dir == "runs/tiny-cepo"
    assert cfg.cepo == C.finalize(C.paper()).cepo and cfg.ppo.clip_high == 0.28  # method kept
    assert cfg == C.finalize(C.offline())
    assert build_config(["--config", str(CONFIGS / "tiny_cpu.yaml")]) == cfg
    # the YAML names every option the preset changes, each with the preset's value
    paper, offline = C.flatten(C.to_dict(C.paper())), C.flatten(C.to_dict(C.offline()))
    shipped = C.load_yaml(CONFIGS / "tiny_cpu.yaml")
    assert {k for k, v in offline.items() if paper[k] != v} <= set(shipped)
    assert all(offline[k] == v for k, v in shipped.items() if k != "preset"), shipped
    reference = build_config(["--preset", "reference"])  # the offline scale over another preset
    assert (reference.lora.alpha, reference.model.name, reference.steps) == (64.0, "tiny-warm", 30)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = build_config(["--config", str(CONFIGS / name)])
    assert cfg.preset == ("reference" if name.startswith("reference") else "paper")
    if "_4b" in name:
        assert cfg.model.name == "Qwen/Qwen3-VL-4B-Instruct"
    if name.startswith("full_"):  # full fine-tuning: sharded, fp32 weights, bf16 compute
        assert (cfg.sharding, cfg.lora.enabled, cfg.model.dtype, cfg.mixed_precision) == (
            "fsdp", False, "float32", "bf16")


def test_fsdp_with_fp16_is_refused():
    with pytest.raises(ConfigError, match="mixed_precision.*loss scaling"):
        build_config(["--sharding", "fsdp", "--mixed_precision", "fp16"])


def test_overrides_dotted_short_and_typed():
    cfg = build_config([
        "--rollout.group_size=4", "--lambda_init", "0.3", "--resume", "--steps", "7",
        "--lora.target_modules", "q_proj,v_proj", "--data.val_limit", "none",
        "--optim.lr", "1", "--optim.betas", "0.8,0.9", "--model.name", "tiny",
        "--prompts-per-step", "16",
        "--preset", "reference",
    ])
    assert cfg.rollout.group_size == 4 and cfg.cepo.lambda_init == 0.3 and cfg.resume is True
    assert cfg.steps == 7 and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.data.val_limit is None and cfg.optim.lr == 1.0 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.name == "tiny" and cfg.prompts_per_step == 16
    assert cfg.lora.alpha == 64.0  # the reference preset underneath


@pytest.mark.parametrize("old, new, attr, value", [
    ("--lam0", "--lambda_init", "lambda_init", 0.25),
    ("--cepo.lam_warmup_steps", "--cepo.lambda_warmup_steps", "lambda_warmup_steps", 2),
    ("--lam_offset", "--lambda_offset", "lambda_offset", 2),
])
def test_renamed_options_still_work_with_a_warning(old, new, attr, value, monkeypatch):
    from cepo.config import cli

    monkeypatch.setattr(cli, "_warned", set())
    with pytest.warns(FutureWarning, match=f"renamed to 'cepo.{attr}'"):
        cfg = build_config([old, str(value)])
    assert getattr(cfg.cepo, attr) == value and cfg == build_config([new, str(value)])


def test_a_saved_config_with_old_names_loads(tmp_path, monkeypatch):
    from cepo.config import cli

    monkeypatch.setattr(cli, "_warned", set())
    cfg = build_config(["--lambda_init", "0.25", "--lambda_warmup_steps", "7"])
    text = (tmp_path / "new.yaml")
    C.save_yaml(cfg, text)
    old = tmp_path / "old.yaml"
    old.write_text(text.read_text().replace("lambda_init:", "lam0:")
                   .replace("lambda_warmup_steps:", "lam_warmup_steps:")
                   .replace("lambda_offset:", "lam_offset:"))
    assert "lam0: 0.25" in old.read_text()
    with pytest.warns(FutureWarning):
        assert C.from_yaml(old) == cfg


def test_yaml_layers_and_preset_key(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("preset: reference\nsteps: 3\nrollout:\n  group_size: 2\n")
    second = tmp_path / "b.yaml"
    second.write_text("rollout.group_size: 6\n")
    cfg = build_config(["--config", str(first), "--config", str(second), "--steps", "4"])
    assert (cfg.preset, cfg.steps, cfg.rollout.group_size, cfg.cepo.eps_w) == (
        "reference", 4, 6, 0.2)
    saved = tmp_path / "saved.yaml"
    C.save_yaml(cfg, saved)
    assert C.from_yaml(saved) == cfg


@pytest.mark.parametrize("argv, words", [
    (["--algo", "ppo"], ["algo", "'ppo'", "cepo, rlsd, grpo"]),
    (["--cepo.eps_w", "1.5"], ["cepo.eps_w", "1.5", "[0, 1)"]),
    (["--steps", "abc"], ["steps", "'abc'", "integer"]),
    (["--steps", "2.5"], ["steps", "integer"]),
    (["--resume", "maybe"], ["resume", "'maybe'", "true or false"]),
    (["--lr", "-1"], ["optim.lr", "-1.0", "> 0"]),
    (["--rollout.group_size", "0"], ["rollout", "group_size", "0"]),
    (["--teacher.neg_choice", "best"], ["neg_choice", "best", "worst"]),
    (["--ppo.aggregation", "sum"], ["aggregation", "'sum'", "token-mean"]),
    (["--lamda0", "1"], ["unknown option", "lamda0", "cepo.lambda_init"]),
    (["--micro_batch_size", "4"], ["ambiguous", "ppo.micro_batch_size",
                                   "teacher.micro_batch_size"]),
    (["--preset", "huge"], ["preset", "huge", "paper, reference"]),
    (["positional"], ["unexpected argument"]),
])
def test_invalid_values_name_key_value_and_allowed(argv, words):
    with pytest.raises(ConfigError) as err:
        build_config(argv)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_train_main_rejects_bad_config_at_start_up(capsys):
    from cepo.train import main

    with pytest.raises(SystemExit, match="config error: algo='ppo'"):
        main(["--algo", "ppo"])


def test_help_lists_every_option_with_default(capsys):
    from cepo.train import main

    assert main(["--help"]) == {}
    text = capsys.readouterr().out
    for key in C.option_types():
        assert f"--{key} " in text, key
    assert "--steps (int)" in text and "50  [30]" in text  # paper default, offline default
    assert 'λ at step 1 (docs/METHOD.md, "Schedules")' in text  # the why, from the source comments


def test_help_answers_without_importing_torch():
    """``python -m cepo.train --help`` prints before the trainer's torch imports."""
    code = ("import runpy, sys\n"
            "sys.argv = ['cepo.train', '--help']\n"
            "try:\n"
            "    runpy.run_module('cepo.train', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exit_:\n"
            "    assert exit_.code in (0, None), exit_.code\n"
            "print('heavy:', sorted({'torch', 'transformers', 'jsonargparse'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "--cepo.lambda_init (float)" in out.stdout
    assert out.stdout.rstrip().endswith("heavy: []"), out.stdout[-300:]


def test_config_package_imports_no_torch():
    code = ("import sys, cepo.config, cepo.config.cli, cepo.config.help\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'cepo_kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("argv, key, allowed", [
    (["--lr", "inf"], "optim.lr", "finite"),
    (["--lr", "nan"], "optim.lr", "finite"),
    (["--lr", "0"], "optim.lr", "> 0"),
    (["--lr", "1e30"], "optim.lr", "<= 1"),
    (["--rollout.temperature", "nan"], "rollout.temperature", "finite"),
    (["--rollout.temperature", "-1"], "rollout", "temperature >= 0"),
    (["--rollout.temperature", "1e-40"], "rollout.temperature", ">= 0.01"),
    (["--val.temperature", "1e-40"], "val.temperature", ">= 0.01"),
    (["--val.temperature", "inf"], "val.temperature", "finite"),
    (["--rollout.top_p", "0"], "rollout", "top_p"),
    (["--val.top_p", "1.5"], "val.top_p", "(0, 1]"),
    (["--optim.eps", "0"], "optim.eps", "(0, 1]"),
    (["--optim.eps", "-1e-8"], "optim.eps", "(0, 1]"),
    (["--eps_w", "nan"], "cepo.eps_w", "finite"),
    (["--grad_clip", "-1"], "optim.grad_clip", ">= 0"),
    (["--grad_clip", "inf"], "optim.grad_clip", "finite"),
    (["--optim.betas", "0.9,1.0"], "optim.betas", "[0, 1)"),
    (["--optim.betas", "0.9,nan"], "optim.betas", "finite"),
    (["--weight_decay", "-0.1"], "optim.weight_decay", ">= 0"),
    (["--weight_decay", "2000", "--lr", "1e-3"], "optim.weight_decay", "1 / lr"),
    (["--lambda_init", "nan"], "cepo.lambda_init", "finite"),
    (["--lora.alpha", "inf"], "lora.alpha", "finite"),
    (["--clip_dual", "inf"], "ppo.clip_dual", "finite"),
    (["--grader_timeout_s", "inf"], "grader_timeout_s", "finite"),
    (["--grader_timeout_s", "1e9"], "grader_timeout_s", "(0, 3600]"),
])
def test_non_finite_and_absurd_numbers_are_refused(argv, key, allowed):
    with pytest.raises(ConfigError) as err:
        build_config(argv)
    assert key in str(err.value) and allowed in str(err.value), str(err.value)


def test_non_finite_numbers_in_yaml_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"optim.lr=inf is not allowed: a finite number"):
        build_config(["--config", str(path)])


def test_sane_edge_values_are_kept():
    cfg = build_config(["--rollout.temperature", "0", "--val.temperature", "0.01", "--lr", "1",
                        "--weight_decay", "0", "--grad_clip", "0", "--optim.betas", "0,0.5"])
    assert (cfg.rollout.temperature, cfg.val.temperature, cfg.optim.lr) == (0.0, 0.01, 1.0)
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.betas) == (0.0, 0.0, (0, 0.5))
    cfg = build_config(["--data.min_pixels", "1e4", "--steps", "3.0", "--model.name", "123"])
    assert (cfg.data.min_pixels, cfg.steps, cfg.model.name) == (10_000, 3, "123")
    assert type(cfg.data.min_pixels) is int and type(cfg.steps) is int


@pytest.mark.parametrize("argv, words", [
    (["--seed", str(2**64)], ["seed=18446744073709551616", "[0, 536870911]"]),
    (["--seed", "-1"], ["seed=-1", "[0, 536870911]"]),
    (["--rollout.group_size", "1"], ["rollout.group_size=1", ">= 2", "relative to the group"]),
    (["--algo", "grpo", "--group_size", "1"], ["rollout.group_size=1", "grpo's advantages"]),
])
def test_flags_that_would_fail_or_do_nothing_later_are_refused(argv, words):
    with pytest.raises(ConfigError) as err:
        build_config(argv)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_largest_seed_is_usable_by_the_trainer():
    from cepo.train import seed_step, step_generator

    cfg = build_config(["--seed", str(C.MAX_SEED), "--steps", "100000"])
    seed_step(cfg.seed, cfg.steps, rank=1023, salt=1)  # torch takes seeds below 2**64 only
    step_generator(cfg.seed, cfg.steps)
    with pytest.raises(ConfigError, match="seed"):
        build_config(["--seed", str(C.MAX_SEED + 1)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
@pytest.mark.parametrize("argv", [["--kernel_backend", "triton"], ["--device", "cuda"]])
def test_cuda_only_settings_are_refused_at_start_up_on_a_cpu_machine(argv, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="not allowed.*(CUDA|cuda)"):
        build_config(argv)
    from cepo.train import main

    with pytest.raises(SystemExit, match="config error: (kernel_backend='triton'|device='cuda')"):
        main(argv)  # before any set-up: no model is built, no run directory is made


def test_triton_backend_on_a_cpu_machine_is_kept_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert build_config(["--kernel_backend", "triton"]).kernel_backend == "triton"


@pytest.mark.parametrize("argv, message", [
    (["--steps"], "--steps needs a value"),
    (["--steps", "--resume"], "--steps needs a value"),
    (["--config"], "--config needs a value"),
    (["--resume", "--lr"], "--lr needs a value"),
    (["--stpes"], "unknown option 'stpes'; did you mean"),
])
def test_a_bare_option_that_is_not_a_flag_needs_a_value(argv, message):
    with pytest.raises(ConfigError) as err:
        build_config(argv)
    assert message in str(err.value)
    assert build_config(["--resume", "--steps", "3"]).resume is True  # bare flags still work


def _main_error(argv) -> str:
    from cepo.train import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return str(exit_.value.code)


@pytest.mark.parametrize("text, words", [
    ("steps: 3\n  rollout: [1\n", ["bad.yaml, line 2", "not valid YAML", "mapping values"]),
    ("steps: [1, 2\n", ["bad.yaml, line 2", "not valid YAML"]),
    ("steps: !!python/object/apply:os.system ['true']\n", ["bad.yaml, line 1",
                                                          "python/object/apply:os.system"]),
])
def test_yaml_errors_are_one_config_error_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = _main_error(["--config", str(path)])
    assert message.startswith("config error: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_config_file_and_bad_output_dir_are_config_errors(tmp_path):
    message = _main_error(["--config", str(tmp_path / "nope.yaml")])
    assert message == f"config error: config file '{tmp_path / 'nope.yaml'}' does not exist"
    for bad, why in (("runs/{algoo}", "KeyError: 'algoo'"), ("runs/{", "Single '{'"),
                     ("runs/{}", "IndexError")):
        message = _main_error(["--output_dir", bad])
        assert message.startswith(f"config error: output_dir={bad!r} is not allowed: only "
                                  "{preset} and {algo}") and why in message, message
    assert build_config(["--output_dir", "runs/{{x}}-{algo}"]).output_dir == "runs/{x}-cepo"


@pytest.mark.parametrize(("text", "want"), [("true", "true"), ("false", "false"),
                                            ("'true'", "true"), ("auto", "auto")])
def test_prefix_sharing_takes_yaml_booleans(tmp_path, text, want):
    """Unquoted YAML true/false parse as booleans; the switch takes them as its words."""
    path = tmp_path / "c.yaml"
    path.write_text(f"prefix_sharing: {text}\n")
    assert build_config(["--config", str(path)]).prefix_sharing == want
    assert build_config(["--prefix_sharing", want]).prefix_sharing == want
    with pytest.raises(C.ConfigError, match="prefix_sharing"):
        build_config(["--prefix_sharing", "maybe"])
