"""Host-side ops of each backend; ``OPS`` maps a resolved backend name to them."""

from .params import ContrastParams, ContrastStats, LogProbParams
from .table import OPS, ops_for

__all__ = ["OPS", "ContrastParams", "ContrastStats", "LogProbParams", "ops_for"]
