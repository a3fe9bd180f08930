"""Public functional API: validate once, resolve the backend, flatten, dispatch.

Argument order everywhere: ``hidden, weight, labels, ...``; options are keyword-only. Every
function returns a NamedTuple whose ``backend`` field names the implementation that ran.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import advantages as _adv
from .backend import resolve_backend
from .ops import params as _p
from .ops.autograd import LinearLogProbsFunction
from .ops.params import ContrastParams, LogProbParams
from .ops.table import ops_for
from .validation import (
    check_finite,
    check_label_values,
    check_linear_inputs,
    check_mask,
    check_same_device,
    check_same_dtype,
    check_streams,
    check_temperature,
    check_weights_hparams,
    index_labels,
)


class LogProbsOutput(NamedTuple):
    logprobs: torch.Tensor            # fp32, shaped like labels, 0 at ignored tokens
    entropy: Optional[torch.Tensor]   # fp32 per-token entropy when asked for, else None
    backend: str


class ContrastiveLogProbs(NamedTuple):
    policy: torch.Tensor  # log P_S(y_t)
    pos: torch.Tensor     # log P_T+(y_t)
    neg: torch.Tensor     # log P_T-(y_t); the log-mean-exp mixture when K > 1
    backend: str


class ContrastiveEvidence(NamedTuple):
    policy: torch.Tensor      # log P_S(y_t): the old log-probs of the PPO update
    pos: torch.Tensor
    neg: torch.Tensor
    delta: torch.Tensor         # Δ_t = pos − neg
    token_weight: torch.Tensor  # w_t = clip(exp(sign(A)Δ), 1 − ε_w, 1 + ε_w)
    advantages: torch.Tensor    # Â_t, 0 at ignored / masked tokens
    backend: str


class _Weighting(NamedTuple):
    """The CEPO inputs of ``contrastive_evidence``, as the caller gave them."""

    advantages: torch.Tensor    # per token (like labels) or per sequence
    mask: Optional[torch.Tensor]
    lam: float
    eps_w: float


def _prepare(hidden, weight, labels, bias, temperature, ignore_index, validate, name="hidden",
             mask=None):
    """Check every input; returns int64 labels (any integer dtype is accepted), set to
    ``ignore_index`` where ``mask`` is False (their ids are not checked)."""
    check_linear_inputs(hidden, weight, labels, bias, hidden_name=name)
    check_temperature(temperature)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = index_labels(labels)
    if mask is not None:
        mask = check_mask(mask, labels, "labels", validate=validate)
        labels = labels.masked_fill(~mask, ignore_index)
    if validate:
        check_label_values(labels, weight.shape[0], ignore_index)
        check_finite(name, hidden)
        check_finite("weight", weight)
        if bias is not None:
            check_finite("bias", bias)  # mask tokens with a large finite negative bias, not −inf
    return labels


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          mask: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          backend: str = "auto", validate: bool = True,
                          chunk_tokens: Optional[int] = _p.DEFAULT_CHUNK_TOKENS,
                          chunk_vocab: int = _p.DEFAULT_CHUNK_VOCAB) -> LogProbsOutput:
    """log softmax((h·Wᵀ + b)/τ)[y] per token, without materialising the logits.

    Args:
        hidden: (..., D) hidden states just before the lm_head (any float dtype).
        weight: (V, D) lm_head weight; no weight gradient is computed if it does not require grad.
        labels: (...) token ids of any integer dtype, ``ignore_index`` at positions to skip.
        mask: (...) like labels, bool or 0/1 of any dtype; positions where it is 0 are skipped
            like ``ignore_index`` (log-prob and entropy 0, no gradient).
        return_entropy: also return the (differentiable) per-token entropy.
        backend: "auto" | "triton" | "torch" (see ``cepo_kernels.backend``).
        validate: check label range and finiteness of ``hidden``, ``weight`` and ``bias`` (one
            host sync each).
        chunk_tokens, chunk_vocab: tile sizes of the torch backend.
    """
    labels = _prepare(hidden, weight, labels, bias, temperature, ignore_index, validate,
                      mask=mask)
    chosen = resolve_backend(backend, hidden.device, hidden.dtype)
    lead = labels.shape
    if labels.numel() == 0:
        empty = hidden.sum(-1).float() * 0.0  # keeps the graph connected for an empty batch
        return LogProbsOutput(empty, empty.clone() if return_entropy else None, chosen)
    params = LogProbParams(backend=chosen, temperature=float(temperature),
                           ignore_index=ignore_index, with_entropy=return_entropy,
                           chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    h = hidden.reshape(-1, hidden.shape[-1])
    lp, ent = LinearLogProbsFunction.apply(h, weight, bias, labels.reshape(-1), params)
    return LogProbsOutput(lp.view(lead), ent.view(lead) if return_entropy else None, chosen)


def _streams(policy_hidden, pos_hidden, neg_hidden, weight, labels, bias, temperature,
             ignore_index, validate):
    """Validate the three streams and return ([S tensors of (N, D)], K, flat labels)."""
    k = check_streams(policy_hidden, pos_hidden, neg_hidden)
    negs = [neg_hidden] if neg_hidden.shape == policy_hidden.shape else list(neg_hidden.unbind(0))
    check_same_dtype(("policy_hidden", "pos_hidden", "neg_hidden"),
                     (policy_hidden, pos_hidden, neg_hidden))
    labels = _prepare(policy_hidden, weight, labels, bias, temperature, ignore_index, validate,
                      name="policy_hidden")
    check_same_device(policy_hidden=policy_hidden, pos_hidden=pos_hidden, neg_hidden=neg_hidden)
    if validate:
        check_finite("pos_hidden", pos_hidden)
        check_finite("neg_hidden", neg_hidden)
    d = policy_hidden.shape[-1]
    streams = [policy_hidden.reshape(-1, d), pos_hidden.reshape(-1, d)]
    streams += [n.reshape(-1, d) for n in negs]
    return streams, k, labels.reshape(-1)


@torch.no_grad()
def contrastive_logprobs(policy_hidden, pos_hidden, neg_hidden, weight, labels, *, bias=None,
                         temperature: float = 1.0, ignore_index: int = -100,
                         backend: str = "auto", validate: bool = True,
                         chunk_tokens: Optional[int] = _p.DEFAULT_CHUNK_TOKENS,
                         chunk_vocab: int = _p.DEFAULT_CHUNK_VOCAB
                         ) -> ContrastiveLogProbs:
    """Log-probs of the student and both teachers for the same tokens, in ONE pass over W.

    ``neg_hidden`` is shaped like ``policy_hidden`` (K = 1) or (K, ...) for K wrong answers,
    whose log-probs are mixed as logmeanexp_k. No gradient.
    """
    ev = _contrastive(policy_hidden, pos_hidden, neg_hidden, weight, labels, bias=bias,
                      temperature=temperature, ignore_index=ignore_index, backend=backend,
                      validate=validate, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return ContrastiveLogProbs(ev.policy, ev.pos, ev.neg, ev.backend)


@torch.no_grad()
def contrastive_evidence(policy_hidden, pos_hidden, neg_hidden, weight, labels, advantages, *,
                         mask: Optional[torch.Tensor] = None, lam: float, eps_w: float,
                         bias=None, temperature: float = 1.0, ignore_index: int = -100,
                         backend: str = "auto", validate: bool = True,
                         chunk_tokens: Optional[int] = _p.DEFAULT_CHUNK_TOKENS,
                         chunk_vocab: int = _p.DEFAULT_CHUNK_VOCAB
                         ) -> ContrastiveEvidence:
    """The fused experience step: three log-prob streams plus Δ, w and Â
    (docs/METHOD.md, "Advantages").

    ``advantages`` are per token (shaped like ``labels``) or per sequence (labels.shape[0],).
    ``mask`` (like labels; bool or 0/1 of any dtype) marks the tokens whose Â counts; positions
    whose label is ``ignore_index`` are always excluded. Â is 0 outside. ``validate`` also checks
    that the advantages of the tokens that count are finite (and a non-bool mask holds 0/1).
    """
    check_weights_hparams(lam, eps_w)
    return _contrastive(policy_hidden, pos_hidden, neg_hidden, weight, labels, bias=bias,
                        temperature=temperature, ignore_index=ignore_index, backend=backend,
                        validate=validate, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                        weighting=_Weighting(advantages, mask, lam, eps_w))


def _contrastive(policy_hidden, pos_hidden, neg_hidden, weight, labels, *, bias, temperature,
                 ignore_index, backend, validate, chunk_tokens, chunk_vocab,
                 weighting=None) -> ContrastiveEvidence:
    """Both public three-stream functions; without ``weighting`` (log-probs only) Δ, w and Â
    are None."""
    streams, _, flat_labels = _streams(policy_hidden, pos_hidden, neg_hidden, weight, labels,
                                       bias, temperature, ignore_index, validate)
    chosen = resolve_backend(backend, policy_hidden.device, policy_hidden.dtype)
    lead = labels.shape
    cepo = None
    if weighting is not None:
        valid = flat_labels != ignore_index
        adv = _adv.broadcast_advantages(weighting.advantages.to(labels.device), labels)
        adv = adv.reshape(-1)
        if weighting.mask is not None:
            valid = valid & check_mask(weighting.mask, labels, "labels",
                                       validate=validate).reshape(-1)
        if validate:
            check_finite("advantages", adv, where=valid)
        cepo = ContrastParams(advantages=adv, valid=valid, lam=float(weighting.lam),
                              eps_w=float(weighting.eps_w))
    if flat_labels.numel() == 0:
        z = torch.zeros(lead, dtype=torch.float32, device=labels.device)
        return ContrastiveEvidence(z, z, z, z, z.clone() + 1.0, z, chosen)

    params = LogProbParams(backend=chosen, temperature=float(temperature),
                           ignore_index=ignore_index, chunk_tokens=chunk_tokens,
                           chunk_vocab=chunk_vocab)
    out = ops_for(params).contrastive(streams, weight, bias, flat_labels, params, cepo=cepo)
    shaped = [None if t is None else t.view(lead) for t in out]
    return ContrastiveEvidence(*shaped, chosen)


def cepo_advantages(advantages, pos_logprobs, neg_logprobs, mask, *, lam, eps_w, validate=True):
    """Re-exported from ``cepo_kernels.advantages`` (see there)."""
    return _adv.cepo_advantages(advantages, pos_logprobs, neg_logprobs, mask, lam=lam, eps_w=eps_w,
                                validate=validate)
