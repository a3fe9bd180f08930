"""Image resolution: every image is first resized to between data.min_pixels and data.max_pixels,
as the reference's dataset does, then by the processor's own rule.

The expected visual-token counts are computed by hand from the two rules (the reference's
aspect-kept scaling with sides truncated to whole pixels, then Qwen-VL's rounding of each side to
a multiple of patch × merge = 32), not by the code under test.
"""

from __future__ import annotations

import math

import pytest
from PIL import Image
from transformers.image_utils import SizeDict

from cepo import config as C
from cepo.config import ConfigError, build_config
from cepo.data import Example, encode_prompt, encode_prompts, fit_pixels, set_image_pixels
from cepo.models import load_processor

PATCH, MERGE = 16, 2  # Qwen3-VL-2B/4B preprocessor_config.json (and the tiny model's)
QWEN3_VL_SIZE = SizeDict(shortest_edge=65_536, longest_edge=16_777_216)  # their own pixel range


def qwen_tokens(width: int, height: int, min_pixels=65_536, max_pixels=16_777_216) -> int:
    """Visual tokens of a width × height image under Qwen-VL's rule (within its range)."""
    f = PATCH * MERGE
    h, w = round(height / f) * f, round(width / f) * f
    if h * w < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    assert h * w <= max_pixels
    return (h // PATCH) * (w // PATCH) // MERGE**2


def reference_size(width: int, height: int, min_pixels: int) -> tuple[int, int]:
    """The reference dataset's resize of an image below `min_pixels`."""
    factor = math.sqrt(min_pixels / (width * height))
    return int(width * factor), int(height * factor)


def figure(width=300, height=200, mode="RGB") -> Example:
    return Example("<image>Find x.", "3", (Image.new(mode, (width, height), "white"),))


def qwen3_vl_processor(tiny_dir, **limits):
    """The tiny model's processor with Qwen3-VL-2B's image processor values."""
    processor = load_processor(tiny_dir, **limits)
    processor.image_processor.size = QWEN3_VL_SIZE
    return processor


@pytest.fixture(scope="module")
def paper_processor(tiny_dir):
    data = C.paper().data
    return qwen3_vl_processor(tiny_dir, min_pixels=data.min_pixels, max_pixels=data.max_pixels)


def test_presets_carry_the_reference_limits_and_the_offline_run_keeps_its_small_images():
    for preset in (C.paper(), C.reference()):
        assert (preset.data.min_pixels, preset.data.max_pixels) == (262_144, 4_194_304)
    offline = build_config([])
    assert (offline.data.min_pixels, offline.data.max_pixels) == (None, None)
    cfg = build_config(["--min_pixels", "1000", "--max_pixels", "none"])
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (1000, None)


@pytest.mark.parametrize("args, match", [
    (["--min_pixels", "0"], "data.min_pixels=0"),
    (["--min_pixels", "5000", "--max_pixels", "4000"], "at most data.max_pixels=4000"),
])
def test_bad_pixel_limits_are_refused_at_start(args, match):
    with pytest.raises(ConfigError, match=match):
        build_config(args)


def test_a_300_by_200_figure_gets_260_visual_tokens_under_the_paper_preset(paper_processor):
    ip = paper_processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (PATCH, MERGE, 2)
    width, height = reference_size(300, 200, 262_144)
    assert (width, height) == (627, 418)
    prompt = encode_prompt(paper_processor, figure())
    visual = int((prompt.mm_token_type_ids == 1).sum())
    assert visual == qwen_tokens(width, height) == 260
    assert prompt.image_grid_thw.tolist() == [[1, 26, 40]]  # 416 × 640 pixels
    assert prompt.pixel_values.shape[0] == 26 * 40


def test_without_limits_qwen3_vl_gives_the_figure_70_tokens(tiny_dir):
    prompt = encode_prompt(qwen3_vl_processor(tiny_dir), figure())
    assert int((prompt.mm_token_type_ids == 1).sum()) == qwen_tokens(300, 200) == 70


def test_fit_pixels_is_the_reference_resize():
    small = Image.new("P", (300, 200))
    assert fit_pixels(small, None, None) is small  # no bounds: untouched
    up = fit_pixels(small, 262_144, 4_194_304)
    assert up.size == (627, 418) and up.mode == "RGB"
    big = fit_pixels(Image.new("RGB", (4000, 3000)), 262_144, 4_194_304)
    factor = math.sqrt(4_194_304 / 12_000_000)
    assert big.size == (int(4000 * factor), int(3000 * factor)) == (2364, 1773)
    same = Image.new("RGB", (600, 500))
    assert fit_pixels(same, 262_144, 4_194_304).size == (600, 500)


def test_set_image_pixels_refuses_bad_limits(tiny_dir):
    processor = load_processor(tiny_dir)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        set_image_pixels(processor, 5000, 4000)
    with pytest.raises(ValueError, match="max_pixels must be None or an integer >= 1"):
        set_image_pixels(processor, None, 0)
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_dir, min_pixels=2.5)


def test_prompt_length_filter_counts_the_real_visual_tokens(paper_processor):
    prompt = encode_prompt(paper_processor, figure())
    n = prompt.input_ids.numel()
    assert n > 260
    kept, dropped = encode_prompts(paper_processor, [figure()], max_prompt_tokens=n)
    assert len(kept) == 1 and dropped == 0
    kept, dropped = encode_prompts(paper_processor, [figure()], max_prompt_tokens=n - 1)
    assert kept == [] and dropped == 1


def test_the_limits_are_not_saved_with_the_processor(tiny_dir, tmp_path):
    """The range lives on the loaded processor only: a saved copy is the checkpoint's own."""
    processor = load_processor(tiny_dir, min_pixels=128 * 128, max_pixels=None)
    processor.save_pretrained(tmp_path)
    saved = "".join(p.read_text() for p in tmp_path.glob("*.json"))
    assert "image_processor" in saved and "cepo_pixel_range" not in saved
