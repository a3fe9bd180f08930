"""GRPO group advantages (docs/METHOD.md, "Advantages"): A_i = (R_i - mean_G R) / (std_G R + 1e-6),
unbiased std.

Rollouts are laid out group by group: rows [g*G, (g+1)*G) belong to prompt g.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = EPS, uniform_zero: bool = True
) -> torch.Tensor:
    """Per-rollout advantages [N] from rewards [N], N = prompts x `group_size`.

    A group whose rewards are all equal gets A = 0 exactly. Rounding would otherwise leave
    ~1e-8 / (~1e-8 + 1e-6) ≈ 0.01 there (eight rewards of 0.1 in fp32 do not average to 0.1),
    a spurious signal on a group that has none. With `group_size` 1 the unbiased std is
    undefined, so A = 0 too: a single sample carries no relative signal, and no NaN enters.

    ``uniform_zero=False`` computes A as the reference code (verl's GRPO estimator) does, rounding
    included: group by group with `torch.mean` / `torch.std` in fp32, so a uniform group keeps
    that tiny A (eight rewards of 0.1 give -0.0074 each), and a group of one gets R / (1 + eps).
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [P, G]
    if not uniform_zero:
        out = torch.empty_like(grouped)
        for p, row in enumerate(grouped):  # [G]
            if group_size == 1:
                out[p] = (row - torch.tensor(0.0)) / (torch.tensor(1.0) + eps)  # mean 0, std 1
            else:
                out[p] = (row - torch.mean(row)) / (torch.std(row) + eps)
        return out.view(-1)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    return torch.where(uniform, 0.0, centred / (std + eps)).view(-1)


def mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: groups whose rewards are not all equal (the only ones with a learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)
