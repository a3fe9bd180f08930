"""Naive, materialising implementations of every quantity: the test oracle.

These build the full N×V logits on purpose, so they are simple enough to trust. They run in
whatever dtype they are given (pass float64 tensors for a ground truth) and are never used as a
backend. The formulas follow docs/METHOD.md, "Advantages" and "Loss" symbol for symbol.
"""

from __future__ import annotations

import torch


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           temperature: float = 1.0) -> torch.Tensor:
    """z = (h·Wᵀ + b) / τ, shape (..., V)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return z / temperature


def logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100):
    """log softmax(z)[y] per token, 0 at ignored positions."""
    z = logits(hidden, weight, bias, temperature)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def entropy(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100):
    """−Σ_v p_v log p_v per token, 0 at ignored positions."""
    z = logits(hidden, weight, bias, temperature)
    logp = torch.log_softmax(z, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(labels != ignore_index, ent, torch.zeros_like(ent))


def logmeanexp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log(mean_k exp(x_k)): the K-wrong-answer mixture of docs/METHOD.md, "Advantages"."""
    return torch.logsumexp(x, dim=dim) - torch.log(torch.tensor(float(x.shape[dim]), dtype=x.dtype))


def cepo_advantages(advantages, pos_logprobs, neg_logprobs, mask, *, lam, eps_w):
    """Â_t = A · [(1 − λ) + λ · clip(exp(sign(A)·Δ), 1 − ε_w, 1 + ε_w)], 0 where mask is False.

    Written the direct way (exp of the signed Δ), so it overflows for huge |Δ|; tests that need
    |Δ| ≫ 80 compare against a float64 evaluation, which is exact up to |Δ| ≈ 700.
    """
    delta = pos_logprobs - neg_logprobs
    w = torch.exp(torch.sign(advantages) * delta)
    w = w.clamp(1 - eps_w, 1 + eps_w)
    adv = advantages * ((1 - lam) + lam * w)
    return torch.where(mask, adv, torch.zeros_like(adv))


def ppo_clip_token_loss(logprobs, old_logprobs, advantages, *, clip_low=0.2, clip_high=0.28,
                        clip_dual=3.0):
    """Per-token dual-clip PPO loss ℓ_t of docs/METHOD.md, "Loss" (no masking, no aggregation)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.minimum(loss, -advantages * clip_dual)
    return torch.where(advantages < 0, dual, loss)
