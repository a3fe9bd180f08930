"""The PPO clipped surrogate of docs/METHOD.md, "Loss" with Â in place of A, and its aggregations.

    ρ_t = exp(lp_t − lp_old_t)
    ℓ_t = −min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t),
    and for Â_t < 0: min(ℓ_t, −Â_t·c_dual)

The gradient flows only through ``logprobs``. Metrics are detached tensors (no host sync).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .advantages import broadcast_advantages
from .validation import check_finite, check_mask, check_positive, check_tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor          # scalar
    token_loss: torch.Tensor    # ℓ_t, 0 where masked out
    metrics: dict               # str → detached scalar tensor


def _masked_mean(x, mask, count):
    return (x * mask).sum() / count


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.28,
                  clip_dual: float = 3.0, aggregation: str = "token-mean",
                  normalizer: Optional[float] = None, validate: bool = True) -> PPOLossOutput:
    """Dual-clip PPO loss over the valid tokens of a batch.

    Args:
        logprobs: log π_θ(y_t), (B, T) (or any shape), differentiable.
        old_logprobs: log π_old(y_t), same shape (no gradient is taken through it).
        advantages: Â per token, same shape, or per sequence (B,).
        mask: True (or 1) at tokens that count: bool, or 0/1 of any integer or floating dtype.
        aggregation: ``token-mean`` (Σℓ / #tokens), ``seq-mean-token-mean`` (mean over sequences
            of each sequence's token mean; sequences with no token are left out) or
            ``seq-mean-token-sum-norm`` (Dr. GRPO: Σℓ / (B · T), T = a constant normaliser).
        normalizer: overrides the denominator: the global token count for ``token-mean``
            (exact token mean across gradient-accumulation micro-batches and processes), or the
            constant T for ``seq-mean-token-sum-norm``; a finite number > 0.
        validate: check that the advantages of the tokens that count are finite (one host
            sync); off in a hot loop whose inputs are known to be good.
    """
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs)):
        check_tensor(name, t, floating=True)
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs "
                         f"{tuple(logprobs.shape)}")
    mask = check_mask(mask, logprobs, "logprobs", validate=validate)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not (0 <= clip_low < 1 and clip_high >= 0 and clip_dual > 1):
        raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, clip_dual > 1; got "
                         f"{clip_low}, {clip_high}, {clip_dual}")
    if normalizer is not None:
        check_positive("normalizer", normalizer)
    adv = broadcast_advantages(advantages, logprobs).float()
    if validate:
        check_finite("advantages", adv, where=mask)
    m = mask.float()
    count = m.sum().clamp_min(1.0)

    log_ratio = logprobs.float() - old_logprobs.detach().float()
    # masked positions may hold garbage log-probs; keep exp() finite there
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    surrogate = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_t = torch.maximum(surrogate, clipped)
    dual = torch.minimum(loss_t, -adv * clip_dual)
    loss_t = torch.where(adv < 0, dual, loss_t)
    loss_t = torch.where(mask, loss_t, torch.zeros_like(loss_t))

    if aggregation == "token-mean":
        loss = loss_t.sum() / (count if normalizer is None else normalizer)
    elif aggregation == "seq-mean-token-mean":
        tokens = m.reshape(m.shape[0], -1).sum(-1)
        per_seq = loss_t.reshape(m.shape[0], -1).sum(-1) / tokens.clamp_min(1.0)
        loss = per_seq.sum() / (tokens > 0).sum().clamp_min(1)
    else:
        horizon = logprobs.shape[-1] if normalizer is None else normalizer
        loss = loss_t.sum() / (logprobs.shape[0] * horizon)

    with torch.no_grad():
        clipped_active = (clipped > surrogate) & mask
        dual_active = (adv < 0) & (-adv * clip_dual < torch.maximum(surrogate, clipped)) & mask
        ratio_valid = torch.where(mask, ratio, torch.full_like(ratio, float("nan")))
        metrics = {
            "clip_frac": _masked_mean(clipped_active.float(), m, count),
            "clip_frac_low": _masked_mean((clipped_active & (ratio < 1 - clip_low)).float(), m,
                                          count),
            "clip_frac_high": _masked_mean((clipped_active & (ratio > 1 + clip_high)).float(), m,
                                           count),
            "dual_clip_frac": _masked_mean(dual_active.float(), m, count),
            "ratio_mean": _masked_mean(ratio, m, count),
            "ratio_max": torch.nan_to_num(ratio_valid, nan=-float("inf")).max()
            if ratio.numel() else ratio.new_zeros(()),
            "ratio_min": torch.nan_to_num(ratio_valid, nan=float("inf")).min()
            if ratio.numel() else ratio.new_zeros(()),
            "approx_kl": _masked_mean(-log_ratio, m, count),
            "num_tokens": m.sum(),
        }
    return PPOLossOutput(loss=loss, token_loss=loss_t, metrics=metrics)
