"""Bad input raises a clear error naming the argument, before any kernel launches."""

import pytest
import torch

from cepo_kernels import (
    cepo_advantages,
    contrastive_evidence,
    contrastive_logprobs,
    fused_linear_logprobs,
)

N, D, V = 6, 8, 20


def _ok():
    return torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))


@pytest.mark.parametrize("case, exc, pattern", [
    ("hidden_dim", ValueError, "weight.shape\\[1\\]"),
    ("label_shape", ValueError, "labels shape"),
    ("label_range", ValueError, "labels must lie in \\[0, 20\\)"),
    ("negative_label", ValueError, "labels must lie"),
    ("float_labels", TypeError, "labels must be an integer"),
    ("int_hidden", TypeError, "hidden must be float"),
    ("weight_3d", ValueError, "weight must be \\(V, D\\)"),
    ("temperature", ValueError, "temperature"),
    ("nan_hidden", ValueError, "NaN or inf"),
    ("nan_weight", ValueError, "weight contains NaN or inf"),
    ("inf_weight", ValueError, "weight contains NaN or inf"),
    ("bias_shape", ValueError, "bias must be"),
    ("inf_bias", ValueError, "bias contains NaN or inf"),
    ("backend", ValueError, "backend must be one of"),
    ("not_tensor", TypeError, "hidden must be a torch.Tensor"),
])
def test_fused_linear_logprobs_errors(case, exc, pattern):
    h, w, y = _ok()
    kw = {}
    if case == "hidden_dim":
        h = torch.randn(N, D + 1)
    elif case == "label_shape":
        y = torch.randint(0, V, (N + 1,))
    elif case == "label_range":
        y[2] = V
    elif case == "negative_label":
        y[0] = -5
    elif case == "float_labels":
        y = y.float()
    elif case == "int_hidden":
        h = h.long()
    elif case == "weight_3d":
        w = w[None]
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "nan_hidden":
        h[1, 2] = float("nan")
    elif case == "nan_weight":
        w[V - 1, 0] = float("nan")
    elif case == "inf_weight":
        w[3, D - 1] = -float("inf")
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(V + 1)
    elif case == "inf_bias":
        kw["bias"] = torch.zeros(V)
        kw["bias"][3] = -float("inf")
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "not_tensor":
        h = h.tolist()
    with pytest.raises(exc, match=pattern):
        fused_linear_logprobs(h, w, y, **kw)


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-40, 5e-5, float("nan"), float("inf"),
                                         1e39, True, "1.0"])
def test_bad_temperature(temperature):
    """τ = 1e-40 gave NaN log-probs: 1/τ overflows fp32. τ below 1e-4 is refused."""
    h, w, y = _ok()
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0.0001"):
        fused_linear_logprobs(h, w, y, temperature=temperature)


@pytest.mark.parametrize("temperature", [1e-4, 0.01, 100.0])
def test_extreme_but_allowed_temperature_stays_finite(temperature):
    h, w, y = _ok()
    lp = fused_linear_logprobs(h, w, y, temperature=temperature, return_entropy=True)
    ref = torch.log_softmax((h.double() @ w.double().T) / temperature, -1)
    ref = ref.gather(1, y[:, None]).squeeze(1)
    assert torch.isfinite(lp.logprobs).all() and torch.isfinite(lp.entropy).all()
    assert torch.allclose(lp.logprobs.double(), ref, rtol=1e-4, atol=1e-3)


