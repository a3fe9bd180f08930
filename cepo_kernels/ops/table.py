"""One table from backend name to its ops: the only place that knows which module runs.

Both entries have the same three ops with the same signatures, so the autograd function and
the functional API dispatch through ``OPS[name]`` and never branch on the name:

    forward_stats(streams, weight, bias, labels, params, *, grad_hidden=False) -> LogitStats
    backward(hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent, params, *,
             need_hidden, need_weight, need_bias) -> (dH, dW, dB) fp32 or None each
    contrastive(streams, weight, bias, labels, params, *, cepo=None) -> ContrastStats

``grad_hidden_in_forward`` says whether ``forward_stats`` can also return ∂lp/∂h (the torch
backend's LoRA / frozen-head path). The Triton module is imported on first use only, so
``cepo_kernels`` works without triton.
"""

from __future__ import annotations

from . import torch_chunked
from .params import ContrastParams, ContrastStats, LogProbParams
from .stats import LogitStats


def _triton():
    from . import triton_launch

    return triton_launch


class TorchOps:
    """Chunked pure torch (``ops/torch_chunked.py``): any device, any float dtype."""

    name = "torch"
    grad_hidden_in_forward = True

    @staticmethod
    def forward_stats(streams, weight, bias, labels, params: LogProbParams, *,
                      grad_hidden: bool = False) -> LogitStats:
        return torch_chunked.forward_stats(list(streams), weight, bias, labels,
                                           temperature=params.temperature,
                                           ignore_index=params.ignore_index,
                                           with_entropy=params.with_entropy,
                                           grad_hidden=grad_hidden,
                                           chunk_tokens=params.chunk_tokens,
                                           chunk_vocab=params.chunk_vocab)

    @staticmethod
    def backward(hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent,
                 params: LogProbParams, *, need_hidden: bool, need_weight: bool,
                 need_bias: bool):
        return torch_chunked.backward(hidden, weight, bias, labels, lse, entropy, grad_lp,
                                      grad_ent, temperature=params.temperature,
                                      ignore_index=params.ignore_index, need_hidden=need_hidden,
                                      need_weight=need_weight, need_bias=need_bias,
                                      chunk_tokens=params.chunk_tokens,
                                      chunk_vocab=params.chunk_vocab)

    @staticmethod
    def contrastive(streams, weight, bias, labels, params: LogProbParams, *,
                    cepo: ContrastParams | None = None) -> ContrastStats:
        return torch_chunked.contrastive(list(streams), weight, bias, labels,
                                         temperature=params.temperature,
                                         ignore_index=params.ignore_index, cepo=cepo,
                                         chunk_tokens=params.chunk_tokens,
                                         chunk_vocab=params.chunk_vocab)


class TritonOps:
    """The fused Triton kernels (``ops/triton_launch.py``): CUDA, or CPU under
    TRITON_INTERPRET=1; float32/bfloat16/float16."""

    name = "triton"
    grad_hidden_in_forward = False

    @staticmethod
    def forward_stats(streams, weight, bias, labels, params: LogProbParams, *,
                      grad_hidden: bool = False) -> LogitStats:
        if grad_hidden:
            raise ValueError("the triton backend does not return ∂lp/∂h from its forward pass")
        return _triton().forward_stats(streams, weight, bias, labels,
                                       temperature=params.temperature,
                                       ignore_index=params.ignore_index,
                                       with_entropy=params.with_entropy)

    @staticmethod
    def backward(hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent,
                 params: LogProbParams, *, need_hidden: bool, need_weight: bool,
                 need_bias: bool):
        return _triton().backward(hidden, weight, bias, labels, lse, entropy, grad_lp, grad_ent,
                                  temperature=params.temperature,
                                  ignore_index=params.ignore_index, need_hidden=need_hidden,
                                  need_weight=need_weight, need_bias=need_bias)

    @staticmethod
    def contrastive(streams, weight, bias, labels, params: LogProbParams, *,
                    cepo: ContrastParams | None = None) -> ContrastStats:
        return _triton().contrastive(streams, weight, bias, labels,
                                     temperature=params.temperature,
                                     ignore_index=params.ignore_index, cepo=cepo)


OPS = {"torch": TorchOps, "triton": TritonOps}


def ops_for(params: LogProbParams):
    """The ops of the (already resolved) backend named in ``params``."""
    try:
        return OPS[params.backend]
    except KeyError:
        raise ValueError(f"no ops for backend {params.backend!r}; resolved backends are "
                         f"{tuple(OPS)}") from None
