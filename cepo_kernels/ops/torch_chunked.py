"""The pure-torch backend: the same math as the Triton kernels, chunked over tokens and vocabulary.

Only one tile of logits, [S·chunk_tokens, chunk_vocab] in fp32 (plus one scratch tile of the same
size), exists at a time, so the extra memory is O(N) plus two tiles, never N×V. Every tile of W is
multiplied against all S streams of the same tokens at once (one matmul), so W is read once per
token chunk for all streams. Tiles are written into buffers allocated once per call (``out=``),
which keeps the GEMM fast and avoids page-faulting a fresh tile each time.

With ``grad_hidden=True`` (hidden states need a gradient, the lm_head does not: LoRA or a frozen
head) the forward also accumulates E_p[W] = Σ_v p_v W_v the way flash-attention accumulates its
output (each tile's softmax-weighted W, reweighted by exp(lse_tile − lse)), which gives
∂lp_t/∂h_t = (W_y − E_p[W]) / τ exactly. lp_t depends on h_t alone, so the backward is then
g_t·∂lp_t/∂h_t for any per-token g: no logits are recomputed and the update costs two matmuls,
like the naive path, instead of three.

Per tile the logsumexp comes from torch's fused log_softmax kernel (max and Σexp in one vectorised
sweep, ~5× faster on CPU than ``torch.logsumexp``): lse_tile = z_j − log_softmax(z)_j read at a
column j whose logit is near the maximum (``_tile_lse``). Tiles are merged with logaddexp.

The label's logit is not gathered from the tiles: it is the indexed dot h_t·W[y_t] (+ b[y_t]),
computed once in fp32. In the backward the true-class term 1[v = y] − p_v is formed inside the fp32
tile, so the near-cancellation 1 − p_y of a peaked distribution is exact to fp32 before anything is
rounded (docs/METHOD.md, "Kernels").
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..advantages import token_weights
from .params import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, ContrastParams, ContrastStats
from .stats import LogitStats, compute_dtype

# One logits tile holds about this many elements (25 MB in fp32); chunk_tokens defaults to what
# fills it for the number of streams, so 1 stream gets 1536 tokens per chunk and 3 get 512.
TILE_ELEMENTS = 1536 * 4096


def chunk_tokens_for(num_streams: int, chunk_vocab: int, chunk_tokens: Optional[int]) -> int:
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens))
    return max(1, TILE_ELEMENTS // (num_streams * chunk_vocab))


class _Tiles:
    """Flat scratch buffers viewed as contiguous [rows, cols] tiles (the last tile is narrower)."""

    def __init__(self, rows: int, cols: int, count: int, dtype, device):
        self.flat = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(count)]

    def get(self, i: int, rows: int, cols: int) -> torch.Tensor:
        return self.flat[i][: rows * cols].view(rows, cols)


def _log_softmax_into(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    try:
        return torch._log_softmax(z, 1, False, out=out)
    except (AttributeError, RuntimeError, TypeError):  # an older/newer torch without the overload
        return torch.log_softmax(z, dim=1)


ANCHOR_COLUMNS = 64   # where the cheap anchor for the tile's lse is looked for
ANCHOR_FLOOR = -30.0  # log p of the anchor must stay above this, or the full argmax is used


def _tile_lse(z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of the tile, read off log_softmax: lse = z_j − log p_j for any j.

    Both terms are exact to fp32 when z_j is near the row's maximum, so j is the largest logit
    among the first ANCHOR_COLUMNS columns (a 64-column argmax instead of a full sweep); rows
    where that anchor is far below the maximum (masked or tiny logits there) take the full
    argmax. That check is one host sync per tile (free on the CPU this backend is for).
    """
    top = z[:, :ANCHOR_COLUMNS].argmax(dim=1, keepdim=True)
    anchor_log_p = log_p.gather(1, top)
    if not bool((anchor_log_p > ANCHOR_FLOOR).all()):
        top = z.argmax(dim=1, keepdim=True)
        anchor_log_p = log_p.gather(1, top)
    return (z.gather(1, top) - anchor_log_p).squeeze(1)


def _tile_logits(h_scaled, weight, bias, v0, v1, inv_temp, cdtype, out):
    """out ← (h·W[v0:v1]ᵀ + b) / τ; h is already divided by τ."""
    w = weight[v0:v1].to(cdtype)
    if bias is None:
        return torch.mm(h_scaled, w.T, out=out)
    return torch.addmm(bias[v0:v1].to(cdtype), h_scaled, w.T, beta=inv_temp, out=out)


