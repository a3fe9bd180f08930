"""Forward log-probs and entropy of every backend against the float64 oracle."""

import pytest
import torch

from cepo_kernels import fused_linear_logprobs, reference
from tests.helpers import BACKENDS, DEVICE, LOGPROB_ATOL, assert_close, f64, make_problem

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd shapes: no dimension is a multiple of any block size
SHAPES = [(37, 40, 1000), (5, 16, 17), (64, 48, 2053)]


def _check(out, h, w, y, b, temperature, dtype, entropy=True):
    h64, w64, b64 = f64(h, w, b)
    ref = reference.logprobs(h64, w64, y.cpu(), bias=b64, temperature=temperature)
    assert out.logprobs.dtype == torch.float32
    assert_close(out.logprobs, ref, atol=LOGPROB_ATOL[dtype], rtol=1e-5, what="logprobs")
    if entropy:
        ent = reference.entropy(h64, w64, y.cpu(), bias=b64, temperature=temperature)
        assert out.entropy.dtype == torch.float32
        assert_close(out.entropy, ent, atol=LOGPROB_ATOL[dtype] * 4, rtol=1e-5, what="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(backend, dtype, shape):
    h, w, y, b = make_problem(*shape, dtype=dtype, bias=shape[0] % 2 == 1)
    out = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend,
                                chunk_tokens=16, chunk_vocab=256)
    assert out.backend == backend
    _check(out, h, w, y, b, 1.0, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_and_bias(backend, temperature):
    h, w, y, b = make_problem(29, 24, 700, bias=True)
    out = fused_linear_logprobs(h, w, y, bias=b, temperature=temperature, return_entropy=True,
                                backend=backend)
    _check(out, h, w, y, b, temperature, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_batch_shape_kept(backend):
    h, w, y, _ = make_problem(24, 16, 300, ignore_frac=0.0)
    h, y = h.view(3, 8, 16), y.view(3, 8).clone()
    y[1] = -100                      # a fully ignored sequence
    y[2, ::3] = -100
    out = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert out.logprobs.shape == (3, 8) and out.entropy.shape == (3, 8)
    assert torch.all(out.logprobs[y == -100] == 0) and torch.all(out.entropy[y == -100] == 0)
    ref = reference.logprobs(*f64(h, w), y.cpu())
    assert_close(out.logprobs, ref, atol=5e-5, what="logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    h, w, y, _ = make_problem(20, 16, 100, ignore_index=7, ignore_frac=0.3)
    out = fused_linear_logprobs(h, w, y, ignore_index=7, backend=backend)
    ref = reference.logprobs(*f64(h, w), y.cpu(), ignore_index=7)
    assert_close(out.logprobs, ref, atol=5e-5, what="logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_distribution(backend):
    """Hidden states copied from W rows and scaled: p_y ≈ 1, lp ≈ 0 must not lose precision."""
    h, w, y, _ = make_problem(32, 32, 500, ignore_frac=0.0)
    h = (w[y] * 40.0).contiguous()
    out = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    ref = reference.logprobs(*f64(h, w), y.cpu())
    assert ref.max() > -1e-3          # the case really is peaked
    _check(out, h, w, y, None, 1.0, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_negative_logits(backend):
    """All logits around −1e4: running maxima must start at −inf, not 0 (verl #7439)."""
    h, w, y, _ = make_problem(16, 16, 400, ignore_frac=0.0)
    b = torch.full((400,), -1.0e4, device=DEVICE)
    out = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    # fp32 cannot hold −1e4 + x to better than ~1e-3, so judge against what plain fp32 torch gets
    # (CCE's rule): no worse than 2× the fp32 naive error on the same inputs, plus a small atol
    truth = reference.logprobs(*f64(h, w), y.cpu(), bias=b.double().cpu())
    naive_err = (reference.logprobs(h, w, y, bias=b).double().cpu() - truth).abs().max().item()
    assert naive_err > 1e-4            # the case really stresses fp32
    assert_close(out.logprobs, truth, atol=2 * naive_err + 5e-5, what="logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_block(backend):
    """The first 300 ids masked by a −1e4 bias (a tile whose first columns are all far below
    the maximum): the torch backend's cheap lse anchor must fall back to the full argmax."""
    h, w, y, _ = make_problem(20, 16, 1000, ignore_frac=0.0)
    y = y.clamp_min(300)
    b = torch.zeros(1000, device=DEVICE)
    b[:300] = -1.0e4
    out = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend,
                                chunk_vocab=512)
    _check(out, h, w, y, b, 1.0, torch.float32)


def test_torch_backend_at_qwen_vocabulary():
    V = 151_936
    h, w, y, _ = make_problem(6, 16, V, ignore_frac=0.0)
    y[0] = V - 1                       # the last id of the vocabulary
    out = fused_linear_logprobs(h, w, y, return_entropy=True, backend="torch")
    _check(out, h, w, y, None, 1.0, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    h = torch.zeros(0, 16, device=DEVICE)
    w = torch.randn(50, 16, device=DEVICE)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    out = fused_linear_logprobs(h.view(2, 0, 16), w, y.view(2, 0), backend=backend)
    assert out.logprobs.shape == (2, 0)


def test_auto_backend_is_observable():
    h, w, y, _ = make_problem(4, 16, 50)
    out = fused_linear_logprobs(h, w, y)
    assert out.backend == ("triton" if DEVICE.type == "cuda" else "torch")
    out = fused_linear_logprobs(h.double(), w.double(), y)
    assert out.backend == "torch"  # float64 always runs the torch backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tokens_beyond_grid_axis_limit(backend):
    """N > 65,535 rows: tokens live on grid axis 0 (axis 1/2 are capped at 65,535)."""
    N = 70_000
    h, w, y, _ = make_problem(N, 16, 16, ignore_frac=0.0)
    out = fused_linear_logprobs(h, w, y, backend=backend)
    ref = reference.logprobs(*f64(h, w), y.cpu())
    assert_close(out.logprobs, ref, atol=5e-5, what="logprobs")
