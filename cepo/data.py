"""Datasets in Geo3k's schema and the prompts built from them.

Geo3k rows are ``{"images": [image], "problem": "<image>Find x. ...", "answer": "3"}``. They come
from a local parquet file, JSON-lines file or `datasets` directory, or from the hub where it is
reachable (`load_geo3k`), or from a built-in synthetic visual-math set drawn with PIL
(`synthetic_dataset`), so everything runs offline. A bad row (no answer, missing or undecodable
image) is skipped and counted, never a crash mid-run; a source with no usable row is an error.

Prompts follow the Geo3k recipe of SPEC §6: the problem (trimmed) + `FORMAT_SUFFIX`, split on
``<image>`` into image and text parts of a single user turn, rendered with the model's own chat
template with the assistant header appended.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from cepo.batch import Prefix

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
    text_only_ids: torch.Tensor  # [L'] the same prompt with the images left out
    example: Example

    def prefix(self, *, with_images: bool = True) -> Prefix:
        """This prompt as a batch row; `with_images=False` gives the image-free rendering."""
        if with_images:
            return Prefix(
                self.input_ids, self.mm_token_type_ids, self.pixel_values, self.image_grid_thw
            )
        return Prefix(self.text_only_ids, torch.zeros_like(self.text_only_ids, dtype=torch.int32))


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
    """Tokenise one example with its images (and once more without, for image-blind teachers)."""
    images = list(example.images) or None
    enc = processor(text=[prompt_text(processor, example)], images=images, return_tensors="pt")
    ids = enc["input_ids"][0]
    mm = enc.get("mm_token_type_ids")
    if mm is None:  # processors other than Qwen's: mark the image placeholder tokens ourselves
        mm = (ids == processor.image_token_id).long()[None]
    text_only = processor.tokenizer(
        prompt_text(processor, example, with_images=False), add_special_tokens=False
    )["input_ids"]
    return EncodedPrompt(
        input_ids=ids.long(),
        mm_token_type_ids=mm[0].to(torch.int32),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        text_only_ids=torch.tensor(text_only, dtype=torch.long),
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
    source: str, split: str = "train", *, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """``"synthetic"`` -> `synthetic_dataset`; anything else -> `load_geo3k`."""
    if source == "synthetic":
        return synthetic_dataset(split, size=limit, seed=seed)
    return load_geo3k(source, split, limit=limit)


def load_geo3k(source: str, split: str = "train", *, limit: int | None = None) -> list[Example]:
    """Examples from a Geo3k-schema source: a parquet or JSON-lines file, a directory holding
    such files (``*<split>*.parquet`` / ``*<split>*.jsonl``, as in a hub snapshot) or a
    `datasets.save_to_disk` directory, or else a hub id (e.g. ``hiyouga/geometry3k``).

    A single file is read whole (`split` only selects files in a directory or a saved/hub
    dataset). `limit` stops after that many usable examples.
    """
    rows, base_dir = _read_rows(source, split)
    examples, skipped = [], Counter()
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        example, reason = _row_to_example(row, base_dir, uid=f"{split}-{i}")
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


def _read_rows(source: str, split: str) -> tuple[list[dict], Path | None]:
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path), path.parent
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, split), path
        files = sorted(
            p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl") and split in p.name
        )
        if not files:
            raise FileNotFoundError(
                f"{source}: no *{split}*.parquet / *{split}*.jsonl file and no saved `datasets` "
                "directory found"
            )
        return [row for f in files for row in _read_file(f)], path
    if "/" in source and not source.startswith((".", "/", "~")):
        return _read_hub(source, split), None
    raise FileNotFoundError(f"{source!r} is neither a file, a directory nor a hub id")


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (parquet, jsonl or json)")


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"{path}: no split {split!r}; available: {list(ds)}")
        ds = ds[split]
    return ds.data.table.to_pylist()  # raw arrow rows: images stay undecoded {bytes, path}


def _read_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure means "not available here"
        raise FileNotFoundError(
            f"{source!r} is not a local path and could not be loaded from the hub ({err}); "
            "download it and pass the directory instead"
        ) from err
    return ds.data.table.to_pylist()


def _row_to_example(row: dict, base_dir: Path | None, uid: str) -> tuple[Example | None, str]:
    missing = [k for k in ("problem", "answer") if k not in row]
    if missing:
        raise KeyError(f"row {uid} lacks field(s) {missing}; fields present: {sorted(row)}")
    answer = row["answer"]
    if answer is None or not str(answer).strip():
        return None, "missing answer"
    problem = row["problem"]
    if not isinstance(problem, str) or not problem.strip():
        return None, "missing problem"
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
        image = _decode_image(item, base_dir)
        if image is None:
            return None, "bad image"
        images.append(image)
    return Example(problem=problem, answer=str(answer).strip(), images=tuple(images), uid=uid), ""


def _decode_image(item, base_dir: Path | None) -> Image.Image | None:
    """PIL image (RGB) from a PIL image, bytes, ``{"bytes", "path"}``, a path or a data URI."""
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, dict):
            if item.get("bytes"):
                image = Image.open(io.BytesIO(item["bytes"]))
            elif item.get("path"):
                return _decode_image(item["path"], base_dir)
            else:
                return None
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        elif isinstance(item, str) and item.startswith("data:image"):
            image = Image.open(io.BytesIO(base64.b64decode(item.split(",", 1)[1])))
        elif isinstance(item, str):
            p = Path(item)
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            image = Image.open(p)
        else:
            return None
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):  # PIL raises all three on corrupt data
        return None


# --------------------------------------------------------------------------- synthetic set

SYNTHETIC_SIZES = {"train": 512, "val": 128}
_SPLIT_ALIASES = {"validation": "val", "test": "val"}
CHAIN_TERMS = 3  # numbers added in a chain-sum problem: two worked steps
# The offline default: a problem the tiny model can read (digits in the text); the four visual
# kinds need a vision tower that can read 64x64 drawings, which the tiny model's cannot.
DEFAULT_KINDS = ("chain_sum",)
VISUAL_KINDS = ("dots", "number_sum", "bar_fraction", "grid_area")


def synthetic_dataset(
    split: str = "train",
    *,
    size: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> list[Example]:
    """A deterministic math set in Geo3k's schema, drawn with PIL, checkable by `cepo.grading`.

    Kinds, used in turn: ``chain_sum`` (the default) asks for ``a + b + c`` with the digits in
    the text and drawn in the image, to be worked step by step (`chain_solution`), so a right and
    a wrong response differ in a few tokens of shared reasoning. The four `VISUAL_KINDS`
    are answerable only from the image: counting dots, adding two drawn numbers, the shaded
    fraction of a bar (answer ``\\frac{k}{d}``) and the area of a shaded rectangle on a unit grid.
    Train and val use disjoint random streams (the split name is part of the seed), so the same
    seed always gives the same examples.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SYNTHETIC_SIZES:
        raise ValueError(f"synthetic split must be one of {sorted(SYNTHETIC_SIZES)}, got {split!r}")
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"synthetic kinds must be a non-empty subset of {sorted(_MAKERS)}, "
                         f"got {list(kinds)!r}")
    n = SYNTHETIC_SIZES[split] if size is None else size
    rng = random.Random(f"cepo-synthetic/{seed}/{split}")  # str seeds hash deterministically
    makers = [_MAKERS[k] for k in kinds]
    return [
        _make(makers[i % len(makers)], rng, image_size, uid=f"synthetic-{split}-{i}")
        for i in range(n)
    ]


