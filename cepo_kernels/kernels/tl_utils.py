"""``@triton.jit`` helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(h_row, W, B, cols, row_ok, col_ok, DIM, stride_hd, stride_wv, stride_wd,
               INV_TEMP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """z = (h·Wᵀ + b)·INV_TEMP for one [BLOCK_R, BLOCK_V] tile, fp32, −inf in padded columns.

    ``h_row`` holds one base pointer per row (so rows may come from different streams); the
    hidden dimension is consumed BLOCK_D at a time with fp32 accumulation.
    """
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < DIM
        h = tl.load(h_row[:, None] + dd[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)      # [BLOCK_D, BLOCK_V]
        if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns: upcast after the load
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * INV_TEMP, float("-inf"))
