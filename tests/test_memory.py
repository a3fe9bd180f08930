"""The torch backend never creates an N×V tensor, forward or backward.

Every op's outputs are recorded with a TorchDispatchMode at a size where N×V would dwarf every
legitimate buffer (the weight gradient is V×D, the tiles S·chunk_tokens×chunk_vocab).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cepo_kernels import contrastive_evidence, fused_linear_logprobs


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


N, D, V = 2048, 8, 32_768          # N×V = 67M elements (256 MiB fp32) if it ever existed
CT, CV = 256, 2048                 # tile: 3 streams × 256 tokens × 2048 columns = 1.5M


@pytest.mark.parametrize("weight_grad", [True, False])   # False: the LoRA path (∂lp/∂h in fwd)
def test_forward_backward_never_materialise_logits(weight_grad):
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.1).requires_grad_(weight_grad)
    y = torch.randint(0, V, (N,))
    with LargestTensor() as rec:
        out = fused_linear_logprobs(h, w, y, return_entropy=weight_grad, backend="torch",
                                    chunk_tokens=CT, chunk_vocab=CV)
        loss = out.logprobs.sum() + (out.entropy.sum() if weight_grad else 0)
        loss.backward()
    assert rec.largest <= max(V * D, CT * CV), f"{rec.op} made {rec.largest} elements"
    assert rec.largest < N * V / 100


def test_contrastive_three_streams_never_materialise_logits():
    hs = [torch.randn(N, D) for _ in range(3)]
    w = torch.randn(V, D) * 0.1
    y = torch.randint(0, V, (N,))
    with LargestTensor() as rec:
        contrastive_evidence(*hs, w, y, torch.randn(N), lam=0.5, eps_w=0.2, backend="torch",
                             chunk_tokens=CT, chunk_vocab=CV)
    assert rec.largest <= 3 * CT * CV, f"{rec.op} made {rec.largest} elements"


def test_validating_an_lm_head_needs_no_full_size_scratch():
    """validate=True checks W for NaN/inf in slices: torch.isfinite makes temporaries as large as
    its input, so a whole-W check would cost W's size again (Qwen's lm_head: 1.2 GB in fp32)."""
    from cepo_kernels.validation import check_finite

    w = torch.randn(32_768, 256)  # 8M elements
    with LargestTensor() as rec:
        check_finite("weight", w)
    assert rec.largest <= 1 << 20, f"{rec.op} made {rec.largest} elements"
    w[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        check_finite("weight", w)
