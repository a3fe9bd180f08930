"""Tiny offline models for the integration tests, built once per session into a temp directory:
the mini Qwen3-VL of `cepo.tiny`, and a tiny text-only Qwen3 causal LM sharing its tokenizer."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> str:
    from cepo.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "vl", vocab="mini"))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, tiny_vl_dir) -> str:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_vl_dir)  # mini BPE + Qwen specials + chat template
    tok.padding_side = "left"
    config = Qwen3Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("tiny") / "text"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # a text model: AutoProcessor must give the tokenizer, not the VL processor it came with
    config_file = path / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.pop("processor_class", None)
    config_file.write_text(json.dumps(data))
    return str(path)
