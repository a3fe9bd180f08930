"""Guarantees 1–9 of docs/METHOD.md, "Guarantees" as property tests (hypothesis), on
cepo_advantages, the fused contrastive_evidence and the CEPO loss. §8.10 (alignment) lives with the
teacher contexts."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cepo_kernels import CEPOLoss, cepo_advantages, contrastive_evidence, reference

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=32)
adv_st = st.floats(min_value=-5, max_value=5, allow_nan=False, width=32)
lam_st = st.floats(min_value=0.0, max_value=1.0)
eps_st = st.floats(min_value=0.0, max_value=0.99)


def vec(elem, n=8):
    return st.lists(elem, min_size=n, max_size=n).map(torch.tensor)


SETTINGS = settings(max_examples=60, deadline=None)


def _a_hat(adv, pos, neg, lam, eps):
    return cepo_advantages(adv, pos, neg, torch.ones(adv.shape, dtype=torch.bool), lam=lam,
                           eps_w=eps)


@SETTINGS
@given(vec(adv_st), vec(finite), vec(finite), lam_st, eps_st)
def test_1_sign_preserved_and_zero_advantage_gives_zero(adv, pos, neg, lam, eps):
    adv[0] = 0.0
    out = _a_hat(adv, pos, neg, lam, eps)
    assert torch.equal(torch.sign(out), torch.sign(adv))
    assert out[0] == 0


@SETTINGS
@given(vec(adv_st), vec(finite), vec(finite), lam_st, eps_st)
def test_2_magnitude_bounds(adv, pos, neg, lam, eps):
    out = _a_hat(adv, pos, neg, lam, eps).double()
    a = adv.double().abs()
    tol = 1e-6 * (1 + a)
    assert torch.all(out.abs() >= a * (1 - lam * eps) - tol)
    assert torch.all(out.abs() <= a * (1 + lam * eps) + tol)


@SETTINGS
@given(vec(adv_st), vec(finite), lam_st, eps_st)
def test_3_filler_tokens_keep_the_grpo_advantage_exactly(adv, lp, lam, eps):
    out = _a_hat(adv, lp, lp.clone(), lam, eps)
    # (1 − λ) + λ·1 is exactly 1 in floating point only up to rounding of 1 − λ; allow 1 ulp
    assert torch.allclose(out, adv, rtol=2 ** -22, atol=0)


@SETTINGS
@given(vec(adv_st), vec(finite), vec(finite), lam_st, eps_st)
def test_4_grpo_reductions(adv, pos, neg, lam, eps):
    assert torch.equal(_a_hat(adv, pos, neg, 0.0, eps), adv)
    assert torch.allclose(_a_hat(adv, pos, neg, lam, 0.0), adv, rtol=2 ** -22, atol=0)
    assert torch.allclose(_a_hat(adv, pos, pos.clone(), lam, eps), adv, rtol=2 ** -22, atol=0)


@SETTINGS
@given(vec(adv_st), vec(finite), vec(finite), lam_st, eps_st)
def test_5_student_as_negative_is_rlsd(adv, pos, student, lam, eps):
    """RLSD written independently in float64: w = clip(exp(sign(A)(lp⁺ − lp_S)))."""
    out = _a_hat(adv, pos, student, lam, eps)
    a, p, s = adv.double(), pos.double(), student.double()
    w = torch.exp(torch.sign(a) * (p - s)).clamp(1 - eps, 1 + eps)
    rlsd = a * ((1 - lam) + lam * w)
    assert torch.allclose(out.double(), rlsd, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(st.floats(0.1, 5), st.floats(-0.3, 0.3), st.floats(-0.3, 0.3), st.floats(-0.3, 0.3),
       st.floats(0.05, 1.0), st.sampled_from([1.0, -1.0]))
def test_6_cepo_weight_exceeds_rlsd_iff_wrong_teacher_below_student(a, pos, neg, student, lam,
                                                                   sign):
    """For A > 0: w^CEPO > w^RLSD ⇔ P_T- < P_S (before clipping); mirrored for A < 0.

    All |Δ| ≤ 0.6 < log(1.99), so with ε_w = 0.99 no clip is active and |Â| is strictly
    increasing in w: the ordering of the library's |Â| is the ordering of the raw weights.
    """
    if abs(neg - student) < 1e-4:
        return
    adv = torch.tensor([sign * a], dtype=torch.float64)
    p, n, s = (torch.tensor([x], dtype=torch.float64) for x in (pos, neg, student))
    cepo = cepo_advantages(adv, p, n, None, lam=lam, eps_w=0.99).abs()
    rlsd = cepo_advantages(adv, p, s, None, lam=lam, eps_w=0.99).abs()
    wrong_teacher_below_student = neg < student
    if sign > 0:
        assert bool(cepo > rlsd) == wrong_teacher_below_student
    else:
        assert bool(cepo > rlsd) == (not wrong_teacher_below_student)


@SETTINGS
@given(adv_st, st.lists(finite, min_size=2, max_size=12), lam_st, eps_st)
def test_7_monotone_in_delta(a, deltas, lam, eps):
    d = torch.tensor(sorted(deltas))
    adv = torch.full_like(d, a)
    out = _a_hat(adv, d, torch.zeros_like(d), lam, eps)
    diffs = out[1:] - out[:-1]
    if a > 0:
        assert torch.all(diffs >= 0)
    elif a < 0:
        assert torch.all(out.abs()[1:] - out.abs()[:-1] <= 0)


def test_8_no_gradient_to_teachers_and_no_vocabulary_wide_teacher_term():
    torch.manual_seed(0)
    N, D, V = 12, 8, 50
    h = torch.randn(N, D, requires_grad=True)
    pos = torch.randn(N, D, requires_grad=True)
    neg = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D)
    y = torch.randint(0, V, (N,))
    adv = torch.randn(N)
    ev = contrastive_evidence(h, pos, neg, w, y, adv, lam=0.5, eps_w=0.5, backend="torch")
    assert not any(t.requires_grad for t in ev[:-1])
    # loss gradient w.r.t. the student's logits: c_t · (onehot(y_t) − p_S), i.e. the teachers
    # enter only through the scalar Â_t (their log-prob at y_t), never through a V-wide term
    z = (h @ w.T).detach().requires_grad_()
    lp = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    mask = torch.ones(N, dtype=torch.bool)
    ell = reference.ppo_clip_token_loss(lp, ev.policy + 0.05 * torch.randn(N), ev.advantages)
    (ell * mask).sum().backward()
    p_s = torch.softmax(z.detach(), -1)
    direction = torch.nn.functional.one_hot(y, V).float() - p_s
    coef = (z.grad * direction).sum(-1) / (direction * direction).sum(-1)
    assert torch.allclose(z.grad, coef[:, None] * direction, atol=1e-6)


def test_9_padding_gets_no_advantage_no_loss_no_gradient():
    torch.manual_seed(1)
    B, T, D, V = 3, 7, 8, 40
    h = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(V, D)
    y = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, :] = False
    ev = contrastive_evidence(h.detach(), torch.randn(B, T, D), torch.randn(B, T, D), w, y,
                              torch.tensor([1.0, -1.0, 0.5]), mask=mask, lam=0.5, eps_w=0.2)
    assert torch.all(ev.advantages[~mask] == 0)
    out = CEPOLoss()(h, w, y, ev.policy, ev.advantages, mask)
    assert torch.all(out.token_loss[~mask] == 0)
    out.loss.backward()
    assert torch.all(h.grad[~mask] == 0) and h.grad[mask].abs().sum() > 0
    assert math.isfinite(out.loss.item())
