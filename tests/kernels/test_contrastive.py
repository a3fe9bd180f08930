"""contrastive_logprobs / contrastive_evidence: every stream in one pass, against the oracle."""

import math

import pytest
import torch

from cepo_kernels import contrastive_evidence, contrastive_logprobs, reference
from tests.helpers import BACKENDS, DEVICE, assert_close, f64, make_problem


def _streams(N, D, V, K, dtype=torch.float32, bias=False, seed=0):
    h, w, y, b = make_problem(N, D, V, dtype=dtype, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.randn(N, D, generator=g).to(dtype).to(DEVICE)
    neg = torch.randn(K, N, D, generator=g).to(dtype).to(DEVICE) if K > 1 else \
        torch.randn(N, D, generator=g).to(dtype).to(DEVICE)
    return h, pos, neg, w, y, b


def _oracle(h, pos, neg, w, y, b, temperature=1.0):
    w64, b64 = f64(w, b)

    def lp(x):
        return reference.logprobs(x.double().cpu(), w64, y.cpu(), bias=b64,
                                  temperature=temperature)

    negs = neg if neg.dim() == h.dim() + 1 else neg.unsqueeze(0)
    neg_lp = reference.logmeanexp(torch.stack([lp(n) for n in negs]), dim=0)
    return lp(h), lp(pos), neg_lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_oracle(backend, K, dtype):
    h, pos, neg, w, y, b = _streams(41, 24, 777, K, dtype=dtype, bias=True)
    out = contrastive_logprobs(h, pos, neg, w, y, bias=b, temperature=0.8, backend=backend,
                               chunk_tokens=16, chunk_vocab=200)
    assert out.backend == backend
    for name, got, ref in zip(("policy", "pos", "neg"), out[:3],
                              _oracle(h, pos, neg, w, y, b, 0.8)):
        assert got.dtype == torch.float32
        assert_close(got, ref, atol=5e-5, rtol=1e-5, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evidence_matches_spec_formula(backend):
    """Δ, w, Â against docs/METHOD.md, "Advantages" evaluated in float64 from the oracle
    log-probs."""
    h, pos, neg, w, y, _ = _streams(36, 16, 500, 2)
    h, pos, y = h.view(4, 9, 16), pos.view(4, 9, 16), y.view(4, 9)
    neg = neg.view(2, 4, 9, 16)
    adv_seq = torch.tensor([1.3, -0.7, 0.0, 2.0], device=DEVICE)
    mask = torch.ones(4, 9, dtype=torch.bool, device=DEVICE)
    mask[3, 6:] = False
    out = contrastive_evidence(h, pos, neg, w, y, adv_seq, mask=mask, lam=0.5, eps_w=0.2,
                               backend=backend)
    lp_s, lp_p, lp_n = _oracle(h, pos, neg, w, y, None)
    adv = adv_seq.double().cpu()[:, None].expand(4, 9)
    valid = mask.cpu() & (y.cpu() != -100)
    expected = reference.cepo_advantages(adv, lp_p, lp_n, valid, lam=0.5, eps_w=0.2)
    assert_close(out.policy, lp_s, atol=5e-5, what="policy")
    assert_close(out.delta[valid], (lp_p - lp_n)[valid], atol=1e-4, what="delta")
    w_ref = torch.exp(torch.sign(adv) * (lp_p - lp_n)).clamp(0.8, 1.2)
    assert_close(out.token_weight[valid], w_ref[valid], atol=1e-4, what="token_weight")
    assert_close(out.advantages, expected, atol=1e-4, what="advantages")
    assert torch.all(out.advantages[~valid] == 0)
    assert not out.advantages.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_vocabulary_merge(backend, monkeypatch):
    """Force several vocabulary splits so the epilogue's merge of partial lse is exercised."""
    if backend == "triton":
        from cepo_kernels.ops import triton_launch

        orig = triton_launch.forward_config

        def split_cfg(*a, **k):
            cfg = orig(*a, **k)
            return {**cfg, "BLOCK_V": 64, "splits": 5}

        monkeypatch.setattr(triton_launch, "forward_config", split_cfg)
    h, pos, neg, w, y, _ = _streams(20, 16, 333, 1)
    out = contrastive_logprobs(h, pos, neg, w, y, backend=backend, chunk_vocab=64)
    for name, got, ref in zip(("policy", "pos", "neg"), out[:3], _oracle(h, pos, neg, w, y, None)):
        assert_close(got, ref, atol=5e-5, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_inputs_give_identical_streams(backend):
    """docs/METHOD.md, "Guarantees" (item 10) at the kernel level: identical hidden states ⇒
    identical log-probs, Δ = 0."""
    h, _, _, w, y, _ = _streams(25, 16, 300, 1)
    adv = torch.randn(25, device=DEVICE)
    out = contrastive_evidence(h, h.clone(), h.clone(), w, y, adv, lam=0.5, eps_w=0.5,
                               backend=backend)
    assert torch.equal(out.policy, out.pos) and torch.equal(out.pos, out.neg)
    assert torch.all(out.delta == 0)
    valid = y != -100
    assert torch.equal(out.advantages[valid], adv[valid])


def test_backends_agree():
    h, pos, neg, w, y, b = _streams(30, 16, 400, 2, bias=True)
    adv = torch.randn(30, device=DEVICE)
    outs = [contrastive_evidence(h, pos, neg, w, y, adv, lam=0.3, eps_w=0.4, bias=b, backend=be)
            for be in ("torch", "triton")] if DEVICE.type == "cuda" or \
        __import__("os").environ.get("TRITON_INTERPRET") == "1" else []
    if not outs:
        pytest.skip("triton unavailable")
    for name, a, c in zip(outs[0]._fields[:-1], outs[0][:-1], outs[1][:-1]):
        assert_close(a, c, atol=1e-4, what=name)


def test_huge_delta_does_not_overflow():
    """w is computed in log space: |Δ| up to 1e4 gives the clip bound, never inf/NaN."""
    from cepo_kernels import cepo_advantages

    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0])
    pos = torch.tensor([1e4, 1e4, -1e4, -1e4, 1e4])
    neg = torch.zeros(5)
    out = cepo_advantages(adv, pos, neg, None, lam=0.5, eps_w=0.2)
    assert torch.isfinite(out).all()
    # A>0 & Δ≫0 → w = 1.2; A<0 & Δ≫0 → w = 0.8; A>0 & Δ≪0 → 0.8; A<0 & Δ≪0 → 1.2; A=0 → 0
    expected = torch.tensor([0.5 + 0.5 * 1.2, -(0.5 + 0.5 * 0.8), 0.5 + 0.5 * 0.8,
                             -(0.5 + 0.5 * 1.2), 0.0])
    assert_close(out, expected, atol=1e-6, what="advantages")
    assert math.isfinite(float(out.sum()))
