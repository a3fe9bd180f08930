"""nn.Module wrappers: they hold options and call the functional API; no math of their own."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .functional import LogProbsOutput, fused_linear_logprobs
from .loss import PPOLossOutput, ppo_clip_loss
from .validation import check_mask, check_tensor


class FusedLinearLogProbs(nn.Module):
    """``forward(hidden, weight, labels, bias=None, mask=None)`` → LogProbsOutput (fp32)."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str = "auto", validate: bool = True):
        super().__init__()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.return_entropy, self.backend, self.validate = return_entropy, backend, validate
        self.last_backend: Optional[str] = None

    def forward(self, hidden, weight, labels, bias=None, mask=None) -> LogProbsOutput:
        out = fused_linear_logprobs(hidden, weight, labels, mask=mask, bias=bias,
                                    temperature=self.temperature, ignore_index=self.ignore_index,
                                    return_entropy=self.return_entropy, backend=self.backend,
                                    validate=self.validate)
        self.last_backend = out.backend
        return out


class CEPOLoss(nn.Module):
    """The CEPO policy loss from hidden states: fused log-probs → dual-clip PPO with Â.

    ``forward(hidden, weight, labels, old_logprobs, advantages, mask, bias=None)`` returns
    PPOLossOutput; ``loss.backward()`` goes through the fused backward (the logits are
    recomputed tile by tile, never stored). ``advantages`` are the Â of ``contrastive_evidence``
    (or plain GRPO advantages, per token or per sequence). Positions where ``mask`` is False
    (or 0: any integer or floating 0/1 mask is accepted) are ignored (no loss, no gradient).
    """

    def __init__(self, *, clip_low: float = 0.2, clip_high: float = 0.28, clip_dual: float = 3.0,
                 aggregation: str = "token-mean", temperature: float = 1.0,
                 ignore_index: int = -100, backend: str = "auto", validate: bool = True):
        super().__init__()
        self.clip_low, self.clip_high, self.clip_dual = clip_low, clip_high, clip_dual
        self.aggregation, self.temperature = aggregation, temperature
        self.ignore_index = ignore_index
        self.backend, self.validate = backend, validate
        self.last_backend: Optional[str] = None

    def forward(self, hidden, weight, labels, old_logprobs, advantages, mask, bias=None,
                normalizer: Optional[float] = None) -> PPOLossOutput:
        check_tensor("labels", labels, integer=True)
        mask = check_mask(mask, labels, "labels", validate=self.validate)
        out = fused_linear_logprobs(hidden, weight, labels, mask=mask, bias=bias,
                                    temperature=self.temperature, ignore_index=self.ignore_index,
                                    backend=self.backend, validate=self.validate)
        self.last_backend = out.backend
        return ppo_clip_loss(out.logprobs, old_logprobs, advantages, mask,
                             clip_low=self.clip_low, clip_high=self.clip_high,
                             clip_dual=self.clip_dual, aggregation=self.aggregation,
                             normalizer=normalizer, validate=self.validate)
