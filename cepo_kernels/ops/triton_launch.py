"""Host side of the Triton backend: launch configs, buffers, the three kernels.

Imported lazily (only when backend="triton" runs), so ``cepo_kernels`` works without triton.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton

from ..backend import interpreting
from ..kernels.backward import logit_grad_bwd_kernel
from ..kernels.finalize import finalize_kernel
from ..kernels.forward import logit_stats_fwd_kernel
from .params import ContrastParams, ContrastStats
from .stats import LogitStats

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _arch(device: Optional[torch.device], arch: Optional[int]) -> int:
    """Compute capability as an int (80, 90, ...): ``arch`` if given, else the CUDA device's
    (the current one when ``device`` is None), else 90."""
    if arch is not None:
        return int(arch)
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _family(arch: int) -> int:
    """Config family: 90 (Hopper, wgmma), 100 (datacenter Blackwell, tcgen05), else 80
    (mma.sync: Ampere, Ada, consumer Blackwell)."""
    return 90 if 90 <= arch < 100 else 100 if 100 <= arch < 120 else 80


# (rows per block, BLOCK_V, BLOCK_D, num_warps, num_stages) per (family, dot inputs): the
# largest tiles that compile without register spills at every flag combination and fit the
# family's shared memory (python -m bench.aot checks each one for sm_80, sm_90 and sm_100).
# "16" = bf16/fp16 tensor cores, "tf32" = fp32 on tensor cores, "ieee" = exact fp32 (FMA).
_FORWARD = {
    (80, "16"): (128, 128, 64, 8, 2), (90, "16"): (128, 128, 64, 8, 2),
    (100, "16"): (128, 64, 64, 8, 3),
    (80, "tf32"): (128, 128, 32, 8, 2), (90, "tf32"): (128, 64, 32, 8, 3),
    (100, "tf32"): (128, 64, 32, 8, 3),
    (80, "ieee"): (128, 64, 16, 8, 2), (90, "ieee"): (128, 64, 16, 8, 2),
    (100, "ieee"): (128, 64, 16, 8, 2),
}
_BACKWARD = {
    (80, "16"): (128, 128, 32, 8, 3), (90, "16"): (128, 128, 64, 8, 3),
    (100, "16"): (128, 128, 32, 8, 2),
    (80, "tf32"): (128, 128, 16, 8, 2), (90, "tf32"): (128, 128, 32, 8, 2),
    (100, "tf32"): (128, 128, 32, 8, 2),
    (80, "ieee"): (64, 64, 16, 4, 2), (90, "ieee"): (64, 64, 16, 8, 2),
    (100, "ieee"): (64, 64, 16, 8, 3),
}


def _tile(table: dict, dtype: torch.dtype, arch: int, precision: Optional[str]) -> tuple:
    kind = "16" if dtype != torch.float32 else (precision or _dot_precision(dtype))
    return table[(_family(arch), kind)]


def forward_config(rows: int, V: int, D: int, dtype: torch.dtype, device: torch.device,
                   arch: Optional[int] = None, precision: Optional[str] = None) -> dict:
    """Blocks, warps and vocab splits of the forward kernel.

    On GPU: the tile of ``_FORWARD`` for the device's architecture (``arch``, e.g. 80, to ask
    for another one; ``precision`` "ieee"/"tf32" for fp32 dots, default as the launch decides),
    and the vocabulary split so that row_blocks × splits fills every SM a few times over even
    for small N. Under the interpreter: the largest blocks (each program step costs ms).
    """
    if interpreting():
        return dict(BLOCK_R=_pow2(rows, 16, 64), BLOCK_V=_pow2(V, 16, 1024),
                    BLOCK_D=_pow2(D, 16, 128), splits=1, num_warps=4, num_stages=1)
    block_r, block_v, block_d, warps, stages = _tile(_FORWARD, dtype, _arch(device, arch),
                                                     precision)
    row_blocks = triton.cdiv(rows, block_r)
    splits = max(1, min(triton.cdiv(4 * _num_sms(device), row_blocks), triton.cdiv(V, block_v)))
    return dict(BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_D=block_d, splits=splits,
                num_warps=warps, num_stages=stages)


def backward_config(N: int, V: int, D: int, dtype: torch.dtype,
                    device: Optional[torch.device] = None, arch: Optional[int] = None,
                    precision: Optional[str] = None) -> dict:
    """Blocks and warps of the backward kernel (one program per logit tile); ``_BACKWARD``
    per architecture, arguments as for ``forward_config``."""
    if interpreting():
        return dict(BLOCK_N=_pow2(N, 16, 64), BLOCK_V=_pow2(V, 16, 1024),
                    BLOCK_D=_pow2(D, 16, 128), num_warps=4, num_stages=1)
    block_n, block_v, block_d, warps, stages = _tile(_BACKWARD, dtype, _arch(device, arch),
                                                     precision)
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
                num_stages=stages)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend='triton' supports float32/bfloat16/float16 hidden states, got "
                         f"{t.dtype}; use backend='torch' for float64")


def _stack(streams) -> torch.Tensor:
    """[S, N, D]: a view when there is one stream, else one copy of the hidden states."""
    if isinstance(streams, torch.Tensor):
        return streams
    return streams[0].unsqueeze(0) if len(streams) == 1 else torch.stack(list(streams))


def _ptr(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """The kernel argument for an optional tensor: itself, or ``dummy`` when it is None. The
    matching flag is always ``t is not None`` of the same variable, so the two cannot disagree
    (the kernel never touches the dummy)."""
    return dummy if t is None else t


class _Partials(NamedTuple):
    """The forward kernel's per-split statistics, each [SPLITS, S·N] fp32."""

    m: torch.Tensor
    denom: torch.Tensor
    target: torch.Tensor
    ent: Optional[torch.Tensor]   # None unless the entropy was asked for
    splits: int


