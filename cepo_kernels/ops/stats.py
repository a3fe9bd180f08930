"""What a forward pass over the vocabulary leaves behind, per stream and token."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LogitStats(NamedTuple):
    """Per-(stream, token) results of one pass over W; every field is [S, N] fp32 (fp64 in fp64).

    target:  z_y, the (temperature-scaled) logit of the label
    lse:     logsumexp_v z_v
    entropy: −Σ p log p, or None when it was not asked for
    grad_hidden: ∂lp/∂h = (W_y − E_p[W]) / τ, [S, N, D], when the forward was asked for it
    """

    target: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    grad_hidden: Optional[torch.Tensor] = None

    def logprobs(self, valid: torch.Tensor) -> torch.Tensor:
        """lp = z_y − lse, 0 at ignored tokens (``valid`` is [N] bool)."""
        lp = self.target - self.lse
        return torch.where(valid, lp, torch.zeros_like(lp))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype, except that fp64 stays fp64 (gradcheck, oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