_CHAIN = re.compile(r"What is (\d+(?: \+ \d+)+)\?")


def chain_terms(problem: str) -> list[int] | None:
    """The numbers of a ``chain_sum`` problem (``[3, 5, 2]``), or None for any other problem."""
    match = _CHAIN.search(problem)
    return [int(x) for x in match.group(1).split(" + ")] if match else None


def chain_solution(terms: Sequence[int], slips: Sequence[int] = ()) -> tuple[str, int]:
    """The worked steps of a chain sum and their result: ``("3+5=8, 8+2=10", 10)``.

    ``slips[k]`` is added to step k's result (0: no slip); later steps carry the slipped number
    on, as a student who slipped would, so the decisive tokens are the slipped step's.
    """
    total, steps = terms[0], []
    for k, term in enumerate(terms[1:]):
        result = total + term + (slips[k] if k < len(slips) else 0)
        steps.append(f"{total}+{term}={result}")
        total = result
    return ", ".join(steps), total


def _chain_sum(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> tuple[str, str]:
    terms = [rng.randint(1, 9) for _ in range(CHAIN_TERMS)]
    text = " + ".join(map(str, terms))
    font = ImageFont.load_default(size=max(8, size // 6))
    draw.text((size // 16, size // 3), text, fill="black", font=font)
    return f"What is {text}?", str(sum(terms))


def _make(maker, rng: random.Random, size: int, uid: str) -> Example:
    image = Image.new("RGB", (size, size), "white")
    problem, answer = maker(rng, ImageDraw.Draw(image), size)
    return Example(problem=IMAGE_PLACEHOLDER + problem, answer=answer, images=(image,), uid=uid)


def _dots(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> tuple[str, str]:
    n = rng.randint(1, 9)
    r = max(2, size // 16)
    cells = rng.sample(range(16), n)  # a 4x4 grid of slots keeps dots apart
    for c in cells:
        cx = (c % 4) * size // 4 + size // 8 + rng.randint(-r // 2, r // 2)
        cy = (c // 4) * size // 4 + size // 8 + rng.randint(-r // 2, r // 2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill="black")
    return "How many dots are in the image?", str(n)


def _number_sum(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> tuple[str, str]:
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    font = ImageFont.load_default(size=max(10, size // 4))
    draw.text((size // 10, size // 6), str(a), fill="black", font=font)
    draw.text((size // 2, size // 2), str(b), fill="blue", font=font)
    return "What is the sum of the two numbers shown?", str(a + b)


def _bar_fraction(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> tuple[str, str]:
    parts = rng.randint(2, 8)
    shaded = rng.randint(1, parts - 1)
    top, bottom, left, width = size // 3, 2 * size // 3, size // 16, size - size // 8
    for i in range(parts):
        x0 = left + i * width // parts
        x1 = left + (i + 1) * width // parts
        draw.rectangle(
            (x0, top, x1, bottom), fill="gray" if i < shaded else "white", outline="black"
        )
    return "What fraction of the bar is shaded?", f"\\frac{{{shaded}}}{{{parts}}}"


def _grid_area(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> tuple[str, str]:
    cells = 8
    step = size // cells
    w, h = rng.randint(1, 6), rng.randint(1, 6)
    x, y = rng.randint(0, cells - w), rng.randint(0, cells - h)
    draw.rectangle((x * step, y * step, (x + w) * step, (y + h) * step), fill="orange")
    for i in range(cells + 1):
        draw.line((i * step, 0, i * step, size), fill="black")
        draw.line((0, i * step, size, i * step), fill="black")
    return (
        "Each small square has side 1. What is the area of the shaded rectangle?",
        str(w * h),
    )


_MAKERS = {
    "chain_sum": _chain_sum,
    "dots": _dots,
    "number_sum": _number_sum,
    "bar_fraction": _bar_fraction,
    "grid_area": _grid_area,
}


def iter_batches(
    examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0
) -> Iterable[list[Example]]:
    """Shuffled batches of `batch_size` (the last partial batch is dropped), seeded per epoch."""
    order = list(range(len(examples)))
    random.Random(f"cepo-batches/{seed}/{epoch}").shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]
