"""ppo_clip_loss and CEPOLoss: hand-worked cases, aggregations, and the fused gradient."""

import pytest
import torch

from cepo_kernels import CEPOLoss, FusedLinearLogProbs, ppo_clip_loss, reference
from tests.helpers import BACKENDS, DEVICE, assert_close, assert_grad_close, f64, make_problem


def test_hand_worked_token_losses():
    # ε_low 0.2, ε_high 0.28, c_dual 3
    lp_old = torch.zeros(5)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.1, 5.0, 0.9]))
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 0.0])
    mask = torch.ones(5, dtype=torch.bool)
    out = ppo_clip_loss(lp, lp_old, adv, mask)
    expected = torch.tensor([
        -2.0 * 1.28,          # ρ=1.5, A>0: min(3.0, 1.28·2) = 2.56 → loss −2.56
        -2.0 * 0.5,           # ρ=0.5, A>0: min(1.0, 0.8·2=1.6) = 1.0 → −1.0
        1.1,                  # ρ=1.1, A<0: −min(−1.1, −1.1) = 1.1
        3.0,                  # ρ=5, A<0: max(5, 1.28) = 5, dual cap −A·3 = 3
        0.0,
    ])
    assert_close(out.token_loss, expected, atol=1e-6, what="token loss")
    assert_close(out.loss, expected.mean(), atol=1e-6, what="loss")
    assert out.metrics["clip_frac"].item() == pytest.approx(1 / 5)      # only token 0 clipped
    assert out.metrics["dual_clip_frac"].item() == pytest.approx(1 / 5)  # token 3


def test_matches_reference_formula_on_random_tokens():
    lp, old = torch.randn(4, 9) * 0.3, torch.randn(4, 9) * 0.3
    adv = torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.2
    out = ppo_clip_loss(lp, old, adv, mask)
    ref = reference.ppo_clip_token_loss(lp.double(), old.double(), adv.double())
    assert_close(out.token_loss[mask], ref[mask], atol=1e-6, what="token loss")
    assert torch.all(out.token_loss[~mask] == 0)


def test_aggregations():
    lp, old = torch.randn(3, 4) * 0.2, torch.zeros(3, 4)
    adv = torch.randn(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ell = ppo_clip_loss(lp, old, adv, mask).token_loss
    tm = ppo_clip_loss(lp, old, adv, mask, aggregation="token-mean").loss
    sm = ppo_clip_loss(lp, old, adv, mask, aggregation="seq-mean-token-mean").loss
    dr = ppo_clip_loss(lp, old, adv, mask, aggregation="seq-mean-token-sum-norm").loss
    assert_close(tm, ell.sum() / 6, atol=1e-7, what="token-mean")
    # the empty third sequence is left out of the mean over sequences
    assert_close(sm, (ell[0].sum() / 4 + ell[1].sum() / 2) / 2, atol=1e-7, what="seq-mean")
    assert_close(dr, ell.sum() / (3 * 4), atol=1e-7, what="dr-grpo")
    glob = ppo_clip_loss(lp, old, adv, mask, normalizer=60.0).loss
    assert_close(glob, ell.sum() / 60, atol=1e-7, what="global normaliser")


def test_empty_mask_gives_zero_loss_not_nan():
    lp = torch.randn(2, 3, requires_grad=True)
    out = ppo_clip_loss(lp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(lp.grad == 0)


def test_bad_arguments():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_clip_loss(lp, lp, lp, m, aggregation="mean")
    with pytest.raises(ValueError, match="mask .* must hold only 0 and 1"):
        ppo_clip_loss(lp, lp, lp, m.float() * 0.5)
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_clip_loss(lp, torch.zeros(3, 2), lp, m)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(lp, lp, torch.zeros(5), m)


@pytest.mark.parametrize("normalizer", [0, 0.0, -4.0, float("inf"), float("nan")])
def test_bad_normalizer(normalizer):
    """normalizer=0 gave an inf loss and a negative one flipped the sign of the update."""
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for aggregation in ("token-mean", "seq-mean-token-sum-norm"):
        with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
            ppo_clip_loss(lp, lp, torch.ones(2), m, aggregation=aggregation,
                          normalizer=normalizer)


@pytest.mark.parametrize("normalizer", [True, torch.tensor(4.0), "4"])
def test_normalizer_must_be_a_number(normalizer):
    lp = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="normalizer must be a Python number"):
        ppo_clip_loss(lp, lp, torch.ones(2), lp == 0, normalizer=normalizer)


def test_non_finite_advantages():
    lp = torch.zeros(2, 3)
    m = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.ones(2, 3)
    adv[1, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        ppo_clip_loss(lp, lp, adv, m)
    adv[1, 0], adv[1, 2] = 1.0, float("inf")  # outside the mask: no effect on the loss
    out = ppo_clip_loss(lp, lp, adv, m)
    assert out.loss.item() == pytest.approx(-1.0)
    adv[0, 1] = float("nan")
    out = ppo_clip_loss(lp, lp, adv, m, validate=False)  # the caller's contract: no host sync
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cepo_loss_gradient_matches_oracle(backend):
    """CEPOLoss (fused log-probs + loss) vs materialised float64 logits + the same loss math."""
    B, T, D, V = 3, 11, 16, 301
    h, w, y, _ = make_problem(B * T, D, V, ignore_frac=0.0)
    h, y = h.view(B, T, D).requires_grad_(), y.view(B, T)
    mask = torch.rand(B, T, device=DEVICE) > 0.25
    old = (reference.logprobs(h.detach(), w, y) + 0.1 * torch.randn(B, T, device=DEVICE)).detach()
    adv = torch.randn(B, T, device=DEVICE)
    mod = CEPOLoss(backend=backend, aggregation="seq-mean-token-mean")
    out = mod(h, w, y, old, adv, mask)
    assert mod.last_backend == backend
    out.loss.backward()

    h64 = f64(h)[0].requires_grad_()
    lp64 = reference.logprobs(h64, w.double().cpu(), y.cpu())
    ref = ppo_clip_loss(lp64, old.double().cpu(), adv.double().cpu(), mask.cpu(),
                        aggregation="seq-mean-token-mean")
    ref.loss.backward()
    assert_close(out.loss, ref.loss, atol=1e-5, what="loss")
    assert_grad_close(h.grad, h64.grad, torch.float32, what="dhidden")


def test_fused_linear_logprobs_module():
    h, w, y, _ = make_problem(10, 16, 64)
    mod = FusedLinearLogProbs(temperature=0.5, return_entropy=True, backend="torch")
    out = mod(h, w, y)
    assert mod.last_backend == "torch" and out.entropy is not None
    assert_close(out.logprobs, reference.logprobs(*f64(h, w), y.cpu(), temperature=0.5),
                 atol=5e-5, what="logprobs")
