"""Loading Qwen3-VL checkpoints, and the hidden-state entry point the kernels score from.

The kernels never see logits: they take the hidden states just before the lm_head plus the lm_head
weight and compute log-probs of the chosen tokens in vocabulary tiles. So this module provides
  * `load_model` / `load_processor` for a hub id, a local directory or a name registered in
    `cepo.registry` (``"tiny-warm"``, the offline default, once `cepo.offline` is imported), all
    through `from_pretrained`;
  * `position_ids` computed by the model's own mRoPE index function for a `cepo.batch.ModelInputs`
    batch, so that student and teacher forwards agree to the bit;
  * `output_head` and `response_hidden`, which work for plain and peft-wrapped models.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)

from cepo.batch import ModelInputs
from cepo.data import set_image_pixels
from cepo.errors import NotAvailable
from cepo.registry import resolve_model_dir

logger = logging.getLogger(__name__)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor, which needs torchvision.

    Reads the same files as the stock processor (a real Qwen3-VL directory works), handles images
    exactly as the stock one does, and rejects videos.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # ProcessorMixin's loader would build every attribute, the video processor included, so
        # the two we need are loaded by hand; the chat template is looked up the way the stock
        # processor does (chat_template.jinja, or a legacy chat_template.json), then the tokenizer.
        from transformers import AutoImageProcessor, AutoTokenizer

        path = pretrained_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        processor_dict, _ = cls.get_processor_dict(path, **kwargs)
        chat_template = processor_dict.get("chat_template") or tokenizer.chat_template
        return cls(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
        )


_FALLBACK_ANNOUNCED = False


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_processor(
    name_or_path: str, *, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs
):
    """The checkpoint's processor: stock `AutoProcessor` when torchvision imports, else image-only.

    Either way the tokenizer is set to left padding (generation and teacher batches need it), and
    every image is first resized to between `min_pixels` and `max_pixels` as the reference does
    (`cepo.data.set_image_pixels`; None: no bound), then by the processor's own rule.
    """
    global _FALLBACK_ANNOUNCED
    path = resolve_model_dir(name_or_path)
    try:
        model_type = AutoConfig.from_pretrained(path, **kwargs).model_type
    except OSError as err:
        raise not_available(name_or_path, err) from err
    if torchvision_available() or model_type != "qwen3_vl":
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    else:
        if not _FALLBACK_ANNOUNCED:  # not a problem for training (no videos): debug only
            logger.debug(
                "torchvision is not installed: using the image-only Qwen3-VL processor "
                "(images work as usual; videos are not supported)"
            )
            _FALLBACK_ANNOUNCED = True
        # Registered so that AutoProcessor also resolves directories saved by this class.
        AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)
        processor = Qwen3VLImageOnlyProcessor.from_pretrained(path, **kwargs)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise TypeError(
            f"{name_or_path!r} gave a {type(processor).__name__}, not a vision-language processor "
            "with a tokenizer and an image processor"
        )
    processor.tokenizer.padding_side = "left"
    set_image_pixels(processor, min_pixels, max_pixels)
    return processor


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (how Qwen3-VL is trained), fp32 on CPU (bf16 matmuls are slow
    there and the tests compare log-probs to 1e-5)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def not_available(name: str, err: OSError) -> NotAvailable:
    """What is missing and what to pass, for a model that could not be loaded."""
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    if Path(name).expanduser().exists():
        return NotAvailable(f"model {name!r} cannot be loaded from that directory ({why}); pass a "
                            "directory holding a saved model and its processor files")
    return NotAvailable(
        f"model {name!r} is not a local directory and could not be loaded from the hub (offline? "
        f"{why}); download it (huggingface-cli download {name}) and pass its directory instead, "
        "or use the built-in offline model tiny-warm (registered by `import cepo.offline`)"
    )


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a Qwen3-VL (or any image-text-to-text) checkpoint with `AutoModelForImageTextToText`.

    `name_or_path` is a hub id, a local directory, or a registered name (`cepo.registry`). The
    model is returned in eval mode on `device` (default: cuda if available) in `dtype` (default: see
    `default_dtype`).
    """
    path = resolve_model_dir(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        logger.info("HF_HUB_OFFLINE=1: %s must already be in the local hub cache", path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(device)
    except OSError as err:
        raise not_available(name_or_path, err) from err
    if gradient_checkpointing:
        # transformers >= 5.2x renamed it; the old name still works but warns
        ckpt_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    model.eval()
    return model


class OutputHead(NamedTuple):
    weight: torch.Tensor  # [V, D] lm_head weight
    bias: torch.Tensor | None  # [V] or None (Qwen3-VL has none)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `...ForConditionalGeneration` under a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model: torch.nn.Module) -> OutputHead:
    """The lm_head weight and bias, for plain and peft-wrapped models.

    Refuses a LoRA-adapted lm_head: its effective weight is not one tensor, and scoring with the
    base weight would silently ignore the adapter.
    """
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "lora_A"):
        raise NotImplementedError(
            "the lm_head carries a LoRA adapter; exclude it from target_modules (the fused "
            "log-prob kernels read a single lm_head weight)"
        )
    inner = getattr(head, "modules_to_save", None)  # peft ModulesToSaveWrapper
    if inner is not None and getattr(head, "active_adapter", None) in inner:
        head = inner[head.active_adapter]
    return OutputHead(head.weight, getattr(head, "bias", None))


def position_ids(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """mRoPE position ids [4, B, L] from the model's own `get_rope_index`.

    Row 0 holds the text positions (used for the causal mask), rows 1-3 the (t, h, w) positions.
    Both count from 0 at each row's first real token, so the same content gets the same positions
    however much left padding a batch adds, which is what makes teacher and student forwards
    bit-comparable. Text-only rows (`mm_token_type_ids` all 0) get plain 0..n-1 in all rows.
    """
    inner = unwrap_model(model).model
    vision, _ = inner.get_rope_index(
        inputs.input_ids,
        mm_token_type_ids=inputs.mm_token_type_ids,
        image_grid_thw=inputs.image_grid_thw,
        attention_mask=inputs.attention_mask,
    )  # [3, B, L]
    text = (inputs.attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, L]
    return torch.cat([text[None], vision], dim=0)


def forward_hidden(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Final hidden states [B, L, D] (after the last norm, before the lm_head) for a batch.

    Runs the inner `Qwen3VLModel` so no [B, L, V] logits are ever built. Gradients flow if the
    caller has them enabled (the training loss uses this too).
    """
    base = unwrap_model(model)
    dtype = next(base.parameters()).dtype
    pixel_values = inputs.pixel_values.to(dtype) if inputs.pixel_values is not None else None
    out = base.model(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        position_ids=position_ids(model, inputs),
        pixel_values=pixel_values,
        image_grid_thw=inputs.image_grid_thw,
        mm_token_type_ids=inputs.mm_token_type_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def response_hidden(model: torch.nn.Module, inputs: ModelInputs, response_len: int) -> torch.Tensor:
    """Hidden states [B, T, D] that predict the last `response_len` tokens of every row."""
    return response_slice(forward_hidden(model, inputs), response_len)


def response_slice(hidden: torch.Tensor, response_len: int) -> torch.Tensor:
    """The columns [B, T, D] of full-row hidden states [B, L, D] that predict the response.

    Rows are `[left pad | context | response (T, right-padded)]`, so response token j sits at
    column L - T + j and is predicted by the hidden state one column earlier.
    """
    length = hidden.shape[1]
    if not 0 < response_len < length:
        raise ValueError(f"response_len must be in [1, {length - 1}], got {response_len}")
    return hidden[:, length - response_len - 1 : length - 1]


_PROCESSOR_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def save_processor_files(processor, source: str, directory: str | os.PathLike) -> None:
    """Give a saved model directory its processor: the source checkpoint's own processor files
    when it is a local directory (byte-identical, loadable by the stock processor), else
    ``processor.save_pretrained``."""
    src, dst = Path(source), Path(directory)
    if src.is_dir():
        for name in _PROCESSOR_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    else:
        processor.save_pretrained(dst)
