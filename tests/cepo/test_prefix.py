"""Shared-prefix forwards against the unshared path: the same log-probs for student and teacher
rows, and the same gradient for every trainable parameter, on a tiny text model and the tiny
Qwen3-VL, for full fine-tuning and LoRA, with groups whose prompts (left padding in the unshared
batch) and responses (right padding) differ in length."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from cepo.batch import Prefix, collate
from cepo.config import AdapterConfig
from cepo.lora import apply_lora
from cepo.models import load_model, output_head, response_hidden, unwrap_model
from cepo.prefix import (
    PrefixSharingUnsupported,
    context_after,
    continuation_hidden,
    encode_prefix,
    grouped_response_hidden,
    prefix_sharing_unsupported,
    resolve_prefix_sharing,
    shared_response_hidden,
)
from cepo_kernels import fused_linear_logprobs
from tests.helpers import assert_close

IGNORE = -100
PAD = 0
LOGPROB_ATOL = 2e-5  # fp32 forwards that differ only in batch layout and summation order
GRAD_RTOL = 1e-4  # relative to the largest entry of each reference gradient


def text_model(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
                         attn_implementation=attn)
    return Qwen3ForCausalLM(config).eval()


def text_groups(gen: torch.Generator) -> list[Prefix]:
    lengths = (9, 17, 4)  # prompts of different lengths: left padding in the unshared batch
    return [Prefix(torch.randint(1, 96, (n,), generator=gen), torch.zeros(n, dtype=torch.int32))
            for n in lengths]


@pytest.fixture(params=["text", "vl"])
def setup(request, tiny_dir, encoded):
    """(model factory, prompt prefixes of different lengths, token-id bound for random text)."""
    if request.param == "text":
        gen = torch.Generator().manual_seed(0)
        return text_model, text_groups(gen), 96
    by_length = sorted(encoded, key=lambda p: p.input_ids.numel())
    prompts = [by_length[i].prefix() for i in (0, -1, len(by_length) // 2)]
    assert len({p.input_ids.numel() for p in prompts}) > 1
    assert any(p.pixel_values is not None for p in prompts)
    return (lambda: load_model(tiny_dir, device="cpu")), prompts, 300  # ids below the specials


def make_responses(gen, groups, g, bound):
    """Per group: [G, T] right-padded ids/mask (lengths 1..T), a T+ hint and a T- hint."""
    out, width = [], 7
    for _ in groups:
        lengths = torch.randint(1, width + 1, (g,), generator=gen)
        lengths[0] = width if g > 1 else lengths[0]
        ids = torch.randint(1, bound, (g, width), generator=gen)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, PAD)
        hint_pos = torch.randint(1, bound, (int(torch.randint(1, 4, (), generator=gen)),),
                                 generator=gen)
        hint_neg = torch.randint(1, bound, (int(torch.randint(1, 6, (), generator=gen)),),
                                 generator=gen)
        out.append((ids, mask, hint_pos, hint_neg))
    return out


def unshared_hidden(model, prefixes, ids, mask):
    """Today's path: one left-padded batch of [context | response], hidden states of the last T."""
    return response_hidden(model, collate(prefixes, PAD, ids, mask), ids.shape[1])


def logprobs(model, hidden, ids, mask):
    weight, bias = output_head(model)
    labels = ids.masked_fill(~mask.bool(), IGNORE)
    lp = fused_linear_logprobs(hidden, weight, labels, bias=bias, backend="torch").logprobs
    return torch.where(mask.bool(), lp, 0.0)


@pytest.mark.parametrize("g", [1, 8])
def test_scoring_matches_unshared_path(setup, g):
    factory, groups, bound = setup
    model = factory()
    data = make_responses(torch.Generator().manual_seed(g), groups, g, bound)
    streams = {"student": lambda d: None, "pos": lambda d: d[2], "neg": lambda d: d[3]}
    with torch.no_grad():
        for name, hint in streams.items():
            # unshared: every row of every group in one batch, as the scoring core does today
            prefixes = [p if hint(d) is None else p.extend(hint(d))
                        for p, d in zip(groups, data) for _ in range(g)]
            ids = torch.cat([d[0] for d in data])
            mask = torch.cat([d[1] for d in data])
            expected = logprobs(model, unshared_hidden(model, prefixes, ids, mask), ids, mask)
            shared = []
            for prefix, d in zip(groups, data):
                encoded = encode_prefix(model, prefix)  # once per group for all three streams
                contexts = None if hint(d) is None else [hint(d)] * g
                h = shared_response_hidden(model, encoded, d[0], d[1], contexts=contexts,
                                           micro_batch_size=3)
                shared.append(logprobs(model, h, d[0], d[1]))
            assert_close(torch.cat(shared), expected, atol=LOGPROB_ATOL, what=name)


