"""Shared test helpers: the backends to run, per-dtype tolerances, a verbose allclose, the
examples as modules."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from cepo_kernels.backend import triton_available

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """The module `examples/<name>.py` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_TRITON_OK = triton_available()[0] and (DEVICE.type == "cuda"
                                        or os.environ.get("TRITON_INTERPRET") == "1")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not _TRITON_OK, reason="triton unavailable")),
]

# Log-probs are fp32 outputs computed with fp32 accumulation from the (rounded) inputs, so their
# error against the float64 oracle on the *same rounded inputs* does not depend on the input
# dtype. Gradients come back in the input dtype, so their tolerance does (relative to max |ref|).
LOGPROB_ATOL = {torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "") -> None:
    """allclose in float64 that names the worst element when it fails."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        idx = int(torch.argmax(torch.where(bad, err - bound, torch.zeros_like(err))).item())
        flat_a, flat_e = a.flatten(), e.flatten()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements off; worst at flat index {idx}: "
            f"got {flat_a[idx].item():.8g}, expected {flat_e[idx].item():.8g} "
            f"(max abs err {err.max().item():.3g}, atol {atol}, rtol {rtol})"
        )


def assert_grad_close(actual, expected, dtype, what=""):
    """Gradients: error relative to the largest reference entry (scale-free across shapes)."""
    scale = expected.detach().abs().max().item() or 1.0
    assert_close(actual, expected, atol=GRAD_RTOL[dtype] * scale, what=what)


def make_problem(N, D, V, *, dtype=torch.float32, ignore_frac=0.2, bias=False, seed=0,
                 scale=1.0, ignore_index=-100):
    """hidden [N, D], weight [V, D], labels [N] (with ~ignore_frac ignored), bias [V] | None.

    Inputs are rounded to ``dtype``; the oracle later takes the same rounded values in float64.
    """
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale).to(dtype)
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        y[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    return h.to(DEVICE), w.to(DEVICE), y.to(DEVICE), None if b is None else b.to(DEVICE)


def f64(*ts):
    return [None if t is None else t.detach().double().cpu() for t in ts]
