"""Input checks for the public API: every bad input is a ValueError/TypeError naming the argument.

Shape, dtype and device checks are free and always run. Value checks (labels in range, finite
hidden states, weight, bias and advantages, a non-bool mask holding only 0/1) need one host sync
each; they run when ``validate=True`` (the default) and can be switched off in a hot loop whose
inputs are known to be good.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Below this, logits / τ lose all fp32 precision (and overflow for |logit| ≳ 1e34·τ); no sampling
# temperature in practice comes near it.
MIN_TEMPERATURE = 1e-4
_FP32_MAX = torch.finfo(torch.float32).max
_FINITE_CHUNK = 1 << 20  # elements per step of check_finite: isfinite makes a full-size
# temporary in the input dtype, so 1M elements keep the scratch to ~5 MiB (16M cost 64 MiB)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (token ids), got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(float(value))


def check_temperature(temperature: float) -> None:
    """τ in [MIN_TEMPERATURE, fp32 max], so that τ and 1/τ are finite (and useful) in fp32."""
    if not _real(temperature) or not MIN_TEMPERATURE <= float(temperature) <= _FP32_MAX:
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} "
                         f"(logits / temperature must stay finite in fp32), got {temperature!r}")


def check_positive(name: str, value) -> None:
    """A host-side number that must be finite and > 0 (no host sync: tensors are refused)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not _real(value) or not float(value) > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_weights_hparams(lam: float, eps_w: float) -> None:
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    if not 0.0 <= float(eps_w) < 1.0:
        raise ValueError(f"eps_w must lie in [0, 1), got {eps_w!r}")


def check_linear_inputs(hidden, weight, labels, bias, *, hidden_name: str = "hidden") -> None:
    """Shapes, dtypes and devices of one hidden stream against the lm_head and the labels."""
    check_tensor(hidden_name, hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, D), got shape {_shape(weight)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has hidden size {hidden.shape[-1] if hidden.dim() else '?'} "
            f"(shape {_shape(hidden)}) but weight is {_shape(weight)}: the last dim of "
            f"{hidden_name} must equal weight.shape[1] = {weight.shape[1]}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {_shape(labels)} must equal the leading shape of {hidden_name} "
            f"{tuple(hidden.shape[:-1])} ({hidden_name} is {_shape(hidden)})"
        )
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {_shape(bias)}")
    check_same_device(**{hidden_name: hidden, "weight": weight, "labels": labels, "bias": bias})


def index_labels(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels of any dtype as int64 indices (a uint8 index would be a boolean mask)."""
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels (int64, see ``index_labels``) must be in [0, V) or equal ignore_index (one sync)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} bad entries)"
        )


def check_finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """NaN/inf would silently poison every result it touches (one host sync).

    ``where`` (bool, shaped like ``t``) limits the check to the positions that count. Without it
    the check runs over slices of dim 0, so its scratch memory stays small even for an lm_head.
    """
    if t.numel() == 0:
        return
    if where is not None:
        ok = torch.isfinite(t) | ~where
    elif t.dim() == 0:
        ok = torch.isfinite(t)
    else:
        rows = max(1, _FINITE_CHUNK // max(1, t[0].numel()))
        ok = torch.stack([torch.isfinite(part).all() for part in t.split(rows)])
    if not bool(ok.all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_streams(policy_hidden, pos_hidden, neg_hidden) -> int:
    """Shapes of the three streams; returns K, the number of wrong-answer streams."""
    for name, t in (("policy_hidden", policy_hidden), ("pos_hidden", pos_hidden),
                    ("neg_hidden", neg_hidden)):
        check_tensor(name, t, floating=True)
    if pos_hidden.shape != policy_hidden.shape:
        raise ValueError(
            f"pos_hidden shape {_shape(pos_hidden)} must equal policy_hidden shape "
            f"{_shape(policy_hidden)}"
        )
    if neg_hidden.shape == policy_hidden.shape:
        return 1
    if neg_hidden.dim() == policy_hidden.dim() + 1 and neg_hidden.shape[1:] == policy_hidden.shape:
        if neg_hidden.shape[0] == 0:
            raise ValueError("neg_hidden has K = 0 wrong-answer streams; K must be >= 1")
        return neg_hidden.shape[0]
    raise ValueError(
        f"neg_hidden must be shaped like policy_hidden {_shape(policy_hidden)} or (K, *that), "
        f"got {_shape(neg_hidden)}"
    )


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"all hidden streams must share one dtype, got {listing}")


def check_mask(mask, like: torch.Tensor, what: str, *, validate: bool = True) -> torch.Tensor:
    """``mask`` shaped like ``like`` (the ``what`` tensor it selects tokens of), as bool.

    Masks come as users have them: bool, or 0/1 of any integer or floating dtype (TRL's
    ``completion_mask`` is int, verl's ``response_mask`` int64). With ``validate`` a non-bool
    mask is checked to hold only 0 and 1 (one host sync); without it, nonzero means True.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype.is_complex:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor or a 0/1 integer or floating tensor, "
                        f"got {got}")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the {what} shape "
                         f"{tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {what} is on {like.device}")
    if mask.dtype == torch.bool:
        return mask
    if validate and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"mask ({mask.dtype}) must hold only 0 and 1; found "
                             f"{mask[bad].flatten()[0].item()} ({int(bad.sum())} such entries)")
    return mask != 0
