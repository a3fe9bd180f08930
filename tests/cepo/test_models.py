"""Loading (tiny and real-layout checkpoints), the processor fallback, the hidden-state helper."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch

from cepo import models
from cepo.batch import Prefix, collate
from cepo.models import (
    forward_hidden,
    load_model,
    load_processor,
    output_head,
    position_ids,
    response_hidden,
)
from cepo.offline.tiny import SPECIAL_TOKENS, build_tiny_model


def test_tiny_dir_looks_like_a_real_checkpoint(tiny_dir):
    config = json.loads(open(f"{tiny_dir}/config.json").read())
    assert config["model_type"] == "qwen3_vl"
    assert json.loads(open(f"{tiny_dir}/processor_config.json").read())["processor_class"] == (
        "Qwen3VLProcessor"
    )


def test_tiny_build_is_cached_and_rebuilt_on_demand(tiny_dir):
    stamp = f"{tiny_dir}/model.safetensors"
    before = open(stamp, "rb").read()
    assert str(build_tiny_model(tiny_dir, vocab="mini")) == tiny_dir  # reused, same bytes
    assert open(stamp, "rb").read() == before


def test_loaded_model_and_processor(model, processor):
    tok = processor.tokenizer
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.dtype == torch.float32 and not model.training
    assert tok.padding_side == "left"
    # specials sit right after the BPE vocabulary, in Qwen3-VL's order
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_processor_fallback_is_announced_once(tiny_dir, caplog, monkeypatch):
    monkeypatch.setattr(models, "_FALLBACK_ANNOUNCED", False)
    monkeypatch.setattr(models, "torchvision_available", lambda: False)
    with caplog.at_level(logging.DEBUG, logger="cepo.models"):
        first = load_processor(tiny_dir)
        load_processor(tiny_dir)
    assert isinstance(first, models.Qwen3VLImageOnlyProcessor)
    said = [r for r in caplog.records if "torchvision is not installed" in r.message]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG  # not noise on every command


def test_stock_processor_is_used_when_torchvision_imports(tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "torchvision_available", lambda: True)
    monkeypatch.setattr(
        models.AutoProcessor, "from_pretrained", lambda path, **kw: calls.append(path) or None
    )
    with pytest.raises(TypeError, match="not a vision-language processor"):
        load_processor(tiny_dir)  # our stub returned None: proves the stock path was taken
    assert calls == [tiny_dir]


def _as_hub_layout(src: str, dst) -> None:
    """Rewrite a tiny checkpoint in the file layout of the Qwen3-VL-2B/4B hub repositories:
    preprocessor_config.json + video_preprocessor_config.json + chat_template.json, no
    processor_config.json, and the chat template absent from the tokenizer config."""
    shutil.copytree(src, dst)
    nested = json.loads((dst / "processor_config.json").read_text())
    (dst / "processor_config.json").unlink()
    image = dict(nested["image_processor"], processor_class="Qwen3VLProcessor")
    image["image_processor_type"] = "Qwen2VLImageProcessorFast"  # as on the hub
    (dst / "preprocessor_config.json").write_text(json.dumps(image))
    (dst / "video_preprocessor_config.json").write_text(json.dumps(nested["video_processor"]))
    template = (dst / "chat_template.jinja").read_text()
    (dst / "chat_template.jinja").unlink()
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config))


def test_a_hub_layout_directory_loads_the_same(tiny_dir, tmp_path, processor, model, examples):
    hub = tmp_path / "Qwen3-VL-like"
    _as_hub_layout(tiny_dir, hub)
    other = load_processor(str(hub))
    assert other.chat_template == processor.chat_template
    assert other.image_processor.merge_size == 2 and other.image_processor.patch_size == 16
    a = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>x"],
        images=[examples[0].images[0]],
        return_tensors="pt",
    )
    b = other(
        text=["<|vision_start|><|image_pad|><|vision_end|>x"],
        images=[examples[0].images[0]],
        return_tensors="pt",
    )
    assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    reloaded = load_model(str(hub), device="cpu")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_qwen_vocabulary_gives_real_qwen_ids(tmp_path):
    path = build_tiny_model(tmp_path / "qwen", vocab="qwen")
    tok = load_processor(str(path)).tokenizer
    assert tok("Hello world! 1+1=2")["input_ids"] == [9707, 1879, 0, 220, 16, 10, 16, 28, 17]
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert load_model(str(path), device="cpu").config.text_config.vocab_size == 151936


def _row(encoded_prompt, response_ids):
    """One unpadded [prompt | response] row as model inputs."""
    resp = torch.tensor([response_ids])
    return collate([encoded_prompt.prefix()], 0, resp, torch.ones_like(resp))


def test_response_hidden_matches_the_models_own_logits(model, encoded):
    """h @ W^T at the response positions == the logits that predict the response tokens."""
    inputs = _row(encoded[0], [5, 17, 42, 99, 7])
    hidden = response_hidden(model, inputs, 5)  # [1, 5, D]
    weight, bias = output_head(model)
    assert bias is None and weight is model.lm_head.weight
    with torch.no_grad():
        logits = model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            mm_token_type_ids=inputs.mm_token_type_ids,
        ).logits  # the model computes its own mRoPE positions here
    length = inputs.input_ids.shape[1]
    torch.testing.assert_close(hidden @ weight.T, logits[:, length - 6 : length - 1])


def test_left_padding_does_not_change_hidden_states(model, encoded):
    """The same row scored alone and next to a longer row gives the same hidden states."""
    short = encoded[0]
    longer = Prefix(
        torch.cat([encoded[1].input_ids, torch.tensor([30, 31, 32, 33, 34, 35])]),
        torch.cat([encoded[1].mm_token_type_ids, torch.zeros(6, dtype=torch.int32)]),
        encoded[1].pixel_values,
        encoded[1].image_grid_thw,
    )
    resp = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = collate([short.prefix(), longer], 0, resp, mask)
    assert batch.attention_mask[0, 0] == 0  # row 0 really is left-padded
    alone = response_hidden(model, _row(short, [5, 6, 7]), 3)
    together = response_hidden(model, batch, 3)[:1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_position_ids_follow_get_rope_index(model, encoded):
    batch = collate([encoded[0].prefix()], 0)
    pos = position_ids(model, batch)  # [4, 1, L]
    expected, _ = model.model.get_rope_index(
        batch.input_ids,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
    )
    assert pos.shape == (4, 1, batch.input_ids.shape[1])
    torch.testing.assert_close(pos[1:], expected)
    torch.testing.assert_close(pos[0, 0], torch.arange(batch.input_ids.shape[1]))


def test_hidden_states_through_peft(model, encoded):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    inputs = _row(encoded[0], [5, 17, 42])
    assert torch.equal(output_head(wrapped).weight, output_head(model).weight)
    # fresh LoRA (B = 0) changes nothing; a non-zero B does, and disable_adapter undoes it
    torch.testing.assert_close(
        response_hidden(wrapped, inputs, 3), response_hidden(model, inputs, 3)
    )
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    changed = response_hidden(wrapped, inputs, 3)
    assert not torch.allclose(changed, response_hidden(model, inputs, 3))
    with wrapped.disable_adapter():
        torch.testing.assert_close(
            response_hidden(wrapped, inputs, 3), response_hidden(model, inputs, 3)
        )
    full = forward_hidden(wrapped, inputs)
    torch.testing.assert_close(full[:, -4:-1], changed)


def test_lora_on_lm_head_is_refused(model):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["lm_head"])
    )
    with pytest.raises(NotImplementedError, match="lm_head carries a LoRA adapter"):
        output_head(wrapped)


def test_response_len_is_checked(model, encoded):
    with pytest.raises(ValueError, match="response_len"):
        response_hidden(model, _row(encoded[0], [1, 2]), 0)


def test_gradient_checkpointing_option(tiny_dir, encoded):
    model = load_model(tiny_dir, device="cpu", gradient_checkpointing=True)
    assert model.model.language_model.gradient_checkpointing
    model.train()
    hidden = response_hidden(model, _row(encoded[0], [5, 6, 7]), 3)
    hidden.square().sum().backward()
    assert model.lm_head.weight.grad is None  # not in the graph: only hidden states were used
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad is not None
