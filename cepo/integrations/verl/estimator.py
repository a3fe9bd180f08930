"""``algorithm.adv_estimator=cepo``: the GRPO group advantage of docs/METHOD.md, "Advantages",
computed by the project's `cepo.group_advantages`, for verl's estimator dispatch.

verl hands an estimator the token rewards, the response mask and the group ids (``index``), in
any order and with groups of any size; the CEPO reweighting needs the teachers, so it runs later,
in the ``cepo`` trainer mode. With this estimator alone (any trainer mode) a run is GRPO with
the project's A (an all-equal group gets exactly 0).
"""

from __future__ import annotations

import torch

from cepo.group_advantages import group_advantages

NAME = "cepo"


def cepo_group_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                         index, config=None, **_unused) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, T]: A_i on every response token of row i."""
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(f"token_level_rewards {tuple(token_level_rewards.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must match")
    if index is None or len(index) != token_level_rewards.shape[0]:
        raise ValueError("adv_estimator=cepo needs one group id (uid) per row")
    if config is not None and not _get(config, "norm_adv_by_std_in_grpo", True):
        raise ValueError("adv_estimator=cepo divides by the group's std (docs/METHOD.md, "
                         "\"Advantages\"); algorithm.norm_adv_by_std_in_grpo=False is not "
                         "supported")
    scores = token_level_rewards.float().sum(dim=-1)  # [B]
    groups: dict = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(i)
    adv = torch.zeros_like(scores)
    with torch.no_grad():
        for rows in groups.values():
            adv[rows] = group_advantages(scores[rows], len(rows))
    out = adv[:, None] * response_mask.to(adv.dtype)
    return out, out


def _get(config, key, default):
    getter = getattr(config, "get", None)
    return getter(key, default) if getter else getattr(config, key, default)
