"""Inputs as users have them: token ids of any integer dtype and 0/1 masks of any dtype, on
every backend."""

import pytest
import torch

from cepo_kernels import (
    CEPOLoss,
    FusedLinearLogProbs,
    cepo_advantages,
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


# ----------------------------------------------------------------------------- masks

MASK_DTYPES = [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16]
B, T, D, V = 2, 5, 8, 40


def _mask_problem():
    """A (B, T) batch with a 0/1 pattern that masks whole and partial sequences."""
    h, w, y, _ = make_problem(B * T, D, V, ignore_frac=0.0)
    h, y = h.view(B, T, D), y.view(B, T)
    y[0, 1] = -100  # an ignored label inside the mask as well
    bits = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 1, 1, 1]], device=DEVICE)
    return h, w, y, bits


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_mask_is_like_ignore_index(backend):
    h, w, y, bits = _mask_problem()
    ref_y = y.masked_fill(bits == 0, -100).cpu()
    ref = reference.logprobs(*f64(h, w), ref_y)
    ref_ent = reference.entropy(*f64(h, w), ref_y)
    for dtype in MASK_DTYPES:
        hg = h.clone().requires_grad_()
        out = fused_linear_logprobs(hg, w, y, mask=bits.to(dtype), return_entropy=True,
                                    backend=backend)
        assert_close(out.logprobs, ref, atol=5e-5, what=f"logprobs, {dtype} mask")
        assert_close(out.entropy, ref_ent, atol=2e-4, what=f"entropy, {dtype} mask")
        assert torch.all(out.logprobs[bits == 0] == 0) and torch.all(out.entropy[bits == 0] == 0)
        out.logprobs.sum().backward()
        assert torch.all(hg.grad[bits == 0] == 0), "masked tokens must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_of_every_dtype_give_identical_results(backend):
    """bool, int64, int32, uint8, float32 and bfloat16 0/1 masks: bit-identical everywhere."""
    h, w, y, bits = _mask_problem()
    adv = torch.tensor([0.7, -1.2], device=DEVICE)
    old = torch.randn(B, T, device=DEVICE) * 0.1
    lp_a, lp_b = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)

    def run(mask):
        ev = contrastive_evidence(h, h * 0.5, h.flip(0), w, y, adv, mask=mask, lam=0.5,
                                  eps_w=0.2, backend=backend)
        hg = h.clone().requires_grad_()
        loss = CEPOLoss(backend=backend)(hg, w, y, old, adv, mask)
        loss.loss.backward()
        mod = FusedLinearLogProbs(backend=backend)(h, w, y, mask=mask)
        return {
            **{f"evidence.{k}": v for k, v in ev._asdict().items() if k != "backend"},
            "fused_linear_logprobs": fused_linear_logprobs(h, w, y, mask=mask,
                                                           backend=backend).logprobs,
            "FusedLinearLogProbs": mod.logprobs,
            "cepo_advantages": cepo_advantages(adv, lp_a, lp_b, mask, lam=0.5, eps_w=0.2),
            "ppo_clip_loss": ppo_clip_loss(lp_a, old, adv, mask).token_loss,
            "CEPOLoss.loss": loss.loss, "CEPOLoss.dhidden": hg.grad,
        }

    want = run(bits.bool())
    assert torch.all(want["evidence.advantages"][bits == 0] == 0)
    assert want["CEPOLoss.loss"] != 0
    for dtype in MASK_DTYPES[1:]:
        got = run(bits.to(dtype))
        for name, value in want.items():
            assert torch.equal(got[name], value), f"{name} differs with a {dtype} mask"


@pytest.mark.parametrize("value", [2, -1, 0.5, float("nan")])
def test_masks_must_hold_zero_and_one(value):
    h, w, y, bits = _mask_problem()
    lp = torch.zeros(B, T, device=DEVICE)
    adv = torch.ones(B, device=DEVICE)
    bad = bits.float()
    bad[1, 2] = value
    calls = {
        "fused_linear_logprobs": lambda m: fused_linear_logprobs(h, w, y, mask=m),
        "contrastive_evidence": lambda m: contrastive_evidence(h, h, h, w, y, adv, mask=m,
                                                               lam=0.5, eps_w=0.2),
        "cepo_advantages": lambda m: cepo_advantages(adv, lp, lp, m, lam=0.5, eps_w=0.2),
        "ppo_clip_loss": lambda m: ppo_clip_loss(lp, lp, adv, m),
        "CEPOLoss": lambda m: CEPOLoss()(h, w, y, lp, adv, m),
    }
    for name, call in calls.items():
        for mask in (bad, bad.to(torch.int64)) if value in (2, -1) else (bad,):
            with pytest.raises(ValueError, match="mask .* must hold only 0 and 1"):
                call(mask)
                pytest.fail(f"{name} accepted a mask holding {value}")


def test_mask_type_and_shape_errors():
    h, w, y, bits = _mask_problem()
    with pytest.raises(TypeError, match="mask must be a bool tensor or a 0/1"):
        fused_linear_logprobs(h, w, y, mask=bits.tolist())
    with pytest.raises(TypeError, match="mask must be a bool tensor or a 0/1"):
        fused_linear_logprobs(h, w, y, mask=bits.to(torch.complex64))
    with pytest.raises(ValueError, match="mask shape \\(2, 4\\) must equal the labels shape"):
        fused_linear_logprobs(h, w, y, mask=bits[:, :4])
    with pytest.raises(ValueError, match="mask is on meta"):
        fused_linear_logprobs(h, w, y, mask=bits.to("meta"))


def test_unvalidated_mask_takes_nonzero_as_true():
    """validate=False: no host sync, so a non-bool mask is not inspected; nonzero counts."""
    h, w, y, bits = _mask_problem()
    loose = bits * 3
    got = fused_linear_logprobs(h, w, y, mask=loose, validate=False).logprobs
    assert torch.equal(got, fused_linear_logprobs(h, w, y, mask=bits.bool()).logprobs)


def test_masked_positions_may_hold_any_label():
    """Padding under a 0 mask may carry ids outside the vocabulary (e.g. a pad id >= V)."""
    h, w, y, bits = _mask_problem()
    y = y.masked_fill(bits == 0, V + 7)
    out = fused_linear_logprobs(h, w, y, mask=bits)
    assert torch.all(out.logprobs[bits == 0] == 0)
