"""`teacher_images=false`: the reference code's image-blind teacher context, token for token.

The reference keeps the vision block of the student prompt and replaces every ``<|image_pad|>``
by the pad token ``<|endoftext|>``; the row is attended everywhere, gets plain sequential
positions (0..L-1 in all four mRoPE components) and no pixels. The expected rows below are built
from the chat text by hand, not from the code under test.
"""

from __future__ import annotations

import torch

from cepo.batch import collate
from cepo.config import TeacherConfig
from cepo.contexts import build_teacher_contexts
from cepo.data import Example, encode_prompt, prompt_text
from cepo.integrations.trl.teachers import row_prefixes
from cepo.models import forward_hidden, position_ids
from cepo.rollout import RolloutConfig

G = 4
N_VISUAL = 4  # a 64×64 synthetic image in the tiny model: (64/16)² patches / 2² merged


def reference_context(processor, example: Example, hint: str) -> torch.Tensor:
    """The reference's teacher context: the chat text with N pads in the vision block + hint."""
    tok = processor.tokenizer
    text = prompt_text(processor, example)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    text = text.replace("<|image_pad|>", "<|endoftext|>" * N_VISUAL)
    ids = tok(text, add_special_tokens=False)["input_ids"] + tok(
        hint, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def test_blind_teacher_context_is_the_reference_layout(processor, scripted_engine, grader,
                                                       examples):
    from cepo.reward import compute_rewards

    prompts = [encode_prompt(processor, e) for e in examples[:1]]
    rollouts = scripted_engine().generate(prompts, RolloutConfig(group_size=G))
    rewards = compute_rewards(rollouts.texts, rollouts.ground_truths(), grader)
    config = TeacherConfig(teacher_images=False)
    ctx = build_teacher_contexts(rollouts, rewards, processor.tokenizer, config)
    example = examples[0]
    pos = reference_context(processor, example, f" {example.answer}")
    neg = reference_context(processor, example, " 999")
    assert ctx.pos[0].input_ids.tolist() == pos.tolist()
    assert ctx.neg[0][0].input_ids.tolist() == neg.tolist()
    tok = processor.tokenizer
    block = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>",) + ("<|endoftext|>",)
             * N_VISUAL + ("<|vision_end|>",)]
    ids = pos.tolist()
    start = ids.index(block[0])
    assert ids[start: start + len(block)] == block  # the vision block is kept, pads inside
    for prefix in (ctx.pos[0], ctx.neg[0][0]):
        assert prefix.pixel_values is None and prefix.image_grid_thw is None
        assert int(prefix.mm_token_type_ids.abs().sum()) == 0  # all text


def test_blind_rows_get_sequential_positions_and_attend_every_token(model, processor, examples):
    prompt = encode_prompt(processor, examples[0])
    blind, seeing = prompt.prefix(with_images=False), prompt.prefix()
    response = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # a longer row in the batch forces left padding on the blind one
    other = blind.extend(torch.tensor([9, 9, 9]))
    inputs = collate([blind, other], processor.tokenizer.pad_token_id,
                     response.repeat(2, 1), mask.repeat(2, 1))
    pos = position_ids(model, inputs)  # [4, B, L]
    n = blind.input_ids.numel() + 3  # prompt + real response tokens
    left = inputs.input_ids.shape[1] - blind.input_ids.numel() - 4
    assert left == 3 and inputs.attention_mask[0, left: left + n].all()
    expected = torch.arange(n).expand(4, n)
    assert torch.equal(pos[:, 0, left: left + n], expected)  # plain 0..n-1 in all 4 parts
    seeing_pos = position_ids(model, collate([seeing], processor.tokenizer.pad_token_id))
    assert not torch.equal(seeing_pos[1:, 0], seeing_pos[0, 0].expand(3, -1))  # images: mRoPE
    # the forward with these positions is the model's forward with explicit sequential ones
    single = collate([blind], processor.tokenizer.pad_token_id, response, mask)
    with torch.no_grad():
        ours = forward_hidden(model, single)
        ref = model.model(input_ids=single.input_ids, attention_mask=single.attention_mask,
                          position_ids=torch.arange(single.input_ids.shape[1]).expand(4, 1, -1),
                          use_cache=False).last_hidden_state
    torch.testing.assert_close(ours[0, :n], ref[0, :n], atol=1e-5, rtol=1e-5)


def test_trl_blind_rows_are_the_reference_layout(processor, examples):
    tok = processor.tokenizer
    enc = [encode_prompt(processor, e) for e in examples[:2]]
    batch = collate([p.prefix() for p in enc], tok.pad_token_id)
    out = {"prompt_ids": batch.input_ids, "prompt_mask": batch.attention_mask,
           "mm_token_type_ids": batch.mm_token_type_ids}
    rows = row_prefixes(out, with_images=False, blind_token_id=tok.pad_token_id)
    for row, example in zip(rows, examples[:2]):
        assert row.input_ids.tolist() == reference_context(processor, example, "").tolist()
        assert row.pixel_values is None and int(row.mm_token_type_ids.sum()) == 0
    # without mm_token_type_ids (other processors) the placeholder ids still mark the image
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    out.pop("mm_token_type_ids")
    again = row_prefixes(out, with_images=False, blind_token_id=tok.pad_token_id,
                         placeholder_ids=[image_pad])
    assert [r.input_ids.tolist() for r in again] == [r.input_ids.tolist() for r in rows]
