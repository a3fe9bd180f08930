"""Explicit backend choice: which implementation runs, and why, is always known to the caller.

``"triton"`` runs the fused Triton kernels (CUDA tensors, or CPU tensors when the process was
started with ``TRITON_INTERPRET=1``); ``"torch"`` runs the chunked pure-torch implementation;
``"auto"`` picks triton for CUDA tensors and torch otherwise. A request that cannot be honoured
raises instead of silently running something else.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("cepo_kernels")
BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({exc})"
    return True, ""


def resolve_backend(requested: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> str:
    """Return the backend that will run for ``requested`` on ``device``, or raise why it cannot."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    ok, why = triton_available()
    if requested == "torch":
        chosen = "torch"
    elif requested == "triton":
        if not ok:
            raise ValueError(f"backend='triton' was requested but {why}")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set "
                "before triton is imported"
            )
        chosen = "triton"
    else:
        # float64 is the oracle's dtype: the kernels do not take it, the torch backend does
        chosen = "triton" if (device.type == "cuda" and ok and dtype != torch.float64) else "torch"
        if device.type == "cuda" and not ok:
            logger.warning("backend='auto' on %s runs the torch backend: %s", device, why)
    logger.debug("cepo_kernels backend: requested=%s device=%s -> %s", requested, device, chosen)
    return chosen
