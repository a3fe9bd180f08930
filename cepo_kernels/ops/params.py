"""The non-tensor options of the ops, as frozen dataclasses instead of long positional lists.

Every backend in ``ops.table.OPS`` takes the same objects, so a call reads the same whichever
backend runs. Optional inputs are ``None`` when absent: an op derives its feature flags from
``x is not None`` and is never handed a flag beside a tensor that could disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..validation import check_weights_hparams

DEFAULT_CHUNK_VOCAB = 4096
DEFAULT_CHUNK_TOKENS = None  # derived from the torch backend's tile budget


@dataclass(frozen=True)
class LogProbParams:
    """Every non-tensor option of one pass over W (CCE-style params object)."""

    backend: str  # "torch" | "triton", already resolved
    temperature: float = 1.0
    ignore_index: int = -100
    with_entropy: bool = False
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS  # torch backend tiles; None: tile budget
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB


@dataclass(frozen=True)
class ContrastParams:
    """The CEPO token-weight inputs of the three-stream op (docs/METHOD.md, "Advantages").

    Given together or not at all: the op computes Δ, w and Â exactly when it gets one.
    """

    advantages: torch.Tensor  # [N] per-token A (any float dtype)
    valid: torch.Tensor       # [N] bool: the tokens whose Â counts
    lam: float
    eps_w: float

    def __post_init__(self):
        check_weights_hparams(self.lam, self.eps_w)


class ContrastStats(NamedTuple):
    """What the three-stream op returns, every field [N] fp32; the last three are None
    without ``ContrastParams``."""

    policy: torch.Tensor                 # log P_S(y_t)
    pos: torch.Tensor                    # log P_T+(y_t)
    neg: torch.Tensor                    # log P_T-(y_t), logmeanexp over the K wrong answers
    delta: torch.Tensor | None        # Δ_t = pos − neg
    token_weight: torch.Tensor | None  # clipped w_t
    advantages: torch.Tensor | None   # Â_t, 0 where not valid
