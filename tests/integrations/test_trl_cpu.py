"""The TRL drop-in on a CPU machine: `CEPOConfig`'s precision default, the Qwen3-VL processor
without torchvision, and `examples/trl_cpu.py` (text and VL) training 2 steps as written."""

from __future__ import annotations

import logging
import math
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")

from transformers import training_args
from trl import GRPOConfig

from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer
from cepo.models import Qwen3VLImageOnlyProcessor, torchvision_available
from tests.helpers import load_example

NO_TORCHVISION = pytest.mark.skipif(torchvision_available(), reason="torchvision is installed")


@pytest.fixture
def no_bf16_device(monkeypatch):
    """A machine with neither a bf16 GPU nor an XLA device, whatever this one has."""
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(training_args, "is_torch_xla_available", lambda: False)


def test_config_defaults_to_fp32_without_bf16_gpu(tmp_path, no_bf16_device, caplog):
    with pytest.raises(ValueError, match="bf16/gpu"):  # what TRL's own config does here
        GRPOConfig(output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        config = CEPOConfig(output_dir=str(tmp_path))
    assert config.bf16 is False and config.use_cpu is False
    assert "trains in fp32 (bf16=False)" in caplog.text


@pytest.mark.parametrize("field", ["bf16", "bf16_full_eval"])
def test_config_explicit_bf16_without_gpu_names_the_fix(tmp_path, no_bf16_device, field):
    with pytest.raises(ValueError, match=rf"{field}=False \(fp32\), or use_cpu=True"):
        CEPOConfig(output_dir=str(tmp_path), **{field: True})


def test_config_keeps_trl_precision_elsewhere(tmp_path, monkeypatch, no_bf16_device):
    # use_cpu=True: TRL's default (bf16 autocast on the CPU) is kept, as GRPOConfig does
    assert CEPOConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    assert GRPOConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    assert CEPOConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
    # a bf16 GPU: unchanged
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    assert CEPOConfig(output_dir=str(tmp_path)).bf16 is True


def _check_run(trainer, steps=2):
    assert trainer.state.global_step == steps
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    last = trainer.cepo_last  # CEPO ran on the last generation batch: λ_2 = 0.5 · (1 − 1/2)
    assert last.generation == steps and last.lam == pytest.approx(0.25)
    assert last.advantages.shape == last.completion_ids.shape
    assert (last.advantages[~last.mask] == 0).all()
    if not torch.cuda.is_available():
        assert trainer.args.bf16 is False


def test_trl_cpu_example_text(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = load_example("trl_cpu").main(["--model", "text"])
    _check_run(trainer)
    noise = [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert not noise, noise[0].message  # transformers' rename is not the user's problem
    assert "step 2: loss=" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # the temporary models are gone


def test_trl_cpu_example_vl(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    trainer = load_example("trl_cpu").main(["--model", "vl"])
    _check_run(trainer)
    if not torchvision_available():  # picked by the trainer: the example passes no processor
        assert isinstance(trainer.processing_class, Qwen3VLImageOnlyProcessor)
    assert trainer.processing_class.tokenizer.padding_side == "left"
    assert list(tmp_path.iterdir()) == []


@NO_TORCHVISION
def test_vl_model_object_without_processor(tiny_vl_dir, tmp_path):
    """A loaded Qwen3-VL (not a path) and no processing_class: the image-only processor too."""
    from cepo.models import load_model

    example = load_example("trl_cpu")
    args = CEPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                      per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, remove_unused_columns=False, save_strategy="no")
    trainer = CEPOGRPOTrainer(load_model(tiny_vl_dir, device="cpu"), reward_funcs=example.reward,
                              args=args, train_dataset=example.vl_dataset(2))
    assert isinstance(trainer.processing_class, Qwen3VLImageOnlyProcessor)


def test_text_model_keeps_trl_tokenizer(tiny_text_dir, tmp_path):
    example = load_example("trl_cpu")
    args = CEPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                      per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, remove_unused_columns=False, save_strategy="no")
    trainer = CEPOGRPOTrainer(tiny_text_dir, reward_funcs=example.reward, args=args,
                              train_dataset=example.text_dataset(2))
    assert not isinstance(trainer.processing_class, Qwen3VLImageOnlyProcessor)
    assert hasattr(trainer.processing_class, "apply_chat_template")


def test_readme_runs_the_tested_example_commands():
    """The README's TRL section shows exactly the commands the two example tests run."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert re.findall(r"python examples/trl_cpu\.py --model (\w+)", readme) == ["text", "vl"]
