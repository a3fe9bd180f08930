"""Image resolution: every image is resized to between data.min_pixels and data.max_pixels.

The expected visual-token counts are computed by hand from the Qwen-VL resize rule (sides
rounded to multiples of patch × merge = 32, scaled up to the minimum area, then ceil to 32), not
by the processor under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from cepo import config as C
from cepo.config import ConfigError, build_config
from cepo.data import Example, encode_prompt, encode_prompts
from cepo.models import load_processor, set_image_pixels

PATCH, MERGE = 16, 2  # Qwen3-VL-2B/4B preprocessor_config.json (and the tiny model's)


def hand_tokens(width: int, height: int, min_pixels: int) -> int:
    """Visual tokens of an image below `min_pixels`: scale up, round each side up to 32."""
    factor = PATCH * MERGE
    assert round(height / factor) * round(width / factor) * factor**2 < min_pixels
    beta = math.sqrt(min_pixels / (width * height))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
    return (h // PATCH) * (w // PATCH) // MERGE**2


def figure(width=300, height=200) -> Example:
    return Example("<image>Find x.", "3", (Image.new("RGB", (width, height), "white"),))


@pytest.fixture(scope="module")
def paper_processor(tiny_dir):
    data = C.paper().data
    return load_processor(tiny_dir, min_pixels=data.min_pixels, max_pixels=data.max_pixels)


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


def test_a_300_by_200_figure_gets_280_visual_tokens_under_the_paper_preset(paper_processor):
    ip = paper_processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (PATCH, MERGE, 2)
    prompt = encode_prompt(paper_processor, figure())
    visual = int((prompt.mm_token_type_ids == 1).sum())
    assert visual == hand_tokens(300, 200, 262_144) == 280
    assert prompt.image_grid_thw.tolist() == [[1, 28, 40]]  # 448 × 640 pixels
    assert prompt.pixel_values.shape[0] == 28 * 40


def test_qwen3_vl_default_processor_gives_70_tokens_and_the_limits_give_280():
    """Qwen3-VL-2B's own preprocessor values (built offline): 70 tokens before, 280 after."""
    from transformers import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 65_536, "longest_edge": 16_777_216})
    image = Image.new("RGB", (300, 200), "white")
    grid = ip(images=[image])["image_grid_thw"][0]
    assert int(grid.prod()) // MERGE**2 == hand_tokens(300, 200, 65_536) == 70

    class Holder:  # a processor is anything with an image_processor
        image_processor = ip

    set_image_pixels(Holder, 262_144, 4_194_304)
    grid = ip(images=[image])["image_grid_thw"][0]
    assert int(grid.prod()) // MERGE**2 == 280
    set_image_pixels(Holder, None, 8_000_000)  # None keeps that limit as it is
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (262_144, 8_000_000)


def test_set_image_pixels_refuses_inverted_limits_and_foreign_processors(paper_processor):
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        set_image_pixels(paper_processor, 5000, 4000)

    class NoSize:
        image_processor = object()

    with pytest.raises(TypeError, match="shortest_edge"):
        set_image_pixels(NoSize, 1, 2)


def test_prompt_length_filter_counts_the_real_visual_tokens(paper_processor):
    prompt = encode_prompt(paper_processor, figure())
    n = prompt.input_ids.numel()
    assert n > 280
    kept, dropped = encode_prompts(paper_processor, [figure()], max_prompt_tokens=n)
    assert len(kept) == 1 and dropped == 0
    kept, dropped = encode_prompts(paper_processor, [figure()], max_prompt_tokens=n - 1)
    assert kept == [] and dropped == 1


def test_the_limits_of_one_processor_reach_every_encoding(tiny_dir):
    """Rollouts, teacher rows and updates all take their pixels from this one encoding."""
    small = load_processor(tiny_dir)
    large = load_processor(tiny_dir, min_pixels=128 * 128, max_pixels=128 * 128)
    example = figure(64, 64)
    a, b = encode_prompt(small, example), encode_prompt(large, example)
    assert a.image_grid_thw.tolist() == [[1, 4, 4]] and b.image_grid_thw.tolist() == [[1, 8, 8]]
    assert int((b.mm_token_type_ids == 1).sum()) == 16
    assert torch.equal(b.prefix().pixel_values, b.pixel_values)
