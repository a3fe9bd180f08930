"""Forward kernel: per-row online logsumexp (+ label logit, + entropy sum) over a vocab range.

Shapes: S streams, N tokens, D hidden, V vocab. A "row" is one (token n, stream s) pair, ordered
token-major (row = n·S + s), so a block of BLOCK_R rows holds all streams of ~BLOCK_R/S tokens and
every tile of W loaded into SRAM is multiplied against all of them: W is read once for all streams.

Grid (axis 0 only, so N·S far above 65,535 works): row_blocks × SPLITS, row block fastest, so
programs running together share the same W tiles in L2. Program (r, k) covers vocab columns
[k·V_PER_SPLIT, (k+1)·V_PER_SPLIT) and writes four partial statistics per row to [SPLITS, S·N]:

    m = max_v z_v,  denom = Σ_v exp(z_v − m),  t = z_y if y in range else 0,  e = Σ_v exp(z_v − m)·z_v

which ``finalize.py`` merges: lse = M + log Σ_k denom_k e^{m_k − M},  Σ p·z = Σ_k e_k e^{m_k−M} / Σ denom.
z = (h·Wᵀ + b)·INV_TEMP is accumulated in fp32; running maxima start at −inf.
"""

import triton
import triton.language as tl

from .tl_utils import logit_tile


@triton.jit
def logit_stats_fwd_kernel(
    # pointers
    H, W, B, Y,                      # hidden [S, N, D] (strided), weight [V, D], bias [V], y [N]
    M_OUT, DENOM_OUT, T_OUT, E_OUT,  # partial stats, each [SPLITS, S*N] fp32
    # sizes
    S, N, V, DIM, V_PER_SPLIT,
    # strides (elements)
    stride_hs, stride_hn, stride_hd, stride_wv, stride_wd,
    # constants
    INV_TEMP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,            # fp32 tiles before tl.dot (the interpreter's bf16 is wrong)
    DOT_PRECISION: tl.constexpr,     # "ieee" for exact fp32, "tf32" when the user allows it
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)     # int64 offsets: V·D and S·N·D exceed 2^31
    num_rows = S * N
    row_blocks = tl.cdiv(num_rows, BLOCK_R)
    pid_r = pid % row_blocks
    split = pid // row_blocks

    # 1. rows of this program: (token n, stream s) pairs and their labels
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < num_rows
    tok = rows // S
    stream = rows % S
    h_row = H + stream * stride_hs + tok * stride_hn
    y = tl.load(Y + tok, mask=row_ok, other=-1).to(tl.int64)

    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    e = tl.zeros([BLOCK_R], tl.float32)

    # 2. stream the vocabulary range tile by tile
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z = logit_tile(h_row, W, B, cols, row_ok, col_ok, DIM, stride_hd, stride_wv, stride_wd,
                       INV_TEMP, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_R, BLOCK_V, BLOCK_D)

        # 3. the label's logit lives in exactly one tile of one split
        t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

        # 4. online softmax statistics (m stays finite after the first tile: ≥1 valid column)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        denom = denom * scale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            e = e * scale + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new

    # 5. partial statistics of this split
    out = split * num_rows + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(DENOM_OUT + out, denom, mask=row_ok)
    tl.store(T_OUT + out, t, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(E_OUT + out, e, mask=row_ok)
