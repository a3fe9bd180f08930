"""Datasets in Geo3k's schema and the prompts built from them.

Geo3k rows are ``{"images": [image], "problem": "<image>Find x. ...", "answer": "3"}``. They come
from a local parquet file, JSON-lines file or `datasets` directory, or from the hub where it is
reachable (`load_geo3k`; reading and decoding live in `cepo.sources`), or from a dataset name
registered in `cepo.registry` (``synthetic``: the offline kit's set drawn with PIL,
`cepo.offline.synthetic`), so everything runs offline. A bad row is
skipped and counted with its reason at load time, never a crash mid-run (or again on every resume):
no answer, an answer that is not text or a finite number, text that is not valid Unicode, a
missing, undecodable or oversized image, an aspect ratio the processor refuses, and, given the
processor, any prompt it cannot encode. A source with no usable row is an error; a file that is not
rows names the file and line.

Prompts follow the Geo3k recipe of docs/METHOD.md, "Grading and reward": the problem (trimmed)
+ `FORMAT_SUFFIX`, split on ``<image>`` into image and text parts of a single user turn, rendered
with the model's own chat template with the assistant header appended.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cepo.batch import Prefix
from cepo.registry import dataset_loader
from cepo.sources import answer_text, is_unicode, load_image, read_rows

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
FORMAT_SUFFIX = (
    " Solve the problem step by step, keeping reasoning brief. \nPut ONLY the final answer inside "
    "\\boxed{}."
)


@dataclass(frozen=True)
class Example:
    """One problem: text with an ``<image>`` marker per image, the images, the ground truth."""

    problem: str
    answer: str
    images: tuple[Image.Image, ...] = ()
    uid: str = ""


@dataclass
class EncodedPrompt:
    """A prompt tokenised by the processor, ready to be left-padded into a batch."""

    input_ids: torch.Tensor  # [L] int64, ends with the assistant header
    mm_token_type_ids: torch.Tensor  # [L] int32: 1 on image placeholder tokens
    pixel_values: torch.Tensor | None  # [P, C] patches of this prompt's images
    image_grid_thw: torch.Tensor | None  # [I, 3]
    blind_ids: torch.Tensor  # [L] input_ids with every image placeholder token set to the pad
    example: Example

    def prefix(self, *, with_images: bool = True) -> Prefix:
        """This prompt as a batch row; `with_images=False` gives the image-blind rendering.

        Image-blind is the reference code's teacher layout: the vision block stays, as
        ``<|vision_start|>`` + N × pad (``<|endoftext|>``) + ``<|vision_end|>`` with N the image's
        token count, attended like text, with text (sequential) positions and no pixels.
        """
        if with_images:
            return Prefix(
                self.input_ids, self.mm_token_type_ids, self.pixel_values, self.image_grid_thw
            )
        return Prefix(self.blind_ids, torch.zeros_like(self.blind_ids, dtype=torch.int32))


# --------------------------------------------------------------------------- image sizes

PIXEL_RANGE_ATTR = "cepo_pixel_range"  # (min, max) on the processor; not saved with it


def set_image_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Make `encode_prompt` resize every image to between `min_pixels` and `max_pixels` before
    `processor` sees it (`fit_pixels`; None: no bound on that side).

    Set once on the processor, so every path that encodes prompts with it (rollouts, teacher
    scoring, updates, validation, evaluation) gets the same images and visual tokens.
    """
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    if None not in (min_pixels, max_pixels) and min_pixels > max_pixels:
        raise ValueError(f"need min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    setattr(processor, PIXEL_RANGE_ATTR, (min_pixels, max_pixels))


def fit_pixels(image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """`image` scaled (aspect kept, sides truncated to whole pixels) to at most `max_pixels`,
    then to at least `min_pixels`, in RGB: the reference code's dataset resize. The processor's
    own resize (sides to multiples of patch × merge) runs after it, as in the reference, so a
    300×200 figure becomes 627×418 here and 640×416 = 260 visual tokens in a Qwen3-VL processor.
    Without bounds the image is returned unchanged."""
    if min_pixels is None and max_pixels is None:
        return image
    if max_pixels is not None and image.width * image.height > max_pixels:
        image = _scale(image, math.sqrt(max_pixels / (image.width * image.height)))
    if min_pixels is not None and image.width * image.height < min_pixels:
        image = _scale(image, math.sqrt(min_pixels / (image.width * image.height)))
    return image if image.mode == "RGB" else image.convert("RGB")


def _scale(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size)  # PIL's default filter, as the reference


# --------------------------------------------------------------------------- prompts


def build_messages(example: Example, *, with_images: bool = True) -> list[dict]:
    """A single user turn: the problem + format suffix, with an image part at each ``<image>``.

    Images without a marker in the problem go first (Geo3k problems start with the marker);
    with `with_images=False` the markers are dropped and only the text remains.
    """
    text = example.problem.strip() + FORMAT_SUFFIX
    if with_images and example.images and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * len(example.images) + text
    content: list[dict] = []
    for i, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0 and with_images:
            content.append({"type": "image"})
        if segment:
            content.append({"type": "text", "text": segment})
    return [{"role": "user", "content": content}]


def prompt_text(processor, example: Example, *, with_images: bool = True) -> str:
    return processor.apply_chat_template(
        build_messages(example, with_images=with_images), add_generation_prompt=True, tokenize=False
    )


def encode_prompt(processor, example: Example) -> EncodedPrompt:
    """Tokenise one example with its images (and its image-blind form, for blind teachers)."""
    low, high = getattr(processor, PIXEL_RANGE_ATTR, (None, None))
    images = [fit_pixels(image, low, high) for image in example.images] or None
    enc = processor(text=[prompt_text(processor, example)], images=images, return_tensors="pt")
    ids = enc["input_ids"][0]
    mm = enc.get("mm_token_type_ids")
    if mm is None:  # processors other than Qwen's: mark the image placeholder tokens ourselves
        mm = (ids == processor.image_token_id).long()[None]
    placeholders = mm[0] != 0
    pad = processor.tokenizer.pad_token_id
    if pad is None and bool(placeholders.any()):
        raise ValueError("the tokenizer has no pad token: the image-blind prompt needs one")
    return EncodedPrompt(
        input_ids=ids.long(),
        mm_token_type_ids=mm[0].to(torch.int32),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        blind_ids=ids.long().masked_fill(placeholders, pad if pad is not None else 0),
        example=example,
    )


def encode_prompts(
    processor, examples: Sequence[Example], *, max_prompt_tokens: int | None = None
) -> tuple[list[EncodedPrompt], int]:
    """Encode a batch of examples; prompts longer than `max_prompt_tokens` are dropped.

    Returns the kept prompts and the number dropped. Dropping (rather than truncating) is the only
    safe option with images: a cut through the image placeholders breaks the vision alignment.
    """
    kept, dropped = [], 0
    for example in examples:
        prompt = encode_prompt(processor, example)
        if max_prompt_tokens is not None and prompt.input_ids.numel() > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(prompt)
    if dropped:
        logger.warning("dropped %d prompt(s) longer than %d tokens", dropped, max_prompt_tokens)
    return kept, dropped


# --------------------------------------------------------------------------- Geo3k loading


def load_split(
    source: str, split: str = "train", *, limit: int | None = None, seed: int = 0, processor=None
) -> list[Example]:
    """A registered dataset name (`cepo.registry`, e.g. ``"synthetic"``) -> its loader; anything
    else -> `load_geo3k` (which encodes each row with `processor`, when given, and skips those it
    refuses)."""
    loader = dataset_loader(source)
    if loader is not None:
        return loader(split, limit=limit, seed=seed)
    return load_geo3k(source, split, limit=limit, processor=processor)


def load_geo3k(
    source: str, split: str = "train", *, limit: int | None = None, processor=None
) -> list[Example]:
    """Examples from a Geo3k-schema source: a parquet or JSON-lines file, a directory holding
    such files (``*<split>*.parquet`` / ``*<split>*.jsonl``, as in a hub snapshot) or a
    `datasets.save_to_disk` directory, or else a hub id (e.g. ``hiyouga/geometry3k``).

    A single file is read whole (`split` only selects files in a directory or a saved/hub
    dataset). `limit` stops after that many usable examples. With a `processor` every row is also
    encoded as a prompt (chat template, tokenizer, image processor), so a row that would crash the
    step sampling it is skipped here instead.
    """
    rows, base_dir = read_rows(source, split)
    examples, skipped = [], Counter()
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        example, reason = _row_to_example(row, base_dir, uid=f"{split}-{i}")
        if example is not None and processor is not None:
            reason = _encoding_problem(processor, example)
            example = None if reason else example
        if example is None:
            skipped[reason] += 1
        else:
            examples.append(example)
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    if not examples:
        raise ValueError(f"no usable rows in {source!r} [{split}] (skipped: {detail})")
    log = logger.warning if skipped else logger.info
    log(
        "%s [%s]: %d examples, skipped %d (%s)",
        source,
        split,
        len(examples),
        sum(skipped.values()),
        detail,
    )
    return examples


def _row_to_example(row: dict, base_dir: Path | None, uid: str) -> tuple[Example | None, str]:
    missing = [k for k in ("problem", "answer") if k not in row]
    if missing:
        raise KeyError(f"row {uid} lacks field(s) {missing}; fields present: {sorted(row)}")
    answer, reason = answer_text(row["answer"])
    if answer is None:
        return None, reason
    problem = row["problem"]
    if not isinstance(problem, str) or not problem.strip():
        return None, "missing problem"
    if not is_unicode(problem) or not is_unicode(answer):
        return None, "text not valid Unicode (lone surrogate)"
    raw_images = row.get("images", row.get("image"))
    if raw_images is None:
        raw_images = []
    elif not isinstance(raw_images, (list, tuple)):
        raw_images = [raw_images]
    n_markers = problem.count(IMAGE_PLACEHOLDER)
    if len(raw_images) < n_markers:
        return None, "missing image"
    if n_markers and len(raw_images) > n_markers:
        return None, "more images than <image> markers"
    images = []
    for item in raw_images:
        image, reason = load_image(item, base_dir)
        if image is None:
            return None, reason
        images.append(image)
    return Example(problem=problem, answer=answer, images=tuple(images), uid=uid), ""


def _encoding_problem(processor, example: Example) -> str:
    """Why `processor` cannot encode `example` as a prompt, or "" when it can."""
    try:
        encode_prompt(processor, example)
        return ""
    except Exception as err:  # noqa: BLE001 - any failure here would recur at every step
        logger.debug("row %s: the processor refuses the prompt: %s", example.uid, err)
        return f"prompt refused by the processor ({type(err).__name__})"


def iter_batches(
    examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0
) -> Iterable[list[Example]]:
    """Shuffled batches of `batch_size` (the last partial batch is dropped), seeded per epoch."""
    order = list(range(len(examples)))
    random.Random(f"cepo-batches/{seed}/{epoch}").shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]
