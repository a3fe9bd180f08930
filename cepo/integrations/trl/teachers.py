"""TRL adapter for the teacher side of CEPO: from a GRPOTrainer batch to per-row teacher inputs.

TRL hands over left-padded ``prompt_ids`` [B, P], right-padded ``completion_ids`` [B, T] and, for
Qwen-style VLMs, ``mm_token_type_ids`` [B, P + T], packed ``pixel_values`` with one
``image_grid_thw`` row per image and ``num_images`` per row. This module turns one row into a
`cepo.batch.Prefix` (its real prompt tokens plus its own images), from which the student and
teacher rows are built with `cepo.batch.collate`:

    student:   [pad | prompt                | completion (T, right-padded)]
    teacher:   [pad | prompt + hint(answer) | completion]

so completion token j sits in the same column of every stream and the hidden state one column
to its left predicts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cepo.batch import ModelInputs, Prefix
from cepo.models import response_slice
from cepo.prefix import context_after, grouped_response_hidden

# Vision inputs of non-Qwen VLMs, whose per-row layout the teacher rows cannot rebuild.
OTHER_VISION_KEYS = ("pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
                     "image_position_ids", "num_tiles")


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or a conversation whose last turn is read."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(c.get("text", "") for c in content if isinstance(c, dict))
        return ""
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}")


def answer_text(value: Any) -> str | None:
    """A dataset answer as text; None when missing or empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def check_vision_keys(batch: dict, teacher_images: bool) -> None:
    """Refuse VLM inputs whose per-row layout this adapter cannot rebuild (non-Qwen VLMs)."""
    other = [k for k in OTHER_VISION_KEYS if batch.get(k) is not None]
    if other and teacher_images:
        raise NotImplementedError(
            f"CEPOGRPOTrainer rebuilds teacher inputs for Qwen-style VLMs (pixel_values + "
            f"image_grid_thw + mm_token_type_ids); this model's batch also has {other}. "
            "Set cepo_teacher_images=False to score image-blind teachers instead."
        )
    no_grid = batch.get("pixel_values") is not None and batch.get("image_grid_thw") is None
    if no_grid and teacher_images:
        raise NotImplementedError(
            "CEPOGRPOTrainer needs image_grid_thw to split pixel_values per row (Qwen-style VLMs); "
            "set cepo_teacher_images=False for other VLMs."
        )


def row_prefixes(batch: dict, *, with_images: bool, blind_token_id: int | None = None,
                 placeholder_ids: Sequence[int] = ()) -> list[Prefix]:
    """One `Prefix` per row of a TRL batch: the real prompt tokens and the row's images.

    ``with_images=False`` gives the image-blind rendering of the same prompt, the reference
    code's teacher layout: every image placeholder token (``mm_token_type_ids != 0``, or an id in
    ``placeholder_ids``) becomes ``blind_token_id`` (the pad token), the vision start/end markers
    stay, all tokens are text (sequential positions) and no pixels are attached.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].bool()  # [B, P]
    width = prompt_ids.shape[1]
    mm = batch.get("mm_token_type_ids")
    mm = mm[:, :width] if mm is not None else torch.zeros_like(prompt_ids)  # prompt part
    pixels = _pixels_per_row(batch) if with_images else [(None, None)] * prompt_ids.shape[0]
    ids = prompt_ids
    if not with_images:
        marks = torch.tensor(list(placeholder_ids), dtype=ids.dtype, device=ids.device)
        placeholder = (mm != 0) | torch.isin(ids, marks)
        if blind_token_id is None and bool((placeholder & prompt_mask).any()):
            raise ValueError("image-blind teacher rows need blind_token_id (the pad token)")
        ids = ids.masked_fill(placeholder, 0 if blind_token_id is None else blind_token_id)
        mm = torch.zeros_like(mm)
    out = []
    for row in range(prompt_ids.shape[0]):
        keep = prompt_mask[row]
        pv, grid = pixels[row]
        out.append(Prefix(ids[row, keep].cpu(), mm[row, keep].to(torch.int32).cpu(), pv, grid))
    return out


def _pixels_per_row(batch: dict) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Packed Qwen ``pixel_values`` [ΣP, C] and ``image_grid_thw`` [I, 3] → per-row chunks."""
    n = batch["prompt_ids"].shape[0]
    pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pixel_values is None or grid is None:
        return [(None, None)] * n
    num_images = batch.get("num_images") or [0] * n
    patches = grid.prod(-1).tolist()  # [I] patch rows per image
    out, image, row_start = [], 0, 0
    for count in num_images:
        rows = sum(patches[image: image + count])
        if count:
            out.append((pixel_values[row_start: row_start + rows],
                        grid[image: image + count]))
        else:
            out.append((None, None))
        image, row_start = image + count, row_start + rows
    return out


def backbone_hidden(backbone: torch.nn.Module, inputs: ModelInputs, response_len: int, *,
                    is_vlm: bool) -> torch.Tensor:
    """Hidden states [b, T, D] (before the lm_head) that predict the last ``response_len`` tokens.

    ``backbone`` is the decoder under the lm_head (``model.base_model`` of a transformers
    ``...ForCausalLM`` / ``...ForConditionalGeneration``), called the way TRL's fused head calls
    it: no position ids (Qwen-VL derives mRoPE from ``mm_token_type_ids`` and the mask).
    """
    kwargs = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask,
              "use_cache": False}
    if is_vlm:
        kwargs["mm_token_type_ids"] = inputs.mm_token_type_ids.long()
        if inputs.pixel_values is not None:
            kwargs["pixel_values"] = inputs.pixel_values
            kwargs["image_grid_thw"] = inputs.image_grid_thw
    return response_slice(backbone(**kwargs).last_hidden_state, response_len)  # [b, L, D] -> T


def shared_rows_hidden(model: torch.nn.Module, bases: Sequence[Prefix], rows: Sequence[Prefix],
                       response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[b, T, D] like `backbone_hidden` on ``rows[i] + response i``, each distinct prompt of
    `bases` (rows[i] = bases[i] + a hint) encoded once (`cepo.prefix`). TRL's batch carries no
    group index, so rows of one prompt are found by comparing tokens and pixels."""
    prompts: list[Prefix] = []
    group = []
    for base in bases:
        for g, known in enumerate(prompts):
            if torch.equal(known.input_ids, base.input_ids) and _same_pixels(known, base):
                group.append(g)
                break
        else:
            prompts.append(base)
            group.append(len(prompts) - 1)
    hints = [context_after(prompts[g], row) for g, row in zip(group, rows)]
    return grouped_response_hidden(model, prompts, group, response_ids, response_mask,
                                   contexts=hints)


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of `mask` [b, T] is ones then zeros (what shared scoring needs)."""
    mask = mask.bool()
    lengths = mask.sum(1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def _same_pixels(a: Prefix, b: Prefix) -> bool:
    if a.pixel_values is None or b.pixel_values is None:
        return a.pixel_values is None and b.pixel_values is None
    return a.pixel_values.shape == b.pixel_values.shape and torch.equal(a.pixel_values,
                                                                         b.pixel_values)
