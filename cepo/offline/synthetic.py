"""The offline kit's synthetic visual-math sets in Geo3k's schema, drawn with PIL: the data of the
offline default (``--data.train synthetic``, registered by `cepo.offline`).

Every example is checkable by `cepo.grading`, deterministic for a seed and split, and needs no
download. `chain_terms` / `chain_solution` describe the default chain sums for the warm-up
(`cepo.offline.warmup`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from cepo.data import IMAGE_PLACEHOLDER, Example

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
