"""Text-only causal LMs (the Qwen3 family) on the same path as Qwen3-VL.

CEPO is not specific to vision-language models. A checkpoint whose config has no
``vision_config`` is a text model: it loads with `AutoModelForCausalLM`, and its tokenizer is
wrapped in `TextProcessor`, which answers the few processor calls the pipeline makes (chat
template, ``processor(text=...)``, ``.tokenizer``), so prompts, rollouts, teachers, updates and
checkpoints need no second code path. Which kind a model is gets decided here, once
(`is_text_model`); `cepo.models` asks it where loading and the forward differ.
"""

from __future__ import annotations

import torch


def is_text_model(model_or_config) -> bool:
    """True for a text-only model or config (no vision tower), False for a vision-language one.

    Accepts a config, a model (plain or peft-wrapped) or anything with a ``.config``."""
    config = model_or_config
    if isinstance(model_or_config, torch.nn.Module):
        get_base = getattr(model_or_config, "get_base_model", None)
        base = get_base() if callable(get_base) else model_or_config
        config = base.config
    return getattr(config, "vision_config", None) is None


class TextProcessor:
    """A tokenizer in the shape of a vision-language processor, for text-only models.

    `__call__` returns what a Qwen3-VL processor returns for an image-free prompt
    (``input_ids``, ``attention_mask`` and all-zero ``mm_token_type_ids``) and refuses images;
    `apply_chat_template` flattens a message's text parts into one string first (text models'
    templates, Qwen3's among them, read string contents only) and refuses image parts.
    """

    image_processor = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> TextProcessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if not tokenizer.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; prompts are rendered "
                             "with the model's own template")
        return cls(tokenizer)

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template

    def apply_chat_template(self, messages: list[dict], **kwargs):
        return self.tokenizer.apply_chat_template(
            [{**m, "content": _text_content(m["content"])} for m in messages], **kwargs
        )

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        if images:
            raise ValueError("a text-only model takes no images; use a text data set "
                             "(e.g. synthetic-text) or a vision-language model")
        kwargs.setdefault("add_special_tokens", False)  # the chat template renders them all
        enc = self.tokenizer(text, return_tensors=return_tensors, **kwargs)
        if return_tensors == "pt":
            enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"], dtype=torch.int32)
        return enc

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, directory, **kwargs):
        return self.tokenizer.save_pretrained(directory, **kwargs)


def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type", "text") != "text" or "text" not in part:
            raise ValueError(f"a text-only model takes no images or other non-text message "
                             f"parts, got {part!r}; use a text data set (e.g. synthetic-text)")
        parts.append(part["text"])
    return "".join(parts)
