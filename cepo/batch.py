"""Token rows and the left-padded model batches built from them.

Every forward of the pipeline (generation, student scoring, both teachers, the later training
loss) sees the same layout: ``[left pad | context | response (T columns, right-padded)]``. The
context (a prompt, or prompt + hint for a teacher) is left-padded so that all responses start in
the same column and end in the last one; log-probs are then read from the last T columns only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

# Label of a token that no score or loss counts (padding after a response's end); the same value
# as cepo_kernels' default ``ignore_index``.
IGNORE_INDEX = -100


@dataclass
class Prefix:
    """One row's context before the response: tokens plus the images it contains."""

    input_ids: torch.Tensor  # [L] int64
    mm_token_type_ids: torch.Tensor  # [L] int: 0 text, 1 image placeholder
    pixel_values: torch.Tensor | None = None  # [P, C] patches of this row's images
    image_grid_thw: torch.Tensor | None = None  # [I, 3]

    def extend(self, ids: torch.Tensor) -> Prefix:
        """This prefix followed by text tokens `ids` [H] (e.g. a teacher hint)."""
        ids = ids.to(self.input_ids)
        return replace(
            self,
            input_ids=torch.cat([self.input_ids, ids]),
            mm_token_type_ids=torch.cat(
                [self.mm_token_type_ids, self.mm_token_type_ids.new_zeros(ids.numel())]
            ),
        )


@dataclass
class ModelInputs:
    """One left-padded batch in model layout: B rows of length L, images packed in row order."""

    input_ids: torch.Tensor  # [B, L] int64, pad on the left (and after each response's end)
    attention_mask: torch.Tensor  # [B, L] int64, 0 on padding
    mm_token_type_ids: torch.Tensor  # [B, L] int32: 0 text, 1 image placeholder
    pixel_values: torch.Tensor | None = None  # [P, C] patches of all images of all rows, in order
    image_grid_thw: torch.Tensor | None = None  # [I, 3] (t, h, w) per image, in order

    def to(self, device: torch.device | str) -> ModelInputs:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ModelInputs(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            mm_token_type_ids=move(self.mm_token_type_ids),
            pixel_values=move(self.pixel_values),
            image_grid_thw=move(self.image_grid_thw),
        )


def collate(
    prefixes: Sequence[Prefix],
    pad_token_id: int,
    response_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> ModelInputs:
    """Left-pad `prefixes` to a common length and append the response block if given.

    `response_ids` / `response_mask` are [B, T] (right-padded); the result is [B, Lmax + T] with
    the response in the last T columns for every row.
    """
    if not prefixes:
        raise ValueError("collate needs at least one row")
    if (response_ids is None) != (response_mask is None):
        raise ValueError("pass response_ids and response_mask together")
    if response_ids is not None and response_ids.shape[0] != len(prefixes):
        raise ValueError(f"{len(prefixes)} prefixes but {response_ids.shape[0]} responses")
    # Built where the data already is (the responses' device, else the first prefix's), so GPU
    # batches (e.g. TRL's) never round-trip through host memory.
    device = (response_ids if response_ids is not None else prefixes[0].input_ids).device
    batch, width = len(prefixes), max(p.input_ids.numel() for p in prefixes)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    mm = torch.zeros(batch, width, dtype=torch.int32, device=device)
    for row, p in enumerate(prefixes):
        n = p.input_ids.numel()
        ids[row, width - n :] = p.input_ids.to(device)
        mask[row, width - n :] = 1
        mm[row, width - n :] = p.mm_token_type_ids.to(device)
    if response_ids is not None:
        resp_mask = response_mask.to(device=device, dtype=torch.long)
        ids = torch.cat([ids, torch.where(resp_mask.bool(), response_ids, pad_token_id)], 1)
        mask = torch.cat([mask, resp_mask], dim=1)
        mm = torch.cat([mm, torch.zeros_like(resp_mask, dtype=torch.int32)], dim=1)
    pixels = [p.pixel_values.to(device) for p in prefixes if p.pixel_values is not None]
    grids = [p.image_grid_thw.to(device) for p in prefixes if p.image_grid_thw is not None]
    return ModelInputs(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=mm,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
    )


def response_width(response_mask: torch.Tensor, rows: Sequence[int] | None = None) -> int:
    """Columns a micro-batch of `rows` needs: its longest response (at least 1), so the padding
    columns every row of it shares are never scored."""
    mask = response_mask if rows is None else response_mask[rows]
    return max(int(mask.sum(1).max()), 1) if mask.numel() else 1


def response_labels(response_ids: torch.Tensor, response_mask: torch.Tensor,
                    rows: Sequence[int] | None = None, width: int | None = None) -> torch.Tensor:
    """Labels [b, t] of `rows` (all when None), cropped to `width` columns: the response ids,
    `IGNORE_INDEX` where the mask is 0. The one place responses become kernel labels."""
    ids, mask = response_ids, response_mask
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    if width is not None:
        ids, mask = ids[:, :width], mask[:, :width]
    return ids.masked_fill(~mask.bool(), IGNORE_INDEX)
