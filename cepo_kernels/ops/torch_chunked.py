"""The pure-torch backend: the same math as the Triton kernels, chunked over tokens and vocabulary.

Only one tile of logits, [S·chunk_tokens, chunk_vocab] in fp32, exists at a time, so the extra
memory is O(N) plus that tile, never N×V. Every tile of W is multiplied against all S streams of the
same tokens at once (one matmul), so W is read once per token chunk for all streams.

The label's logit is not gathered from the tiles: it is the indexed dot h_t·W[y_t] (+ b[y_t]),
computed once in fp32. In the backward the true-class term 1[v = y] − p_v is formed inside the fp32
tile, so the near-cancellation 1 − p_y of a peaked distribution is exact to fp32 before anything is
rounded (KERNEL_ANCHORS rule 3).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .stats import LogitStats, compute_dtype

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 4096


def _scaled_bias(bias, v0, v1, inv_temp, cdtype):
    return None if bias is None else bias[v0:v1].to(cdtype) * inv_temp


def _tile_logits(h_scaled, weight, bias_scaled, v0, v1, cdtype):
    """z = (h·W[v0:v1]ᵀ + b) / τ for one tile; h is already divided by τ."""
    w = weight[v0:v1].to(cdtype)
    if bias_scaled is None:
        return h_scaled @ w.T
    return torch.addmm(bias_scaled, h_scaled, w.T)


def target_logits(hidden: torch.Tensor, weight, bias, safe_labels, inv_temp, cdtype):
    """z_y = (h·W[y] + b[y]) / τ for every token of one stream: [N], an O(N·D) indexed dot."""
    z = (hidden.to(cdtype) * weight[safe_labels].to(cdtype)).sum(-1)
    if bias is not None:
        z = z + bias[safe_labels].to(cdtype)
    return z * inv_temp


def forward_stats(streams: Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], labels: torch.Tensor, *, temperature: float,
                  ignore_index: int, with_entropy: bool,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                  chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> LogitStats:
    """Target logit, logsumexp (and entropy) of S hidden streams [N, D] sharing W and labels."""
    S, N, V = len(streams), labels.shape[0], weight.shape[0]
    cdtype = compute_dtype(streams[0].dtype)
    inv_temp = 1.0 / temperature
    device = labels.device
    safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    target = torch.stack([target_logits(s, weight, bias, safe, inv_temp, cdtype) for s in streams])
    lse = torch.empty(S, N, dtype=cdtype, device=device)
    ent = torch.empty(S, N, dtype=cdtype, device=device) if with_entropy else None
    vocab_ranges = [(v0, min(v0 + chunk_vocab, V)) for v0 in range(0, V, chunk_vocab)]

    for n0 in range(0, N, chunk_tokens):
        n1 = min(n0 + chunk_tokens, N)
        # [S·cn, D]: all streams of these tokens, so each W tile feeds one matmul for all of them
        h = torch.cat([s[n0:n1].to(cdtype) for s in streams]) * inv_temp
        m = torch.full((h.shape[0],), float("-inf"), dtype=cdtype, device=device)
        run_lse = m.clone()
        d = torch.zeros_like(m)
        e = torch.zeros_like(m)
        for v0, v1 in vocab_ranges:
            z = _tile_logits(h, weight, _scaled_bias(bias, v0, v1, inv_temp, cdtype), v0, v1, cdtype)
            if not with_entropy:
                run_lse = torch.logaddexp(run_lse, torch.logsumexp(z, dim=-1))
                continue
            # online softmax with the running sum of p·z for the entropy: H = lse − Σp·z / Σp
            m_new = torch.maximum(m, z.amax(dim=-1))
            scale = torch.exp(m - m_new)
            p = torch.exp(z - m_new[:, None])
            d = d * scale + p.sum(-1)
            e = e * scale + (p * z).sum(-1)
            m = m_new
        if with_entropy:
            run_lse = m + torch.log(d)
            ent[:, n0:n1] = (run_lse - e / d).view(S, n1 - n0)
        lse[:, n0:n1] = run_lse.view(S, n1 - n0)
    return LogitStats(target=target, lse=lse, entropy=ent)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             labels: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
             grad_lp: torch.Tensor, grad_ent: Optional[torch.Tensor], *, temperature: float,
             ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunk_vocab: int = DEFAULT_CHUNK_VOCAB):
    """Gradients of Σ_t g_t·lp_t (+ g^H_t·H_t) w.r.t. hidden [N, D], weight [V, D], bias [V].

    dlp_t/dz_v = 1[v = y_t] − p_v;   dH_t/dz_v = −p_v (z_v − lse_t + H_t);   dz/dh = W/τ.
    The per-token upstream g_t is folded into dz before any sum over tokens (rule 1).
    Returns fp32 (fp64) accumulators; the caller casts to the parameters' dtypes.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    cdtype = compute_dtype(hidden.dtype)
    inv_temp = 1.0 / temperature
    valid = labels != ignore_index
    g = torch.where(valid, grad_lp.to(cdtype), torch.zeros((), dtype=cdtype, device=hidden.device))
    ge = None
    if grad_ent is not None:
        ge = torch.where(valid, grad_ent.to(cdtype), torch.zeros((), dtype=cdtype, device=hidden.device))
    d_hidden = torch.zeros(N, D, dtype=cdtype, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(V, D, dtype=cdtype, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=cdtype, device=hidden.device) if need_bias else None

    for n0 in range(0, N, chunk_tokens):
        n1 = min(n0 + chunk_tokens, N)
        h_raw = hidden[n0:n1].to(cdtype)
        h = h_raw * inv_temp
        lse_c = lse[n0:n1, None]
        g_c = g[n0:n1, None] * inv_temp
        labels_c = labels[n0:n1]  # ignored tokens have g = 0, so their label column adds nothing
        for v0 in range(0, V, chunk_vocab):
            v1 = min(v0 + chunk_vocab, V)
            z = _tile_logits(h, weight, _scaled_bias(bias, v0, v1, inv_temp, cdtype), v0, v1, cdtype)
            p = torch.exp(z - lse_c)
            dz = p * g_c  # g·p_v; the sign and the label's +g are applied below
            if ge is not None:
                dz += p * (z - lse_c + entropy[n0:n1, None]) * (ge[n0:n1, None] * inv_temp)
            dz = dz.neg_()
            rows = torch.nonzero((labels_c >= v0) & (labels_c < v1)).squeeze(1)
            dz[rows, labels_c[rows] - v0] += g_c[rows, 0]
            w = weight[v0:v1].to(cdtype)
            if d_hidden is not None:
                d_hidden[n0:n1].addmm_(dz, w)
            if d_weight is not None:
                d_weight[v0:v1].addmm_(dz.T, h_raw)
            if d_bias is not None:
                d_bias[v0:v1] += dz.sum(0)

    return d_hidden, d_weight, d_bias
