"""CEPO token weights and advantages (docs/METHOD.md, "Advantages"), in fp32 and in log space.

    Δ_t = lp⁺_t − lp⁻_t          w_t = exp(sign(A)·Δ_t)
    Â_t = A · [(1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w)],   Â_t = 0 where masked out

clip(exp(x), lo, hi) = exp(clamp(x, log lo, log hi)) because exp is monotone, so the clipped weight
is computed without ever forming exp(|Δ|): no overflow for any finite Δ. sign(0) = 0 gives w = 1
and Â = 0 when A = 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .validation import check_finite, check_mask, check_tensor, check_weights_hparams


class TokenWeights(NamedTuple):
    delta: torch.Tensor       # Δ_t, fp32, shaped like the log-probs
    token_weight: torch.Tensor  # clipped w_t
    advantages: torch.Tensor  # Â_t


def broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sequence (B,) advantages → per-token (B, T); per-token ones pass through."""
    check_tensor("advantages", advantages, floating=True)
    if advantages.shape == like.shape:
        return advantages
    lead = like.shape[: advantages.dim()]
    if advantages.dim() < like.dim() and tuple(advantages.shape) == tuple(lead):
        return advantages.reshape(*advantages.shape, *([1] * (like.dim() - advantages.dim()))
                                  ).expand(like.shape)
    raise ValueError(
        f"advantages must be per token {tuple(like.shape)} or per sequence "
        f"{tuple(like.shape[:1])}, got {tuple(advantages.shape)}"
    )


def token_weights(advantages, pos_logprobs, neg_logprobs, mask, *, lam, eps_w) -> TokenWeights:
    """Δ, clipped w and Â; ``advantages`` already per token, ``mask`` bool (or None = all)."""
    adv = advantages.float() if advantages.dtype != torch.float64 else advantages
    delta = pos_logprobs.to(adv.dtype) - neg_logprobs.to(adv.dtype)
    log_w = (torch.sign(adv) * delta).clamp(math.log1p(-eps_w), math.log1p(eps_w))
    w = torch.exp(log_w)
    a_hat = adv * ((1.0 - lam) + lam * w)
    if mask is not None:
        a_hat = torch.where(mask, a_hat, torch.zeros_like(a_hat))
    return TokenWeights(delta=delta, token_weight=w, advantages=a_hat)


def cepo_advantages(advantages: torch.Tensor, pos_logprobs: torch.Tensor,
                    neg_logprobs: torch.Tensor, mask: Optional[torch.Tensor], *, lam: float,
                    eps_w: float, validate: bool = True) -> torch.Tensor:
    """Â per docs/METHOD.md, "Advantages" from any log-probs; pass the student's as ``neg_logprobs``
    to get RLSD.

    Args:
        advantages: GRPO advantages A_i, per token (like ``pos_logprobs``) or per sequence (B,).
        pos_logprobs: log P_T+(y_t), e.g. (B, T).
        neg_logprobs: log P_T-(y_t), same shape.
        mask: True (or 1) at response tokens, bool or 0/1 of any dtype; Â is 0 elsewhere. None
            means every position counts.
        lam: λ ∈ [0, 1]; eps_w: ε_w ∈ [0, 1).
        validate: check that the advantages of the positions that count are finite (one sync).
    """
    check_weights_hparams(lam, eps_w)
    check_tensor("pos_logprobs", pos_logprobs, floating=True)
    check_tensor("neg_logprobs", neg_logprobs, floating=True)
    if pos_logprobs.shape != neg_logprobs.shape:
        raise ValueError(f"pos_logprobs {tuple(pos_logprobs.shape)} and neg_logprobs "
                         f"{tuple(neg_logprobs.shape)} must have the same shape")
    if mask is not None:
        mask = check_mask(mask, pos_logprobs, "log-probs", validate=validate)
    adv = broadcast_advantages(advantages, pos_logprobs)
    if validate:
        check_finite("advantages", adv, where=mask)
    return token_weights(adv, pos_logprobs, neg_logprobs, mask, lam=lam, eps_w=eps_w).advantages
