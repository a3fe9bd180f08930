"""The differentiable op: per-token log-probs (and entropy) of one hidden stream.

One ``torch.autograd.Function`` serves both backends; ``params.backend`` picks their ops from
``ops.table.OPS``. Forward saves only (hidden, weight, bias, labels) and the per-token lse/entropy
(O(N)); backward recomputes the logits tile by tile.
"""

from __future__ import annotations

import torch

from .params import LogProbParams
from .table import ops_for

__all__ = ["LinearLogProbsFunction", "LogProbParams"]


class LinearLogProbsFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, labels [N] → (lp [N], entropy [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LogProbParams):
        # LoRA / frozen head on a backend whose forward can return ∂lp/∂h (torch): it comes out
        # of the forward pass (an N×D tensor), so the backward needs no second pass over the
        # vocabulary. With an entropy output, or when W or b need a gradient, the backward
        # recomputes the tiles.
        needs = ctx.needs_input_grad
        ops = ops_for(params)
        ctx.jacobian = (ops.grad_hidden_in_forward and needs[0] and not needs[1]
                        and not (bias is not None and needs[2]) and not params.with_entropy)
        stats = ops.forward_stats([hidden], weight, bias, labels, params,
                                  grad_hidden=ctx.jacobian)
        valid = labels != params.ignore_index
        lp = stats.logprobs(valid)[0]
        if stats.entropy is not None:
            ent = torch.where(valid, stats.entropy[0], torch.zeros_like(stats.entropy[0]))
        else:
            ent = torch.zeros_like(lp)
            ctx.mark_non_differentiable(ent)
        ctx.params, ctx.hidden_dtype = params, hidden.dtype
        if ctx.jacobian:
            ctx.save_for_backward(stats.grad_hidden[0], labels)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, stats.lse[0],
                                  None if stats.entropy is None else stats.entropy[0])
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        p: LogProbParams = ctx.params
        if ctx.jacobian:
            jac, labels = ctx.saved_tensors
            if grad_lp is None:
                return None, None, None, None, None
            g = torch.where(labels != p.ignore_index, grad_lp.to(jac.dtype), 0.0)
            return (g[:, None] * jac).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        if grad_lp is None:
            grad_lp = torch.zeros_like(lse)
        # autograd may hand us strided views (e.g. after masking): make them contiguous (rule 5)
        grad_lp = grad_lp.contiguous()
        if grad_ent is not None and p.with_entropy:
            grad_ent = grad_ent.contiguous()
        else:
            grad_ent = None
        dh, dw, db = ops_for(p).backward(hidden, weight, bias, labels, lse, entropy, grad_lp,
                                         grad_ent, p, need_hidden=need_h, need_weight=need_w,
                                         need_bias=need_b)
        return (None if dh is None else dh.to(hidden.dtype),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype),
                None, None)
