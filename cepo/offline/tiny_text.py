"""A tiny random-weight text-only Qwen3, written to a directory like the tiny Qwen3-VL.

Why: the text-only path (a causal LM, no image, a chat template without vision tokens) must run
offline end to end, and vLLM's CPU attention, which the rollout engine is tested with, accepts
head_dim 64 but not the tiny Qwen3-VL's 16. So: the real Qwen3 architecture with 2 layers,
hidden size 128, head_dim 64, and the tiny Qwen3-VL's vocabulary, special tokens and chat
template (`cepo.offline.tiny.tiny_tokenizer`), so that the same synthetic prompts tokenise the
same way.
``"tiny-text"`` as a model name is the warmed-up version (`cepo.offline.warmup`, kind ``"text"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cepo.cache import build_once, cache_root
from cepo.offline.tiny import CHAT_TEMPLATE, Vocab, tiny_tokenizer

_RECIPE_VERSION = 1
_STAMP = "cepo_tiny_text.json"


def default_tiny_text_dir(vocab: Vocab = "mini") -> Path:
    """``$CEPO_CACHE_DIR`` (default ``~/.cache/cepo``)/tiny-qwen3-text-<vocab>-v<N>."""
    return cache_root() / f"tiny-qwen3-text-{vocab}-v{_RECIPE_VERSION}"


def build_tiny_text_model(
    directory: str | os.PathLike | None = None,
    *,
    vocab: Vocab = "mini",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random Qwen3 causal LM (model, tokenizer with chat template) to `directory`
    (default: the cache); reused when already built with the same recipe, vocabulary and seed."""
    if vocab not in ("mini", "qwen"):
        raise ValueError(f"vocab must be 'mini' or 'qwen', got {vocab!r}")
    target = Path(directory) if directory is not None else default_tiny_text_dir(vocab)
    stamp = {"recipe": _RECIPE_VERSION, "vocab": vocab, "seed": seed}
    return build_once(target, stamp, _STAMP,
                      lambda staging: _write_checkpoint(staging, vocab=vocab, seed=seed),
                      overwrite=overwrite)


def _write_checkpoint(directory: Path, *, vocab: Vocab, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer, special, vocab_size = tiny_tokenizer(vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention accepts 64 (not 16)
        max_position_embeddings=4096,
        tie_word_embeddings=False,  # the fused kernels read one lm_head weight
        pad_token_id=special["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=special["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    model.generation_config.pad_token_id = special["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
