"""The two schedules of a run, both pure functions of the training step k = 1, 2, ...

Deriving them from the step (nothing stateful) is what makes ``--resume`` continue exactly: a run
resumed at step k sets the same λ and lr as an uninterrupted one, without scheduler state.

    λ_k  = λ0 · max(0, 1 − (k − 1 + s)/T_warm)      s = 0 (CEPO), 1 (the reference RLSD script)
    lr_k = lr · k/W                                        k ≤ W (linear warm-up, W steps)
         = lr · [m + (1 − m) · ½(1 + cos(π (k − W − 1)/(K − W)))]   cosine, K = total steps
         = lr                                                   constant

The lr changes once per training step (one rollout batch), like the reference code's scheduler,
not per optimizer step within it: the two mini-batch updates of a step share one lr.
"""

from __future__ import annotations

import math


def lam_at(step: int, lam0: float, warmup_steps: int, offset: int = 0) -> float:
    """λ of training step `step` (1-based). `warmup_steps` (T_warm) = 0 keeps λ0 throughout.

    `offset` shifts the decay by whole steps: 1 gives λ0·(1 − k/T_warm), the reference RLSD
    script's schedule (0.48, 0.46, ..., 0 from step 25 with λ0 0.5, T_warm 25).
    """
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if warmup_steps <= 0:
        return float(lam0)
    return float(lam0) * max(0.0, 1.0 - (step - 1 + offset) / warmup_steps)


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of training step `step` (1-based) out of `total_steps`."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps - 1) / decay_steps)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