def test_non_finite_weight_in_contrastive_is_refused():
    h, w, y = _ok()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        contrastive_evidence(h, h, h, w, y, torch.randn(N), lam=0.5, eps_w=0.2)
    contrastive_evidence(h, h, h, w, y, torch.randn(N), lam=0.5, eps_w=0.2, validate=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_advantages_are_refused(bad):
    h, w, y = _ok()
    adv = torch.randn(N)
    adv[2] = bad
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        contrastive_evidence(h, h, h, w, y, adv, lam=0.5, eps_w=0.2)
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        cepo_advantages(torch.tensor([1.0, bad]), lp, lp, None, lam=0.5, eps_w=0.2)


def test_non_finite_advantages_outside_the_mask_are_harmless():
    """Only the tokens that count must be finite: Â is 0 elsewhere whatever A holds there."""
    h, w, y = _ok()
    adv = torch.randn(N)
    adv[2] = float("nan")
    mask = torch.ones(N, dtype=torch.bool)
    mask[2] = False
    ev = contrastive_evidence(h, h, h, w, y, adv, mask=mask, lam=0.5, eps_w=0.2)
    assert ev.advantages[2] == 0 and torch.isfinite(ev.advantages).all()
    lp = torch.zeros(2, 3)
    m = torch.tensor([[True] * 3, [False] * 3])
    a_hat = cepo_advantages(torch.tensor([1.0, float("nan")]), lp, lp, m, lam=0.5, eps_w=0.2)
    assert torch.equal(a_hat, m.float())


def test_validate_false_skips_only_value_checks():
    h, w, y = _ok()
    h[0, 0] = float("nan")
    out = fused_linear_logprobs(h, w, y, validate=False)  # the caller's contract
    assert torch.isnan(out.logprobs[0])
    with pytest.raises(ValueError):
        fused_linear_logprobs(torch.randn(N, D + 1), w, y, validate=False)  # shapes always


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from cepo_kernels import backend as be

    monkeypatch.setattr(be, "interpreting", lambda: False)
    h, w, y = _ok()
    with pytest.raises(ValueError, match="CUDA tensors"):
        fused_linear_logprobs(h, w, y, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="device"):
        fused_linear_logprobs(h.cuda(), w, y.cuda())


def test_device_mismatch_meta():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="on meta but hidden is on cpu"):
        fused_linear_logprobs(h, w.to("meta"), y)


def test_contrastive_errors():
    h, w, y = _ok()
    adv = torch.randn(N)
    with pytest.raises(ValueError, match="pos_hidden shape"):
        contrastive_logprobs(h, h[:-1], h, w, y)
    with pytest.raises(ValueError, match="K = 0"):
        contrastive_logprobs(h, h, torch.zeros(0, N, D), w, y)
    with pytest.raises(ValueError, match="neg_hidden must be shaped"):
        contrastive_logprobs(h, h, torch.zeros(2, N, D + 1), w, y)
    with pytest.raises(TypeError, match="one dtype"):
        contrastive_logprobs(h, h.double(), h, w, y)
    with pytest.raises(ValueError, match="lam"):
        contrastive_evidence(h, h, h, w, y, adv, lam=1.5, eps_w=0.2)
    with pytest.raises(ValueError, match="eps_w"):
        contrastive_evidence(h, h, h, w, y, adv, lam=0.5, eps_w=1.0)
    with pytest.raises(ValueError, match="advantages must be per token"):
        contrastive_evidence(h, h, h, w, y, torch.randn(N + 2), lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match="mask shape"):
        contrastive_evidence(h, h, h, w, y, adv, mask=torch.ones(N + 1, dtype=torch.bool),
                             lam=0.5, eps_w=0.2)
    bad = h.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="neg_hidden contains NaN"):
        contrastive_logprobs(h, h, bad, w, y)


def test_contrastive_empty_batch():
    w = torch.randn(V, D)
    e = torch.zeros(0, D)
    y = torch.zeros(0, dtype=torch.long)
    out = contrastive_evidence(e, e, e, w, y, torch.zeros(0), lam=0.5, eps_w=0.2)
    assert out.policy.shape == (0,) and out.advantages.shape == (0,)


def test_cepo_advantages_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        cepo_advantages(torch.ones(2), lp, torch.zeros(3, 2), None, lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match="mask .* must hold only 0 and 1"):
        cepo_advantages(torch.ones(2), lp, lp, torch.full((2, 3), 2), lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match="mask shape"):
        cepo_advantages(torch.ones(2), lp, lp, torch.ones(3, 2), lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match="lam"):
        cepo_advantages(torch.ones(2), lp, lp, None, lam=-0.1, eps_w=0.2)