def _launch_forward(hs, weight, bias, labels32, temperature, with_entropy) -> _Partials:
    """Run the forward kernel over S streams [S, N, D]."""
    S, N, D = hs.shape
    V = weight.shape[0]
    cfg = forward_config(S * N, V, D, hs.dtype, hs.device)
    v_per_split = triton.cdiv(triton.cdiv(V, cfg["splits"]), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4 if with_entropy else 3, splits, S * N, dtype=torch.float32,
                       device=hs.device)
    p = _Partials(part[0], part[1], part[2], part[3] if with_entropy else None, splits)
    grid = (triton.cdiv(S * N, cfg["BLOCK_R"]) * splits,)
    logit_stats_fwd_kernel[grid](
        hs, weight, _ptr(bias, weight), labels32,
        p.m, p.denom, p.target, _ptr(p.ent, p.m),
        S, N, V, D, v_per_split,
        hs.stride(0), hs.stride(1), hs.stride(2), weight.stride(0), weight.stride(1),
        INV_TEMP=1.0 / temperature, HAS_BIAS=bias is not None, WITH_ENTROPY=p.ent is not None,
        UPCAST=interpreting(), DOT_PRECISION=_dot_precision(hs.dtype),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return p


def _launch_finalize(p: _Partials, labels32, S, N, ignore_index, *, contrastive: bool = False,
                     cepo: Optional[ContrastParams] = None):
    """Merge the splits; with ``contrastive`` also the (policy, pos, neg) log-probs, and with
    ``cepo`` Δ, w and Â. Every flag is derived from whether its tensors exist."""
    dev = labels32.device
    tgt = torch.empty(S, N, dtype=torch.float32, device=dev)
    lse = torch.empty_like(tgt)
    ent = None if p.ent is None else torch.empty_like(tgt)
    lp3 = torch.empty(3, N, dtype=torch.float32, device=dev) if contrastive else None
    adv = valid = hparams = delta = w = a_hat = None
    if cepo is not None:
        adv = cepo.advantages.to(torch.float32).contiguous()
        valid = cepo.valid.to(torch.int8).contiguous()
        hparams = torch.tensor([cepo.lam, math.log1p(-cepo.eps_w), math.log1p(cepo.eps_w)],
                               dtype=torch.float32, device=dev)
        delta, w, a_hat = (torch.empty(N, dtype=torch.float32, device=dev) for _ in range(3))
    block_n = _pow2(N, 16, 1024 if interpreting() else 256)
    finalize_kernel[(triton.cdiv(N, block_n),)](
        p.m, p.denom, p.target, _ptr(p.ent, p.m),
        labels32, _ptr(adv, tgt), _ptr(valid, labels32), _ptr(hparams, tgt),
        tgt, lse, _ptr(ent, tgt), _ptr(lp3, tgt), _ptr(delta, tgt), _ptr(w, tgt),
        _ptr(a_hat, tgt),
        N, p.splits, ignore_index,
        S=S, WITH_ENTROPY=p.ent is not None, CONTRASTIVE=lp3 is not None,
        WITH_ADV=cepo is not None, BLOCK_N=block_n,
    )
    return LogitStats(target=tgt, lse=lse, entropy=ent), lp3, (delta, w, a_hat)


def _labels32(labels: torch.Tensor) -> torch.Tensor:
    # int32 copy: fresh (16-byte aligned) memory, half the traffic, V < 2^31 always
    return labels.to(torch.int32).contiguous()


def forward_stats(streams: Sequence[torch.Tensor], weight, bias, labels, *, temperature: float,
                  ignore_index: int, with_entropy: bool) -> LogitStats:
    hs = _stack(streams)
    _check_dtype(hs)
    y = _labels32(labels)
    p = _launch_forward(hs, weight, bias, y, temperature, with_entropy)
    stats, _, _ = _launch_finalize(p, y, hs.shape[0], hs.shape[1], ignore_index)
    return stats


def contrastive(streams, weight, bias, labels, *, temperature: float, ignore_index: int,
                cepo: Optional[ContrastParams] = None) -> ContrastStats:
    """Streams (policy, pos, neg_1..neg_K): log-probs in one forward pass, then the fused
    epilogue (K-mixture, and with ``cepo`` Δ, w, Â)."""
    hs = _stack(streams)
    _check_dtype(hs)
    S, N, _ = hs.shape
    if S < 3:
        raise ValueError(f"contrastive needs policy, pos and >= 1 neg stream, got {S}")
    y = _labels32(labels)
    p = _launch_forward(hs, weight, bias, y, temperature, False)
    _, lp3, (delta, w, a_hat) = _launch_finalize(p, y, S, N, ignore_index, contrastive=True,
                                                 cepo=cepo)
    return ContrastStats(lp3[0], lp3[1], lp3[2], delta, w, a_hat)


def backward(hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent, *, temperature: float,
             ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool):
    """fp32 gradients (dH, dW, dB) of Σ g·lp (+ Σ g^H·H)."""
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    valid = labels != ignore_index
    zero = torch.zeros((), device=dev)
    g = torch.where(valid, grad_lp.float(), zero).contiguous()
    ge = ent = None
    if grad_ent is not None:
        ge = torch.where(valid, grad_ent.float(), zero).contiguous()
        ent = entropy.float().contiguous()
    d_hidden = torch.zeros(N, D, dtype=torch.float32, device=dev)
    d_weight = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_weight else None
    # with a bias the kernel always sums dB (a [V] vector, cheap); it is dropped if not needed
    d_bias = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    cfg = backward_config(N, V, D, hidden.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
    logit_grad_bwd_kernel[grid](
        hidden, weight, _ptr(bias, weight), _labels32(labels),
        lse.float().contiguous(), g, _ptr(ge, g), _ptr(ent, g),
        d_hidden, _ptr(d_weight, d_hidden), _ptr(d_bias, d_hidden),
        N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        INV_TEMP=1.0 / temperature, HAS_BIAS=bias is not None, WITH_ENTROPY=ge is not None,
        COMPUTE_DW=d_weight is not None, UPCAST=interpreting(),
        DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    d_bias = d_bias if need_bias else None
    return (d_hidden if need_hidden else None), d_weight, d_bias
