"""Backward kernel: gradients of Σ_t g_t·lp_t (+ g^H_t·H_t) for one hidden stream.

Grid (axis 0): row_blocks × vocab_blocks, row block fastest. Each program recomputes its logit
tile z = (h·Wᵀ + b)·INV_TEMP [BLOCK_N, BLOCK_V] from the saved per-token lse, forms

    dz_v = g_t·(1[v = y_t] − p_v) − g^H_t·p_v·(z_v − lse_t + H_t)      (p_v = exp(z_v − lse_t))

in fp32, with the per-token upstream gradients folded in *before* any sum over tokens, then adds
dz·W/τ into dH and dzᵀ·h/τ into dW (fp32 accumulators, atomic adds over the other grid axis).
1 − p_y is formed in fp32 before dz is cast to the input dtype for the tensor-core dot, so a
peaked distribution keeps its small true-class gradient (Liger #1329 rounded p_y first).
"""

import triton
import triton.language as tl

from .tl_utils import logit_tile


@triton.jit
def logit_grad_bwd_kernel(
    H, W, B, Y, LSE, G, GE, ENT,     # hidden [N, D], weight [V, D], bias [V]; labels..H [N]
    DH, DW, DB,                      # fp32 accumulators [N, D], [V, D], [V]
    N, V, DIM,
    stride_hn, stride_hd, stride_wv, stride_wd,
    INV_TEMP: tl.constexpr,
    HAS_BIAS: tl.constexpr,          # adds b to z and also sums dB
    WITH_ENTROPY: tl.constexpr,      # an entropy gradient is present
    COMPUTE_DW: tl.constexpr,        # False for a frozen / LoRA lm_head
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % row_blocks
    pid_v = pid // row_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)

    # 1. recompute the logit tile (−inf in padded columns)
    z = logit_tile(H + rows * stride_hn, W, B, cols, row_ok, col_ok, DIM, stride_hd, stride_wv,
                   stride_wd, INV_TEMP, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)

    # 2. dz in fp32; padded rows have g = 0 and padded columns p = 0
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    y = tl.load(Y + rows, mask=row_ok, other=-1).to(tl.int64)
    p = tl.where(col_ok[None, :] & row_ok[:, None], tl.exp(z - lse[:, None]), 0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    if WITH_ENTROPY:
        ge = tl.load(GE + rows, mask=row_ok, other=0.0)
        ent = tl.load(ENT + rows, mask=row_ok, other=0.0)
        z_safe = tl.where(col_ok[None, :], z, 0.0)
        dz -= ge[:, None] * p * (z_safe - lse[:, None] + ent[:, None])
    dz = dz * INV_TEMP                                           # dz/d(h·Wᵀ) = 1/τ

    if HAS_BIAS:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_ok)

    # 3. project back: dH += dz·W,  dW += dzᵀ·h, one hidden chunk at a time
    for d0 in range(0, DIM, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < DIM
        w = tl.load(W + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)      # [BLOCK_V, BLOCK_D]
        if UPCAST:
            w = w.to(tl.float32)
        dh = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        tl.atomic_add(DH + rows[:, None] * DIM + dd[None, :], dh,
                      mask=row_ok[:, None] & d_ok[None, :])
        if COMPUTE_DW:
            h = tl.load(H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PRECISION)
            tl.atomic_add(DW + cols[:, None] * DIM + dd[None, :], dw,
                          mask=col_ok[:, None] & d_ok[None, :])
