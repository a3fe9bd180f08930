"""CEPO diagnostics of one step (names follow the reference's ``cepo/*`` metrics), for both
trainers.

Computed in two halves so that the TRL trainer can add the per-process halves over processes
before dividing: `diagnostic_sums` (counts and sums over the teacher-scored tokens, float64) and
`diagnostics_from_sums`. Δ should be > 0 on correct rollouts (``delta_mean_pos``: r+ explains
their tokens better than r−) and < 0 on rejected ones; ``frac_wrong_dir_*`` counts the tokens that
go the other way. ``weight_clip_frac*`` is how often w_t = exp(sign(A)·Δ) hit its clip
[1 − ε_w, 1 + ε_w] (docs/METHOD.md, "Advantages").
"""

from __future__ import annotations

import math

import torch

_SUMS = ("n", "delta", "delta_sq", "clip_high", "clip_low", "weight", "n_pos", "delta_pos",
         "wrong_pos", "n_neg", "delta_neg", "wrong_neg")


def diagnostic_sums(delta: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor,
                    token_weight: torch.Tensor, *, eps_w: float) -> torch.Tensor:
    """Counts and sums [12] (float64, on `delta`'s device) over the tokens `valid` [N, T] marks.

    `delta` and `token_weight` are [N, T], `advantages` the GRPO A [N] (its sign says which way
    Δ should point).
    """
    valid = valid.bool()
    sign = torch.sign(advantages.to(delta.device, torch.float64))[:, None].expand_as(delta)
    d = torch.where(valid, delta.to(torch.float64), 0.0)
    log_w = sign * d  # log of the unclipped w_t
    high = valid & (log_w > math.log1p(eps_w))
    low = valid & (log_w < math.log1p(-eps_w))
    pos, neg = valid & (sign > 0), valid & (sign < 0)
    w = torch.where(valid, token_weight.to(torch.float64), 0.0)
    return torch.stack([
        valid.sum(), d.sum(), d.square().sum(), high.sum(), low.sum(), w.sum(),
        pos.sum(), (d * pos).sum(), (pos & (d < 0)).sum(),
        neg.sum(), (d * neg).sum(), (neg & (d > 0)).sum(),
    ]).to(torch.float64)


def diagnostics_from_sums(sums: torch.Tensor | list[float]) -> dict[str, float]:
    """The ``cepo/*`` metrics from `diagnostic_sums` (added over processes); {} when no token was
    teacher-scored, and a side's metrics only when that side has tokens."""
    s = dict(zip(_SUMS, [float(x) for x in sums]))
    n = s["n"]
    if n == 0:
        return {}
    mean = s["delta"] / n
    var = (s["delta_sq"] - n * mean * mean) / (n - 1) if n > 1 else 0.0  # unbiased, as torch.std
    out = {
        "cepo/delta_mean": mean,
        "cepo/delta_std": math.sqrt(max(var, 0.0)),
        "cepo/weight_clip_frac": (s["clip_high"] + s["clip_low"]) / n,
        "cepo/weight_clip_frac_high": s["clip_high"] / n,
        "cepo/weight_clip_frac_low": s["clip_low"] / n,
        "cepo/weight_mean": s["weight"] / n,
    }
    for side in ("pos", "neg"):
        count = s[f"n_{side}"]
        if count > 0:
            out[f"cepo/delta_mean_{side}"] = s[f"delta_{side}"] / count
            out[f"cepo/frac_wrong_dir_{side}"] = s[f"wrong_{side}"] / count
    return out


def token_diagnostics(delta: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor,
                      token_weight: torch.Tensor, *, eps_w: float) -> dict[str, float]:
    """`diagnostics_from_sums` of this process's tokens alone."""
    return diagnostics_from_sums(diagnostic_sums(delta, advantages, valid, token_weight,
                                                 eps_w=eps_w))
