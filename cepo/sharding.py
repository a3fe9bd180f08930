"""FSDP2 sharding of the actor (``--sharding fsdp``): parameters, gradients and AdamW state split
over the processes, for full fine-tuning of the 4B model (or 2B on smaller GPUs).

Why a few lines of our own instead of accelerate's FSDP plugin:

* the fused kernels read the lm_head weight directly (they never call ``lm_head.forward``), so the
  lm_head must sit in the root unit, whose parameters the root's forward gathers: only the
  transformer blocks (``_no_split_modules``) become their own units, the rest is the root;
* rollouts (HF ``generate``) and teacher scoring need whole weights for many forwards in a row:
  `full_weights` gathers every unit once for the phase instead of once per layer per token;
* accelerate enables FSDP on accelerators only, while this path must be testable with two CPU
  processes (gloo). accelerate still launches the processes and all-reduces the metrics.

Checkpoints stay one format: `gather_weights` / `gather_optimizer` build full (unsharded) state
dicts on the main process, so a checkpoint saved sharded loads into one process and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cepo.checkpoint import unwrap_optimizer
from cepo.models import unwrap_model


def _fully_shard():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        raise RuntimeError(
            f"sharding=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.7); "
            f"this is torch {torch.__version__}"
        ) from None
    if not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise RuntimeError(f"sharding=fsdp needs torch >= 2.7; this is torch {torch.__version__}")
    return fully_shard


def is_sharded(module: torch.nn.Module) -> bool:
    return bool(units(module))


def units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units under `module` (the root last)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)][::-1]


def shard(policy: torch.nn.Module, model: torch.nn.Module,
          compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `policy` (the module whose forward is the loss) in place: one FSDP unit per
    transformer block of `model` (text decoder layers, vision blocks), the rest in the root.

    `compute_dtype` (mixed precision): weights are gathered in it for every forward, rollouts
    included, while the shards, gradients reduced across processes and AdamW stay in the
    parameters' own dtype (fp32 for full fine-tuning). Needs an initialised process group.
    Build the optimizer *after* this (it must hold the sharded parameters).
    """
    fully_shard = _fully_shard()
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # The root's forward takes the loss inputs (old log-probs, Â): never cast them to bf16.
    root_precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("sharding=fsdp needs several processes (accelerate launch / torchrun)")
    block_types = set(getattr(unwrap_model(model), "_no_split_modules", None) or ())
    blocks = [m for m in policy.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ValueError(
            f"sharding=fsdp: {type(unwrap_model(model)).__name__} names no transformer block "
            "classes (_no_split_modules) to shard"
        )
    for block in reversed(blocks):  # children before parents
        fully_shard(block, reshard_after_forward=True, mp_policy=precision)
    # the root: embeddings, final norm, lm_head, vision merger
    fully_shard(policy, mp_policy=root_precision)
    # FSDP takes the first module whose forward runs as the root; rollouts call the inner model
    # directly, so run the root's forward once now (PolicyLoss.forward() with no inputs: no-op).
    # The root keeps its weights gathered after a forward: reshard, so that the module holds the
    # sharded parameters the optimizer must be built from.
    with torch.no_grad():
        policy()
    policy.reshard()
    return policy


@contextlib.contextmanager
def full_weights(policy: torch.nn.Module) -> Iterator[None]:
    """Whole parameters on every process for a phase of many no-grad forwards (rollouts,
    teacher scoring, validation): each unit is gathered once and kept until the phase ends.
    A no-op when `policy` is not sharded."""
    found = units(policy)
    if not found:
        yield
        return
    for unit in found:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in found:
        unit.unshard()
    try:
        yield
    finally:
        for unit in found:
            unit.reshard()
        for unit in found:  # blocks reshard after each training forward; the root keeps its own
            unit.set_reshard_after_forward(unit is not policy, recurse=False)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_weights(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full state dict of `model` on the main process's CPU (empty elsewhere); every process
    must call it. `trainable_only`: the LoRA adapters only (what a LoRA checkpoint saves)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(
        model, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only)
    )
    for name in _tied_output_names(model):  # save_pretrained leaves a tied lm_head out: so do we
        state.pop(f"{name}.weight", None)
    return state


def _tied_output_names(model: torch.nn.Module) -> list[str]:
    """Module names of the output embedding when it shares its weight with the input one."""
    base = unwrap_model(model)
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return []
    return [name for name, module in model.named_modules() if module is outputs]


def gather_optimizer(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full AdamW state (keyed by parameter name) on the main process; call on every process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(policy, unwrap_optimizer(optimizer),
                                    options=_options(cpu_offload=True))


def scatter_optimizer(policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      state: dict) -> None:
    """Load a `gather_optimizer` state into the shards: the main process passes it, the others
    ``{}``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(policy, unwrap_optimizer(optimizer), state,
                             options=_options(broadcast_from_rank0=True))