def forward_stats(streams: Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], labels: torch.Tensor, *, temperature: float,
                  ignore_index: int, with_entropy: bool, grad_hidden: bool = False,
                  chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
                  chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> LogitStats:
    """Target logit, logsumexp (and entropy, and ∂lp/∂h) of S streams [N, D] sharing W, labels."""
    S, N, V = len(streams), labels.shape[0], weight.shape[0]
    cdtype = compute_dtype(streams[0].dtype)
    inv_temp = 1.0 / temperature
    device = labels.device
    cv = min(chunk_vocab, V)
    ct = chunk_tokens_for(S, cv, chunk_tokens)
    safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    target = torch.empty(S, N, dtype=cdtype, device=device)
    lse = torch.empty(S, N, dtype=cdtype, device=device)
    ent = torch.empty(S, N, dtype=cdtype, device=device) if with_entropy else None
    jac = torch.empty(S, N, weight.shape[1], dtype=cdtype, device=device) if grad_hidden else None
    tiles = _Tiles(S * min(ct, N), cv, 2, cdtype, device)

    for n0 in range(0, N, ct):
        n1 = min(n0 + ct, N)
        rows = S * (n1 - n0)
        # [S·cn, D]: all streams of these tokens, so each W tile feeds one matmul for all of them
        h = torch.cat([s[n0:n1].to(cdtype) for s in streams]) * inv_temp
        # the label's logit z_y = (h·W[y] + b[y]) / τ: an O(S·cn·D) indexed dot, no tile needed
        w_y = weight[safe[n0:n1]].to(cdtype)
        z_y = (h.view(S, n1 - n0, -1) * w_y).sum(-1)
        if bias is not None:
            z_y += bias[safe[n0:n1]].to(cdtype) * inv_temp
        target[:, n0:n1] = z_y
        run_lse = torch.full((rows,), float("-inf"), dtype=cdtype, device=device)
        run_pz = torch.zeros(rows, dtype=cdtype, device=device)  # E_p[z] so far (entropy)
        run_pw = torch.zeros(rows, weight.shape[1], dtype=cdtype, device=device) if grad_hidden \
            else None                                             # E_p[W] so far (∂lp/∂h)
        for v0 in range(0, V, cv):
            v1 = min(v0 + cv, V)
            z = _tile_logits(h, weight, bias, v0, v1, inv_temp, cdtype, tiles.get(0, rows, v1 - v0))
            log_p = _log_softmax_into(z, tiles.get(1, rows, v1 - v0))
            tile_lse = _tile_lse(z, log_p)
            new_lse = torch.logaddexp(run_lse, tile_lse)
            if with_entropy or grad_hidden:
                # tile expectations, reweighted by the tile's share exp(lse_k − lse) of the mass
                keep, share = torch.exp(run_lse - new_lse), torch.exp(tile_lse - new_lse)
                p = log_p.exp_()                                  # softmax within the tile
                if grad_hidden:
                    tile_pw = p @ weight[v0:v1].to(cdtype)
                    run_pw = run_pw * keep[:, None] + tile_pw * share[:, None]
                if with_entropy:
                    run_pz = run_pz * keep + p.mul_(z).sum(1) * share
            run_lse = new_lse
        lse[:, n0:n1] = run_lse.view(S, n1 - n0)
        if with_entropy:
            ent[:, n0:n1] = (run_lse - run_pz).view(S, n1 - n0)
        if grad_hidden:
            jac[:, n0:n1] = ((w_y - run_pw.view(S, n1 - n0, -1)) * inv_temp)
    return LogitStats(target=target, lse=lse, entropy=ent, grad_hidden=jac)


def logmeanexp(lps: torch.Tensor) -> torch.Tensor:
    """log mean_k exp(lp_k) over the K wrong-answer streams ([K, N] → [N])."""
    if lps.shape[0] == 1:
        return lps[0]
    return torch.logsumexp(lps, dim=0) - torch.log(torch.tensor(float(lps.shape[0]),
                                                                dtype=lps.dtype))


