"""Inputs as users have them: token ids of any integer dtype, on every backend."""

import pytest
import torch

from cepo_kernels import (
    CEPOLoss,
    contrastive_evidence,
    fused_linear_logprobs,
    ppo_clip_loss,
    reference,
)
from tests.helpers import BACKENDS, DEVICE, assert_close, f64, make_problem

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _labels(dtype, n, vocab, seed=0):
    """Ids that fill the dtype's range (uint8 ids above 127; -100 where the dtype can hold it)."""
    g = torch.Generator().manual_seed(seed)
    high = min(vocab, 128 if dtype == torch.int8 else vocab)
    y = torch.randint(0, high, (n,), generator=g)
    if dtype == torch.uint8:
        y[:3] = torch.tensor([156, 130, 199])  # 156 would wrap to -100 in uint8 compares
    else:
        y[1::7] = -100
    return y.to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_integer_label_dtypes_match_oracle(backend, dtype):
    """N == V: a uint8 index of length V was taken as a boolean mask (silently wrong lp)."""
    V = 200
    h, w, _, _ = make_problem(V, 8, V, ignore_frac=0.0)
    y = _labels(dtype, V, V)
    out = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    y64 = y.long().cpu()
    ref = reference.logprobs(*f64(h, w), y64)
    assert_close(out.logprobs, ref, atol=5e-5, what=f"logprobs ({dtype})")
    assert_close(out.entropy, reference.entropy(*f64(h, w), y64), atol=2e-4, what="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_integer_label_dtypes_in_evidence_and_loss(backend, dtype):
    B, T, D, V = 2, 5, 8, 200
    h, w, _, _ = make_problem(B * T, D, V, ignore_frac=0.0)
    y = _labels(dtype, B * T, V)
    adv = torch.tensor([1.0, -0.5], device=DEVICE)
    got = contrastive_evidence(h, h, h.flip(0), w, y, adv.repeat_interleave(T), lam=0.5,
                               eps_w=0.2, backend=backend)
    want = contrastive_evidence(h, h, h.flip(0), w, y.long(), adv.repeat_interleave(T), lam=0.5,
                                eps_w=0.2, backend=backend)
    for name, a, b in zip(got._fields[:6], got[:6], want[:6]):
        assert torch.equal(a, b), name

    hb = h.view(B, T, D).requires_grad_()
    old = torch.zeros(B, T, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    loss = CEPOLoss(backend=backend)(hb, w, y.view(B, T), old, adv, mask).loss
    loss.backward()
    h64 = f64(hb)[0].requires_grad_()
    lp = reference.logprobs(h64, w.double().cpu(), y.long().view(B, T).cpu())
    ref_loss = ppo_clip_loss(lp, old.double().cpu(), adv.double().cpu(), mask.cpu()).loss
    ref_loss.backward()
    assert_close(loss, ref_loss, atol=1e-5, what="loss")
    assert_close(hb.grad, h64.grad, atol=1e-5, what="dhidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_non_integer_labels_are_refused(dtype):
    h, w, y, _ = make_problem(6, 8, 20, ignore_frac=0.0)
    with pytest.raises(TypeError, match=f"labels must be an integer tensor.*{dtype}"):
        fused_linear_logprobs(h, w, y.to(dtype))


def test_out_of_range_label_in_small_dtype_is_reported():
    h, w, y, _ = make_problem(6, 8, 20, ignore_frac=0.0)
    y = y.to(torch.uint8)
    y[2] = 156  # as int64 this is 156, not the ignore_index -100
    with pytest.raises(ValueError, match="labels must lie in \\[0, 20\\).*found 156"):
        fused_linear_logprobs(h, w, y)
