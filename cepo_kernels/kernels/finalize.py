"""Epilogue kernel: merge the vocab splits and, for CEPO, emit Δ, w and Â for every token.

One program per BLOCK_N tokens, reading the [SPLITS, S·N] partials of ``forward.py``:

    lse = M + log Σ_k denom_k e^{m_k − M}     (M = max_k m_k)
    lp  = t − lse  (0 at ignored labels)       H = lse − Σ_k e_k e^{m_k − M} / Σ_k denom_k e^{m_k − M}

With CONTRASTIVE the streams are (policy, pos, neg_1..neg_K), and the same program computes

    neg = logmeanexp_k lp_k,   Δ = pos − neg,   w = exp(clamp(sign(A)·Δ, log(1 − ε), log(1 + ε)))
    Â = A · ((1 − λ) + λ·w)   (0 where not valid)

λ and the log clip bounds come from a 3-element fp32 tensor, so a λ schedule never recompiles.
"""

import triton
import triton.language as tl


@triton.jit
def finalize_kernel(
    M, DENOM, T, E,                  # partial stats [SPLITS, S*N] fp32
    Y, ADV, VALID, HPARAMS,          # labels [N], Â inputs: A [N] fp32, valid [N] int8, (λ, lo, hi)
    TGT_OUT, LSE_OUT, ENT_OUT,       # [S, N] fp32
    LP_OUT,                          # [3, N] fp32: policy, pos, neg mixture (CONTRASTIVE)
    DELTA_OUT, W_OUT, AHAT_OUT,      # [N] fp32 (WITH_ADV)
    N, SPLITS, IGNORE_INDEX,
    S: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    CONTRASTIVE: tl.constexpr,
    WITH_ADV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    toks = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ok = toks < N
    y = tl.load(Y + toks, mask=ok, other=IGNORE_INDEX)
    labelled = y != IGNORE_INDEX
    num_rows = S * N

    lp_policy = tl.zeros([BLOCK_N], tl.float32)
    lp_pos = tl.zeros([BLOCK_N], tl.float32)
    neg_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    neg_sum = tl.zeros([BLOCK_N], tl.float32)
    for s in tl.static_range(S):
        rows = toks * S + s
        # 1. merge the vocab splits (max first, then rescaled sums)
        big = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for k in range(SPLITS):
            big = tl.maximum(big, tl.load(M + k * num_rows + rows, mask=ok, other=0.0))
        denom_sum = tl.zeros([BLOCK_N], tl.float32)
        tsum = tl.zeros([BLOCK_N], tl.float32)
        esum = tl.zeros([BLOCK_N], tl.float32)
        for k in range(SPLITS):
            sc = tl.exp(tl.load(M + k * num_rows + rows, mask=ok, other=0.0) - big)
            denom_sum += tl.load(DENOM + k * num_rows + rows, mask=ok, other=1.0) * sc
            tsum += tl.load(T + k * num_rows + rows, mask=ok, other=0.0)
            if WITH_ENTROPY:
                esum += tl.load(E + k * num_rows + rows, mask=ok, other=0.0) * sc
        lse = big + tl.log(denom_sum)
        tl.store(TGT_OUT + s * N + toks, tsum, mask=ok)
        tl.store(LSE_OUT + s * N + toks, lse, mask=ok)
        if WITH_ENTROPY:
            tl.store(ENT_OUT + s * N + toks, lse - esum / denom_sum, mask=ok)
        lp = tl.where(labelled, tsum - lse, 0.0)

        # 2. sort the streams into roles (s is a compile-time constant)
        if CONTRASTIVE:
            if s == 0:
                lp_policy = lp
            elif s == 1:
                lp_pos = lp
            else:
                new_max = tl.maximum(neg_max, lp)
                neg_sum = neg_sum * tl.exp(neg_max - new_max) + tl.exp(lp - new_max)
                neg_max = new_max

    if CONTRASTIVE:
        lp_neg = neg_max + tl.log(neg_sum / (S - 2))   # logmeanexp over K = S − 2
        tl.store(LP_OUT + toks, lp_policy, mask=ok)
        tl.store(LP_OUT + N + toks, lp_pos, mask=ok)
        tl.store(LP_OUT + 2 * N + toks, lp_neg, mask=ok)
        if WITH_ADV:
            # 3. CEPO token weights in log space (docs/METHOD.md, "Advantages")
            lam = tl.load(HPARAMS)
            log_lo = tl.load(HPARAMS + 1)
            log_hi = tl.load(HPARAMS + 2)
            a = tl.load(ADV + toks, mask=ok, other=0.0)
            valid = tl.load(VALID + toks, mask=ok, other=0) != 0
            delta = lp_pos - lp_neg
            sign = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))
            log_w = tl.minimum(tl.maximum(sign * delta, log_lo), log_hi)
            w = tl.exp(log_w)
            a_hat = tl.where(valid, a * ((1.0 - lam) + lam * w), 0.0)
            tl.store(DELTA_OUT + toks, delta, mask=ok)
            tl.store(W_OUT + toks, w, mask=ok)
            tl.store(AHAT_OUT + toks, a_hat, mask=ok)
