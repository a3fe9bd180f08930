"""Every implementation the benchmark compares, defined once, as functions of the same inputs.

Shapes: N tokens, D hidden, V vocabulary; S = 3 hidden streams in the role order (policy, pos, neg)
sharing the lm_head weight W [V, D] and the labels [N].

Workloads:
    scoring    no grad: log-probs of the policy and both teachers, then Δ and Â
               (docs/METHOD.md, "Advantages").
    update     policy log-probs forward + backward with a per-token upstream gradient, d/d hidden.
    update_w   the same, also d/d weight.

An implementation is a name, a per-stream differentiable log-prob function ``(hidden, weight,
labels) -> [N] fp32`` and a check ``available(device) -> (ok, reason)``. Implementations without a
multi-stream entry point score the three streams with three calls (what a user would do);
``ours`` scores them in one call. ``floor`` is the bare matmul (and its backward): what no fused
kernel can beat. Tests (tests/test_bench_smoke.py) check every available implementation against
``naive`` so a baseline cannot silently drift.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch

WORKLOADS = ("scoring", "update", "update_w")
NUM_STREAMS = 3  # policy, pos, neg
# docs/METHOD.md, "Teachers" paper values; only the O(N) epilogue depends on them
LAM, EPS_W = 0.5, 0.5


# --------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class Inputs:
    """One benchmark case's tensors; every implementation gets exactly these."""

    policy: torch.Tensor  # [N, D] student hidden states
    pos: torch.Tensor  # [N, D] correct-answer teacher
    neg: torch.Tensor  # [N, D] wrong-answer teacher
    weight: torch.Tensor  # [V, D] lm_head
    labels: torch.Tensor  # [N] int64, all valid
    advantages: torch.Tensor  # [N] fp32, A_i broadcast per token
    grad_out: torch.Tensor  # [N] fp32, rand + 0.5: a uniform upstream grad hides bugs (Liger #968)
    lam: float = LAM
    eps_w: float = EPS_W
    extra: dict = field(default_factory=dict)  # implementation options, e.g. ours' chunk sizes

    @property
    def n(self) -> int:
        return self.labels.shape[0]