def contrastive(streams: Sequence[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor], labels: torch.Tensor, *, temperature: float,
                ignore_index: int, cepo: Optional[ContrastParams] = None,
                chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
                chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> ContrastStats:
    """Streams (policy, pos, neg_1..neg_K) in one chunked pass over W, then the K-mixture and,
    with ``cepo``, Δ, w and Â: the twin of the Triton forward + finalize epilogue."""
    if len(streams) < 3:
        raise ValueError(f"contrastive needs policy, pos and >= 1 neg stream, got {len(streams)}")
    stats = forward_stats(list(streams), weight, bias, labels, temperature=temperature,
                          ignore_index=ignore_index, with_entropy=False,
                          chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    lps = stats.logprobs(labels != ignore_index).float()
    policy, pos, neg = lps[0], lps[1], logmeanexp(lps[2:])
    if cepo is None:
        return ContrastStats(policy, pos, neg, None, None, None)
    tw = token_weights(cepo.advantages, pos, neg, cepo.valid, lam=cepo.lam, eps_w=cepo.eps_w)
    return ContrastStats(policy, pos, neg, tw.delta, tw.token_weight, tw.advantages)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             labels: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
             grad_lp: torch.Tensor, grad_ent: Optional[torch.Tensor], *, temperature: float,
             ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
             chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
             chunk_vocab: int = DEFAULT_CHUNK_VOCAB):
    """Gradients of Σ_t g_t·lp_t (+ g^H_t·H_t) w.r.t. hidden [N, D], weight [V, D], bias [V].

    dlp_t/dz_v = 1[v = y_t] − p_v;   dH_t/dz_v = −p_v (log p_v + H_t);   dz/dh = W/τ.
    The per-token upstream g_t is folded into dz before any sum over tokens (rule 1).
    Returns fp32 (fp64) accumulators; the caller casts to the parameters' dtypes.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    cdtype = compute_dtype(hidden.dtype)
    inv_temp = 1.0 / temperature
    device = hidden.device
    cv = min(chunk_vocab, V)
    ct = chunk_tokens_for(1, cv, chunk_tokens)
    valid = labels != ignore_index
    zero = torch.zeros((), dtype=cdtype, device=device)
    # fold 1/τ (dz/d(h·Wᵀ)) into the per-token coefficients once
    g = torch.where(valid, grad_lp.to(cdtype), zero) * inv_temp
    ge = None if grad_ent is None else torch.where(valid, grad_ent.to(cdtype), zero) * inv_temp
    d_hidden = torch.zeros(N, D, dtype=cdtype, device=device) if need_hidden else None
    d_weight = torch.zeros(V, D, dtype=cdtype, device=device) if need_weight else None
    d_bias = torch.zeros(V, dtype=cdtype, device=device) if need_bias else None
    tiles = _Tiles(min(ct, N), cv, 2 if ge is not None else 1, cdtype, device)

    for n0 in range(0, N, ct):
        n1 = min(n0 + ct, N)
        rows = n1 - n0
        h_raw = hidden[n0:n1].to(cdtype)
        h = h_raw * inv_temp
        lse_c = lse[n0:n1, None]
        g_c = g[n0:n1, None]
        labels_c = labels[n0:n1]  # ignored tokens have g = 0, so their label column adds nothing
        for v0 in range(0, V, cv):
            v1 = min(v0 + cv, V)
            z = _tile_logits(h, weight, bias, v0, v1, inv_temp, cdtype, tiles.get(0, rows, v1 - v0))
            log_p = z.sub_(lse_c)
            if ge is None:
                dz = log_p.exp_().mul_(g_c)                     # g·p
            else:
                p = torch.exp(log_p, out=tiles.get(1, rows, v1 - v0))
                # g·p + g^H·p·(log p + H)
                dz = log_p.add_(entropy[n0:n1, None]).mul_(ge[n0:n1, None]).add_(g_c).mul_(p)
            dz.neg_()
            hit = torch.nonzero((labels_c >= v0) & (labels_c < v1)).squeeze(1)
            dz[hit, labels_c[hit] - v0] += g_c[hit, 0]          # + g at the label, in fp32
            w = weight[v0:v1].to(cdtype)
            if d_hidden is not None:
                d_hidden[n0:n1].addmm_(dz, w)
            if d_weight is not None:
                d_weight[v0:v1].addmm_(dz.T, h_raw)
            if d_bias is not None:
                d_bias[v0:v1] += dz.sum(0)
    return d_hidden, d_weight, d_bias
