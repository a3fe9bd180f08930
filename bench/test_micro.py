"""Micro-benchmarks (pytest-benchmark): ``pytest bench/ --benchmark-only``.

Small shapes (N = 256, D = 256, V = 32,768) so the suite takes about a minute on a 2-core CPU.
Nothing here asserts a speed: the goals are judged by ``python -m bench``, never in
timed tests. Every implementation of bench/baselines.py that runs on the machine is included, so
ours is always seen next to naive PyTorch and the bare-matmul floor.
"""

from __future__ import annotations

import pytest
import torch

from bench import baselines as B

N, D, V = 256, 256, 32_768
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3


@pytest.fixture(scope="module")
def inp() -> B.Inputs:
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    return B.make_inputs(N, D, V, dtype=dtype, device=DEVICE)


def _impl(name: str) -> B.Impl:
    impl = B.get(name)
    ok, why = impl.available(DEVICE)
    if not ok:
        pytest.skip(why)
    return impl


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", list(B.IMPLS))
def test_scoring(benchmark, inp, name):
    """Three streams' log-probs + Δ, Â, no grad."""
    impl = _impl(name)
    benchmark.group = f"scoring S=3 N={N} D={D} V={V}"

    def run():
        with torch.no_grad():
            impl.score(inp)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("weight_grad", [False, True], ids=["dh", "dh+dW"])
@pytest.mark.parametrize("name", list(B.IMPLS))
def test_update(benchmark, inp, name, weight_grad):
    """Policy log-probs forward + backward with a per-token upstream gradient."""
    impl = _impl(name)
    benchmark.group = f"update {'dh+dW' if weight_grad else 'dh'} N={N} D={D} V={V}"
    h = inp.policy.detach().clone().requires_grad_(True)
    w = inp.weight.detach().requires_grad_(weight_grad)

    def run():
        h.grad = w.grad = None
        impl.update(inp, h, w)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+entropy"])
def test_ours_fused_linear_logprobs_forward(benchmark, inp, entropy):
    """Our single-stream forward alone (no grad), with and without the entropy output."""
    _impl("ours")
    from cepo_kernels import fused_linear_logprobs

    benchmark.group = f"ours forward N={N} D={D} V={V}"

    def run():
        with torch.no_grad():
            fused_linear_logprobs(inp.policy, inp.weight, inp.labels, return_entropy=entropy)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)


def test_ours_contrastive_logprobs(benchmark, inp):
    """Our three-stream log-probs without the Δ/Â epilogue."""
    _impl("ours")
    from cepo_kernels import contrastive_logprobs

    benchmark.group = f"scoring S=3 N={N} D={D} V={V}"

    def run():
        contrastive_logprobs(inp.policy, inp.pos, inp.neg, inp.weight, inp.labels)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