def make_inputs(n: int, d: int, v: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Random inputs with realistic logit spread (std ≈ 2) and teachers close to the policy."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    policy = torch.randn(n, d, generator=g)
    pos = policy + 0.3 * torch.randn(n, d, generator=g)  # teachers see the same response tokens
    neg = policy + 0.3 * torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (2.0 / math.sqrt(d))
    labels = torch.randint(0, v, (n,), generator=g)
    advantages = torch.randn(n, generator=g)
    grad_out = torch.rand(n, generator=g) + 0.5
    to = functools.partial(torch.Tensor.to, device=device)
    return Inputs(to(policy, dtype=dtype), to(pos, dtype=dtype), to(neg, dtype=dtype),
                  to(weight, dtype=dtype), to(labels), to(advantages), to(grad_out))


def slice_inputs(inp: Inputs, n: int) -> Inputs:
    """The first ``n`` tokens of ``inp`` (same weight): the warm-up / correctness probe."""
    return replace(inp, policy=inp.policy[:n], pos=inp.pos[:n], neg=inp.neg[:n],
                   labels=inp.labels[:n], advantages=inp.advantages[:n],
                   grad_out=inp.grad_out[:n])


class Scored(NamedTuple):
    """Result of the scoring workload; every field [N] fp32 (None for the floor)."""

    policy: Optional[torch.Tensor]
    pos: Optional[torch.Tensor]
    neg: Optional[torch.Tensor]
    delta: Optional[torch.Tensor]
    advantages: Optional[torch.Tensor]


def evidence(pos: torch.Tensor, neg: torch.Tensor, adv: torch.Tensor, lam: float,
             eps_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ and Â from three separately computed log-prob streams, as a user writes it
    (docs/METHOD.md, "Advantages").

    O(N); the same for every per-stream implementation so only the log-prob part differs. The
    formula is ``cepo_kernels.reference.cepo_advantages`` (the test oracle), not a copy of it.
    """
    from cepo_kernels import reference

    every = torch.ones_like(adv, dtype=torch.bool)
    return pos - neg, reference.cepo_advantages(adv, pos, neg, every, lam=lam, eps_w=eps_w)


# --------------------------------------------------------------------------------------------
# Per-stream log-prob functions: (hidden [N, D], weight [V, D], labels [N]) -> [N] fp32


def naive_logprobs(hidden, weight, labels):
    """The plain three lines a user writes: full logits, log_softmax in fp32, gather."""
    logits = hidden @ weight.T  # [N, V]
    logp = logits.float().log_softmax(-1)  # [N, V]
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@functools.lru_cache(maxsize=1)
def trl_vocab_chunk() -> int:
    """The vocabulary tile TRL's GRPO trainer passes: ``_CHUNKED_LOGPROB_CHUNK_SIZE``.

    Read from TRL's source rather than imported: importing ``trl.trainer.utils`` costs ~8 s per
    benchmark subprocess (accelerate, transformers trainer); ``trl.kernels`` costs ~1 s.
    """
    spec = importlib.util.find_spec("trl.trainer.utils")
    if spec is None or spec.origin is None:
        raise ImportError("trl.trainer.utils not found")
    with open(spec.origin, encoding="utf-8") as f:
        m = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", f.read(), re.M)
    if m is None:
        raise ImportError("_CHUNKED_LOGPROB_CHUNK_SIZE not found in trl.trainer.utils")
    return int(m.group(1))


def trl_logprobs(hidden, weight, labels):
    """TRL's ``_ChunkedLogProbFunction`` (trl.kernels), called the way its GRPO trainer calls it."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # outputs=("log_probs",) as for TRL's reference model: no entropy, so equal work to the others
    lp, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, trl_vocab_chunk(),
                                          None, 1.0, ("log_probs",))
    return lp


def liger_chunked_logprobs(hidden, weight, labels):
    """Liger's pure-torch seq × vocab chunked selective log-prob (its GRPO loss uses it)."""
    from liger_kernel.chunked_loss import fused_linear_ppo as ppo

    return ppo._ChunkedSelectiveLogProbFunction.apply(
        hidden, weight, labels, None, 1.0, ppo._SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE)


def liger_flce_logprobs(hidden, weight, labels):
    """``LigerFusedLinearCrossEntropyLoss(reduction="none")``: −CE per token (weight first!)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, labels).float()


def _cce(impl: str):
    def logprobs(hidden, weight, labels):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl).float()

    logprobs.__doc__ = f"cut-cross-entropy ``linear_cross_entropy(impl={impl!r})``, −CE per token."
    return logprobs


def ours_logprobs(hidden, weight, labels, **options):
    """``cepo_kernels.fused_linear_logprobs`` with the backend a user gets (``"auto"``)."""
    from cepo_kernels import fused_linear_logprobs

    return fused_linear_logprobs(hidden, weight, labels, **options).logprobs


# --------------------------------------------------------------------------------------------
# Scoring


def score_per_stream(logprobs: Callable, inp: Inputs) -> Scored:
    """Three calls (policy, pos, neg), then the epilogue: what a user of a one-stream API writes."""
    lps = [logprobs(h, inp.weight, inp.labels) for h in (inp.policy, inp.pos, inp.neg)]
    delta, a_hat = evidence(lps[1], lps[2], inp.advantages, inp.lam, inp.eps_w)
    return Scored(*lps, delta, a_hat)


def ours_score(inp: Inputs) -> Scored:
    """``cepo_kernels.contrastive_evidence``: one pass over W for all three streams + Δ, Â."""
    from cepo_kernels import contrastive_evidence

    ev = contrastive_evidence(inp.policy, inp.pos, inp.neg, inp.weight, inp.labels,
                              inp.advantages, lam=inp.lam, eps_w=inp.eps_w, **inp.extra)
    return Scored(ev.policy, ev.pos, ev.neg, ev.delta, ev.advantages)


def floor_score(inp: Inputs) -> Scored:
    """The bare projection of the three streams, nothing else."""
    for h in (inp.policy, inp.pos, inp.neg):
        h @ inp.weight.T  # [N, V], dropped at once
    return Scored(None, None, None, None, None)


def floor_update(inp: Inputs, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """The projection and its backward GEMMs (d hidden, and d weight if it requires grad).

    The logits stand in for their own upstream gradient, so no second [N, V] buffer is made.
    """
    z = hidden @ weight.T  # [N, V]
    z.backward(z.detach())


# --------------------------------------------------------------------------------------------
# Availability


def _module_check(module: str, what: str) -> tuple[bool, str]:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False, f"{what} is not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is a reason, not a crash
        return False, f"import {module} failed: {type(exc).__name__}: {exc}"
    return True, ""


def _needs_cuda(what: str) -> Callable[[torch.device], tuple[bool, str]]:
    def check(device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, (f"{what} launches Triton GPU kernels: needs a CUDA device "
                           "(on CPU triton raises 'RuntimeError: 0 active drivers')")
        return True, ""

    return check


def _all(*checks) -> Callable[[torch.device], tuple[bool, str]]:
    def check(device: torch.device) -> tuple[bool, str]:
        for c in checks:
            ok, why = c(device)
            if not ok:
                return ok, why
        return True, ""

    return check


def _importable(module: str, what: str):
    return lambda device: _module_check(module, what)


def _ours_check(device: torch.device) -> tuple[bool, str]:
    ok, why = _module_check("cepo_kernels", "cepo_kernels")
    if not ok:
        return ok, why
    import cepo_kernels

    missing = [f for f in ("fused_linear_logprobs", "contrastive_evidence")
               if not hasattr(cepo_kernels, f)]
    if missing:
        return False, f"cepo_kernels has no {', '.join(missing)} yet"
    return True, ""


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Impl:
    """One implementation; ``score`` defaults to three ``logprobs`` calls + the epilogue."""

    name: str
    summary: str
    logprobs: Optional[Callable]  # None only for the floor
    available: Callable[[torch.device], tuple[bool, str]] = lambda device: (True, "")
    score_fn: Optional[Callable[[Inputs], Scored]] = None

    def score(self, inp: Inputs) -> Scored:
        if self.score_fn is not None:
            return self.score_fn(inp)
        return score_per_stream(self.logprobs, inp)

    def update(self, inp: Inputs, hidden: torch.Tensor,
               weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward + backward of the policy log-probs; returns them (None for the floor)."""
        if self.logprobs is None:
            floor_update(inp, hidden, weight)
            return None
        lp = self.logprobs(hidden, weight, inp.labels, **self._options(inp))
        lp.backward(inp.grad_out)
        return lp

    def _options(self, inp: Inputs) -> dict:
        return inp.extra if self.name == "ours" else {}


IMPLS: dict[str, Impl] = {i.name: i for i in (
    Impl("naive", "h @ Wᵀ, log_softmax in fp32, gather (materialises the N×V logits); 3 calls",
         naive_logprobs),
    Impl("trl", "TRL 1.x _ChunkedLogProbFunction as its GRPO trainer calls it (4096-token × "
         "32768-vocab tiles; Triton fold on GPU, torch on CPU); 3 calls",
         trl_logprobs, _importable("trl.kernels.chunked_logprob", "trl")),
    Impl("liger_chunked", "Liger _ChunkedSelectiveLogProbFunction, pure torch (2048-token × "
         "4096-vocab tiles; what its chunked GRPO loss uses); 3 calls",
         liger_chunked_logprobs,
         _importable("liger_kernel.chunked_loss.fused_linear_ppo", "liger-kernel")),
    Impl("liger_flce", "Liger LigerFusedLinearCrossEntropyLoss(reduction='none'), −loss; 3 calls",
         liger_flce_logprobs,
         _all(_needs_cuda("Liger FLCE"),
              _importable("liger_kernel.transformers", "liger-kernel"))),
    Impl("cce", "cut-cross-entropy linear_cross_entropy(impl='cce', reduction='none'), −loss "
         "(default gradient filtering); 3 calls", _cce("cce"),
         _all(_needs_cuda("cut-cross-entropy impl='cce'"),
              _importable("cut_cross_entropy", "cut-cross-entropy"))),
    Impl("cce_compile", "cut-cross-entropy impl='torch_compile': torch.compile of h @ Wᵀ + "
         "cross_entropy (still materialises the logits); 3 calls",
         _cce("torch_compile"), _importable("cut_cross_entropy", "cut-cross-entropy")),
    Impl("ours", "cepo_kernels: contrastive_evidence (all 3 streams + Δ, Â in one call) / "
         "fused_linear_logprobs, backend='auto'", ours_logprobs, _ours_check, ours_score),
    Impl("floor", "bare h @ Wᵀ (and its backward GEMMs), nothing else: the bound for any fused "
         "kernel", None, score_fn=floor_score),
)}


def get(name: str) -> Impl:
    """The implementation called ``name``; raises ``KeyError`` listing the known names."""
    try:
        return IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}") from None
