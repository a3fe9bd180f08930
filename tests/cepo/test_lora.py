"""What is trained: LoRA on the language model only (vision tower and lm_head untouched), or
the full model with the vision tower frozen."""

from __future__ import annotations

import copy

import pytest

from cepo.config import AdapterConfig, ModelConfig
from cepo.lora import count_parameters, parameter_groups, prepare_trainable

pytest.importorskip("peft")


def test_lora_adapts_every_language_linear_but_not_vision_or_head(model):
    wrapped = prepare_trainable(copy.deepcopy(model), AdapterConfig(rank=4, alpha=8.0),
                                ModelConfig())
    adapted = {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted and not any("visual" in n or "lm_head" in n for n in adapted)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(f"layers.0.self_attn.{proj}") or n.endswith(f"layers.0.mlp.{proj}")
                   for n in adapted), proj
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert count_parameters(wrapped)[0] < count_parameters(wrapped)[1] / 5


def test_lora_without_exclusion_reaches_the_vision_tower(model):
    wrapped = prepare_trainable(copy.deepcopy(model),
                                AdapterConfig(rank=2, alpha=4.0, exclude_modules=""), ModelConfig())
    assert any("visual" in n for n, m in wrapped.named_modules() if hasattr(m, "lora_A"))


def test_lora_targets_that_match_nothing_are_an_error(model):
    with pytest.raises(ValueError, match="matched no module"):
        prepare_trainable(copy.deepcopy(model),
                          AdapterConfig(target_modules=("no_such_proj",)), ModelConfig())


@pytest.mark.parametrize("freeze", [True, False])
def test_full_fine_tuning(model, freeze):
    full = prepare_trainable(copy.deepcopy(model), AdapterConfig(enabled=False),
                             ModelConfig(freeze_vision=freeze))
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert all("visual" in n for n in frozen) and bool(frozen) == freeze
    assert full.lm_head.weight.requires_grad
    groups = parameter_groups(full, 0.01)
    assert groups[0]["weight_decay"] == 0.01 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim < 2 for p in groups[1]["params"])