def test_mixed_contexts_in_one_batch_and_eager_attention():
    """Student and teacher rows (hint lengths 0, 2, 5) in one continuation batch; the eager
    attention implementation gives the same as SDPA."""
    gen = torch.Generator().manual_seed(3)
    prefix = text_groups(gen)[1]
    ids = torch.randint(1, 96, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    hints = [torch.zeros(0, dtype=torch.long), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9, 10])]
    for attn in ("sdpa", "eager"):
        model = text_model(attn)
        with torch.no_grad():
            got = shared_response_hidden(model, prefix, ids, mask, contexts=hints)
            want = unshared_hidden(model, [prefix.extend(h) for h in hints], ids, mask)
        valid = mask.bool()[..., None]
        assert_close(torch.where(valid, got, 0.0), torch.where(valid, want, 0.0), atol=2e-6,
                     what=attn)
        assert not got[~mask.bool()].any()  # padding is zero, never garbage


def prepare(model, mode: str):
    if mode == "lora":
        vision = hasattr(unwrap_model(model).model, "visual")
        model = apply_lora(model, AdapterConfig(rank=4, alpha=8.0,
                                                exclude_modules=r".*visual.*" if vision else ""))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():  # B starts at 0 (no gradient into A): make the adapter live
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    else:
        model.requires_grad_(True)
    return model.train()


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("g", [1, 8])
def test_update_gradients_match_unshared_path(setup, mode, g):
    factory, groups, bound = setup
    data = make_responses(torch.Generator().manual_seed(10 + g), groups, g, bound)
    gen = torch.Generator().manual_seed(7)
    coefs = [torch.randn(d[0].shape, generator=gen) for d in data]  # a loss using every token

    model = prepare(factory(), mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    hidden = unshared_hidden(model, [p for p in groups for _ in range(g)], ids, mask)
    (logprobs(model, hidden, ids, mask) * torch.cat(coefs)).sum().backward()
    expected = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    for prefix, d, coef in zip(groups, data, coefs):  # a backward per group: prefix grad once
        # G = 8: the continuations in micro-batches of 3 rows, all on one prefix graph
        h = shared_response_hidden(model, prefix, d[0], d[1], micro_batch_size=3)
        (logprobs(model, h, d[0], d[1]) * coef).sum().backward()
    checked = 0
    for name, p in params.items():
        want = expected[name]
        if p.grad is None:
            assert not want.any(), f"{name}: no gradient through the shared path"
            continue
        scale = want.abs().max().item() or 1.0
        assert_close(p.grad, want, atol=GRAD_RTOL * scale, what=name)
        checked += bool(want.any())
    assert checked >= len(params) // 2  # most parameters really had a gradient to compare
    if hasattr(unwrap_model(model).model, "visual") and mode == "full":
        visual = [p.grad for n, p in params.items() if "visual" in n]
        assert any(gr is not None and gr.any() for gr in visual)  # the image's gradient too


def test_gradient_flows_through_the_cached_keys_and_values():
    model = prepare(text_model(), "full")
    prefix = text_groups(torch.Generator().manual_seed(4))[0]
    encoded = encode_prefix(model, prefix)
    for t in encoded.keys + encoded.values:
        assert t.requires_grad
        t.retain_grad()
    encoded.last_hidden.retain_grad()
    hidden = continuation_hidden(model, encoded, [torch.tensor([3, 4, 5]), torch.tensor([6])])
    hidden[:, 1:].square().sum().backward()  # excludes the prompt's own last hidden state
    for t in encoded.keys + encoded.values:
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert encoded.last_hidden.grad is None or not encoded.last_hidden.grad.any()
    embed = unwrap_model(model).model.embed_tokens.weight.grad
    assert embed[prefix.input_ids].abs().sum() > 0  # reached the prompt's embeddings via KV


def test_prefix_given_as_a_left_padded_batch_row():
    model = text_model()
    prefix = text_groups(torch.Generator().manual_seed(6))[0]
    row = collate([prefix, Prefix(torch.arange(1, 15), torch.zeros(14, dtype=torch.int32))], PAD)
    conts = [torch.tensor([1, 2, 3])]
    with torch.no_grad():
        want = continuation_hidden(model, encode_prefix(model, prefix), conts)
        padded = collate([prefix], PAD)
        got = continuation_hidden(model, encode_prefix(model, type(padded)(
            row.input_ids[:1], row.attention_mask[:1], row.mm_token_type_ids[:1])), conts)
    assert row.attention_mask[0, 0] == 0  # really left-padded
    assert_close(got, want, atol=1e-6)
    bad = type(padded)(row.input_ids[:1].flip(1), row.attention_mask[:1].flip(1),
                       row.mm_token_type_ids[:1])
    with pytest.raises(ValueError, match="left-padded"):
        encode_prefix(model, bad)
    with pytest.raises(ValueError, match="right-padded"):
        shared_response_hidden(model, prefix, torch.ones(1, 3, dtype=torch.long),
                               torch.tensor([[1, 0, 1]]))


def checkpointing(model, reentrant: bool = False):
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def test_switch_and_fallback():
    model = text_model()
    assert resolve_prefix_sharing("auto", model)[0]
    assert not resolve_prefix_sharing("false", model)[0]
    with pytest.raises(ValueError, match="prefix_sharing"):
        resolve_prefix_sharing("maybe", model)
    assert "no config" in prefix_sharing_unsupported(torch.nn.Linear(2, 2))
    checkpointing(model, reentrant=True).train()
    assert resolve_prefix_sharing("auto", model)[0]  # scoring: no grad, nothing to checkpoint
    on, line = resolve_prefix_sharing("auto", model, grad=True)
    assert not on and "reentrant" in line
    with pytest.raises(PrefixSharingUnsupported, match="reentrant"):
        resolve_prefix_sharing("true", model, grad=True)
    with pytest.raises(PrefixSharingUnsupported):
        encode_prefix(model, text_groups(torch.Generator().manual_seed(0))[0])
    assert resolve_prefix_sharing("true", checkpointing(text_model()).train(), grad=True)[0]
    # an FSDP-sharded update: auto stays unshared (checked in one process only), true opts in
    plain = text_model()
    on, line = resolve_prefix_sharing("auto", plain, grad=True, sharded=True)
    assert not on and "sharding=fsdp" in line
    assert resolve_prefix_sharing("auto", plain, sharded=True)[0]  # scoring runs on full weights
    assert resolve_prefix_sharing("true", plain, grad=True, sharded=True)[0]


def test_gradient_checkpointing_keeps_the_shared_prefix(setup):
    """Non-reentrant gradient checkpointing (how cepo loads models for it): the checkpointed
    layers keep the shared cache, and the gradients are still the unshared path's."""
    factory, groups, bound = setup
    g = 4
    data = make_responses(torch.Generator().manual_seed(21), groups, g, bound)
    coefs = [torch.randn(d[0].shape, generator=torch.Generator().manual_seed(8)) for d in data]
    model = prepare(factory(), "full")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    hidden = unshared_hidden(model, [p for p in groups for _ in range(g)], ids, mask)
    (logprobs(model, hidden, ids, mask) * torch.cat(coefs)).sum().backward()
    expected = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    checkpointing(model).train()
    for prefix, d, coef in zip(groups, data, coefs):
        h = shared_response_hidden(model, prefix, d[0], d[1], micro_batch_size=3)
        (logprobs(model, h, d[0], d[1]) * coef).sum().backward()
    for name, p in params.items():
        want = expected[name]
        got = p.grad if p.grad is not None else torch.zeros_like(want)
        assert_close(got, want, atol=GRAD_RTOL * (want.abs().max().item() or 1.0), what=name)


def test_context_after_recovers_the_hint(encoded):
    prompt = encoded[0].prefix()
    hint = torch.tensor([5, 6, 7])
    assert torch.equal(context_after(prompt, prompt.extend(hint)), hint)
    assert context_after(prompt, prompt).numel() == 0
    with pytest.raises(ValueError, match="does not begin"):
        context_after(encoded[1].prefix().extend(hint), prompt.extend(hint))
    blind = encoded[0].prefix(with_images=False)
    if prompt.pixel_values is not None:  # the image-blind teacher prompt is its own prefix
        with pytest.raises(ValueError):
            context_after(prompt, blind.extend(hint))


def test_grouped_rows_in_any_order_encode_each_prompt_once(monkeypatch):
    """A micro-batch mixing groups (as in the scoring core): rows come back in their own order,
    each prompt is encoded once, and a kept encoding is reused by a later call."""
    import cepo.prefix as prefix_module

    model = text_model()
    gen = torch.Generator().manual_seed(9)
    prompts = text_groups(gen)
    group = [2, 0, 2, 1, 0]
    ids = torch.randint(1, 96, (5, 4), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    hints = [torch.randint(1, 96, (i % 3,), generator=gen) for i in range(5)]
    calls = []
    real = prefix_module.encode_prefix
    monkeypatch.setattr(prefix_module, "encode_prefix",
                        lambda m, p: calls.append(p) or real(m, p))
    kept = {}
    with torch.no_grad():
        got = grouped_response_hidden(model, prompts, group, ids, mask, contexts=hints,
                                      encoded=kept)
        again = grouped_response_hidden(model, prompts, group, ids, mask, encoded=kept)
        want = unshared_hidden(model, [prompts[g].extend(h) for g, h in zip(group, hints)],
                               ids, mask)
        want_plain = unshared_hidden(model, [prompts[g] for g in group], ids, mask)
    assert len(calls) == 3 and sorted(kept) == [0, 1, 2]
    valid = mask.bool()[..., None]
    assert_close(torch.where(valid, got, 0.0), torch.where(valid, want, 0.0), atol=2e-6)
    assert_close(torch.where(valid, again, 0.0), torch.where(valid, want_plain, 0.0), atol=2e-6)
    with pytest.raises(ValueError, match="group indices"):
        grouped_response_hidden(model, prompts, [0, 1, 3, 0, 0], ids, mask)


class _SharedLoss(torch.nn.Module):
    """A loss module whose one forward runs every group's prefix and continuations (as the
    update's `PolicyLoss` would with sharing), so FSDP sees its blocks called many times."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch=None, shared: bool = True):
        if batch is None:  # the no-op call `cepo.sharding.shard` makes to find the root
            return None
        prompts, group, ids, mask, coef = batch
        if shared:
            hidden = grouped_response_hidden(self.model, prompts, group, ids, mask)
        else:
            hidden = unshared_hidden(self.model, [prompts[g] for g in group], ids, mask)
        return (logprobs(self.model, hidden, ids, mask) * coef).sum()


def test_fsdp_sharded_shared_prefix_gradients(tmp_path):
    """FSDP2 (cepo.sharding, a world of one): blocks run once per prefix and once per
    continuation batch inside one root forward; the gradients are still the unshared ones."""
    import torch.distributed as dist

    from cepo import sharding

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    groups = text_groups(torch.Generator().manual_seed(0))
    data = make_responses(torch.Generator().manual_seed(3), groups, 4, 96)
    batch = (groups, [g for g in range(len(groups)) for _ in range(4)],
             torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]),
             torch.randn(12, 7, generator=torch.Generator().manual_seed(1)))

    def grads(shard: bool, shared: bool) -> dict[str, torch.Tensor]:
        loss = _SharedLoss(prepare(text_model(), "full"))
        if shard:
            sharding.shard(loss, loss.model)
            assert len(sharding.units(loss)) > 1  # the decoder blocks and the root
        loss(batch, shared).backward()
        return {n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)()
                for n, p in loss.named_parameters() if p.grad is not None}

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        expected, got = grads(False, False), grads(True, True)
    finally:
        dist.destroy_process_group()
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert_close(got[name], want, atol=GRAD_RTOL * want.abs().max().item(), what=name)
