"""Batched sampling with HF generate: layout, masks, EOS handling, chunking."""

from __future__ import annotations

import pytest
import torch

from cepo.rollout import HFRolloutEngine, RolloutConfig


@pytest.fixture(scope="module")
def engine(model, processor):
    return HFRolloutEngine(model, processor)


def test_sampled_rollouts_layout_and_masks(engine, encoded, processor):
    prompts = encoded[:4]
    r = engine.generate(prompts, RolloutConfig(group_size=4, max_new_tokens=24))
    n, t = r.response_ids.shape
    assert n == 16 and r.num_rollouts == 16 and 1 <= t <= 24
    assert r.prompt_index.tolist() == [p for p in range(4) for _ in range(4)]
    assert r.ground_truths() == [p.example.answer for p in prompts for _ in range(4)]
    eos = set(engine.eos_token_ids)
    for row in range(n):
        mask = r.response_mask[row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # 1...1 0...0
        ids = r.response_ids[row]
        assert (ids[length:] == r.pad_token_id).all()
        ended = [i for i in range(length) if int(ids[i]) in eos]
        if r.truncated[row]:
            assert not ended and length == 24
        else:
            assert ended == [length - 1]  # exactly one EOS, the last kept token
        assert r.texts[row] == processor.tokenizer.decode(ids[:length], skip_special_tokens=True)
        assert not set(ids[:length].tolist()) & set(engine.suppressed_ids)
        # rows of one group share their prompt
        p = prompts[row // 4]
        width = p.input_ids.numel()
        assert torch.equal(r.prompt_ids[row, -width:], p.input_ids)
        assert r.prompt_mask[row].sum() == width
    assert not engine.model.training


def test_greedy_is_deterministic_and_chunking_does_not_change_it(engine, encoded):
    cfg = RolloutConfig(group_size=2, temperature=0.0, max_new_tokens=8)
    whole = engine.generate(encoded[:3], cfg)
    chunked = engine.generate(
        encoded[:3],
        RolloutConfig(group_size=2, temperature=0.0, max_new_tokens=8, generation_batch_size=4),
    )
    assert torch.equal(whole.response_ids, chunked.response_ids)
    assert torch.equal(whole.response_mask, chunked.response_mask)
    # greedy: both rollouts of a group are the same sequence
    assert torch.equal(whole.response_ids[0::2], whole.response_ids[1::2])


def test_sampling_is_seeded(engine, encoded):
    cfg = RolloutConfig(group_size=2, max_new_tokens=6)
    torch.manual_seed(7)
    a = engine.generate(encoded[:2], cfg)
    torch.manual_seed(7)
    b = engine.generate(encoded[:2], cfg)
    assert torch.equal(a.response_ids, b.response_ids)


def test_mask_after_eos(engine):
    e = engine.eos_token_ids[0]
    ids = torch.tensor([[5, e, 7, e], [e, 3, 3, 3], [1, 2, 3, 4]])
    mask, truncated = engine._mask_after_eos(ids)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_rollout_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        RolloutConfig(group_size=0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutConfig(max_new_tokens=0)


def test_no_prompts_is_an_error(engine):
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], RolloutConfig())
