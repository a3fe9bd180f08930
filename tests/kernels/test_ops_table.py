"""The backend table: every backend has the same ops, and the three-stream op of each backend
matches the float64 oracle and the other backend (Triton under the interpreter on CPU)."""

import inspect

import pytest
import torch

from cepo_kernels import fused_linear_logprobs, reference
from cepo_kernels.ops import OPS, ContrastParams, LogProbParams, ops_for
from tests.helpers import _TRITON_OK, BACKENDS, DEVICE, assert_close, f64, make_problem


def _three_streams(N, D, V, K, *, bias, seed=0):
    h, w, y, b = make_problem(N, D, V, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    streams = [h] + [torch.randn(N, D, generator=g).to(DEVICE) for _ in range(1 + K)]
    return streams, w, y, b


def _oracle(streams, w, y, b, temperature, adv, valid, lam, eps_w):
    """float64 (policy, pos, neg, Δ, w, Â) from the materialising reference."""
    w64, b64 = f64(w, b)
    lps = [reference.logprobs(s.double().cpu(), w64, y.cpu(), bias=b64, temperature=temperature)
           for s in streams]
    neg = reference.logmeanexp(torch.stack(lps[2:]), dim=0)
    a64 = adv.double().cpu()
    delta = lps[1] - neg
    tw = torch.exp(torch.sign(a64) * delta).clamp(1 - eps_w, 1 + eps_w)
    a_hat = reference.cepo_advantages(a64, lps[1], neg, valid.cpu(), lam=lam, eps_w=eps_w)
    return lps[0], lps[1], neg, delta, tw, a_hat


def test_every_backend_has_the_same_ops():
    assert set(OPS) == {"torch", "triton"}
    for op in ("forward_stats", "backward", "contrastive"):
        sigs = {name: inspect.signature(getattr(ops, op)) for name, ops in OPS.items()}
        assert sigs["torch"] == sigs["triton"], (op, sigs)
    assert OPS["torch"].grad_hidden_in_forward and not OPS["triton"].grad_hidden_in_forward
    with pytest.raises(ValueError, match="no ops for backend 'auto'"):
        ops_for(LogProbParams(backend="auto"))


def test_bad_token_weight_hparams_are_refused_by_the_params_object():
    adv, valid = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam"):
        ContrastParams(advantages=adv, valid=valid, lam=1.5, eps_w=0.2)
    with pytest.raises(ValueError, match="eps_w"):
        ContrastParams(advantages=adv, valid=valid, lam=0.5, eps_w=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 3])
def test_contrastive_op_matches_oracle(backend, K):
    """The op itself (no functional wrapper): torch with vocabulary chunks smaller than V and a
    token chunk smaller than N, Triton as launched."""
    streams, w, y, b = _three_streams(19, 16, 301, K, bias=True)
    adv = torch.randn(19, device=DEVICE)
    adv[3] = 0.0
    valid = (y != -100) & (torch.arange(19, device=DEVICE) % 5 != 0)
    params = LogProbParams(backend=backend, temperature=0.9, chunk_tokens=8, chunk_vocab=64)
    cepo = ContrastParams(advantages=adv, valid=valid, lam=0.4, eps_w=0.3)
    out = OPS[backend].contrastive(streams, w, b, y, params, cepo=cepo)
    want = _oracle(streams, w, y, b, 0.9, adv, valid, 0.4, 0.3)
    labelled = (y != -100).cpu()
    for name, got, ref in zip(out._fields, out, want):
        assert got.dtype == torch.float32 and got.shape == (19,), name
        if name in ("delta", "token_weight"):   # not defined at ignored labels
            got, ref = got.cpu()[labelled], ref[labelled]
        assert_close(got, ref, atol=1e-4, rtol=1e-5, what=name)
    assert torch.all(out.advantages[~valid] == 0)

    logprobs_only = OPS[backend].contrastive(streams, w, b, y, params)
    assert logprobs_only[3:] == (None, None, None)
    for name in ("policy", "pos", "neg"):
        assert torch.equal(getattr(logprobs_only, name), getattr(out, name)), name


def test_contrastive_ops_of_both_backends_agree():
    if not _TRITON_OK:
        pytest.skip("triton unavailable")
    streams, w, y, b = _three_streams(13, 16, 200, 2, bias=False, seed=3)
    adv = torch.randn(13, device=DEVICE)
    valid = y != -100
    cepo = ContrastParams(advantages=adv, valid=valid, lam=1.0, eps_w=0.5)
    outs = [OPS[be].contrastive(streams, w, b, y, LogProbParams(backend=be, chunk_vocab=48),
                                cepo=cepo) for be in ("torch", "triton")]
    for name, a, c in zip(outs[0]._fields, *outs):
        assert_close(a, c, atol=1e-4, what=name)


def test_torch_contrastive_op_never_holds_n_by_v_logits(monkeypatch):
    """The torch twin runs through the chunked pass: no tile wider than chunk_vocab."""
    from cepo_kernels.ops import torch_chunked

    widths = []
    orig = torch_chunked._tile_logits

    def spy(h, weight, bias, v0, v1, *a):
        widths.append((h.shape[0], v1 - v0))
        return orig(h, weight, bias, v0, v1, *a)

    monkeypatch.setattr(torch_chunked, "_tile_logits", spy)
    streams, w, y, _ = _three_streams(40, 8, 500, 1, bias=False)
    params = LogProbParams(backend="torch", chunk_tokens=10, chunk_vocab=100)
    OPS["torch"].contrastive(streams, w, None, y, params)
    assert widths and max(c for _, c in widths) == 100 and max(r for r, _ in widths) == 3 * 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_follow_optional_tensors(backend):
    """Bias and entropy are switched by passing (or not) their tensors: with a zero bias the
    log-probs equal those without one, and entropy exists only when asked for."""
    h, w, y, _ = make_problem(12, 16, 90)
    zero = torch.zeros(90, device=DEVICE)
    a = fused_linear_logprobs(h, w, y, backend=backend)
    c = fused_linear_logprobs(h, w, y, bias=zero, return_entropy=True, backend=backend)
    assert a.entropy is None and c.entropy is not None
    assert_close(a.logprobs, c.logprobs, atol=1e-6, what="logprobs")
    w64, _ = f64(w, None)
    ent = reference.entropy(h.double().cpu(), w64, y.cpu())
    assert_close(c.entropy, ent, atol=5e-5, what="entropy")
