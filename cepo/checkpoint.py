"""Checkpoints: atomic, the last K kept, enough state to resume exactly.

Layout of a run directory::

    <output_dir>/config.yaml                 the resolved config of the run
    <output_dir>/metrics.jsonl               one line per step (cepo.metrics)
    <output_dir>/checkpoints/latest          text: the name of the newest complete checkpoint
    <output_dir>/checkpoints/step-000010/
        config.yaml                          the config (eval and merge read the base model here)
        adapter_model.safetensors, adapter_config.json     LoRA (peft format), or
        model.safetensors, config.json, processor files    full fine-tuning (loadable as a model)
        optimizer.pt                         AdamW state, whole, keyed by parameter name
        trainer_state.json                   step, λ, lr, world size, sharding
        rng/rank-<r>.pt                      python, numpy, torch (and CUDA) RNG states per process

Atomic: everything is written into ``checkpoints/.tmp-step-000010`` and then renamed into place;
``latest`` is rewritten through a temporary file and `os.replace`. A crash at any point leaves
either the previous checkpoint or the new one as ``latest``, never a half-written directory. The
λ and lr schedules and the data order derive from the step (`cepo.schedule`, `cepo.train`), so
the step is all the "scheduler state" there is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and _is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names; the newest complete one if the pointer is missing/stale."""
    root = checkpoint_dir(run_dir)
    try:
        named = root / (root / LATEST).read_text().strip()
        if _NAME.match(named.name) and _is_complete(named):
            return named
    except OSError:
        pass
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a run directory, or a run's ``checkpoints`` folder."""
    path = Path(path)
    if _is_complete(path):
        return path
    for run_dir in (path, path.parent) if path.name == "checkpoints" else (path,):
        found = latest_checkpoint(run_dir)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no checkpoint (expected step-*/trainer_state.json)")


# --------------------------------------------------------------------------- saving


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The temporary directory a checkpoint is written into (same on every process)."""
    return checkpoint_dir(run_dir) / f".tmp-{step_name(step)}"


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """Main process: a fresh, empty staging directory for `step`."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
    (tmp / "rng").mkdir(parents=True)
    return tmp


def save_model(model: torch.nn.Module, directory: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter (peft) or full weights, as safetensors, in Hugging Face layout. `state_dict`:
    the weights to write instead of the model's own (gathered from FSDP shards)."""
    if state_dict is None:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def save_rng(directory: Path, rank: int) -> None:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, directory / "rng" / f"rank-{rank}.pt")


def save_optimizer(state: dict[str, Any], directory: Path) -> None:
    """An optimizer state keyed by parameter name (`named_optimizer_state`)."""
    torch.save(state, directory / "optimizer.pt")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (itself when not wrapped)."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_param_names(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order, as `policy` (unwrapped from DDP)
    names them: the keys of torch.distributed.checkpoint's optimizer state dicts."""
    module = getattr(policy, "module", policy)  # DDP
    name_of = {id(p): name for name, p in module.named_parameters()}
    groups = unwrap_optimizer(optimizer).param_groups
    return [name_of[id(p)] for group in groups for p in group["params"]]


def named_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's index-keyed optimizer state dict -> keyed by parameter name (one format for DDP
    and FSDP checkpoints, so either resumes under the other)."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                         for g in state["param_groups"]],
    }


def indexed_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `named_optimizer_state`, for `Optimizer.load_state_dict`."""
    index = {name: i for i, name in enumerate(names)}
    groups = [g["params"] for g in state["param_groups"]]
    missing = sorted({n for g in groups for n in g} - set(index))
    if missing:
        raise RuntimeError(f"optimizer state names parameters this model does not train: "
                           f"{missing[:3]}")
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                         for g in state["param_groups"]],
    }


def commit(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Main process, after every process has written its part: make `step` the latest.

    Writes trainer_state.json last (it marks a checkpoint complete), syncs the files, renames the
    staging directory into place, points ``latest`` at it and deletes all but the last
    `keep_last` checkpoints.
    """
    tmp = staging_dir(run_dir, step)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_tree(tmp)
    final = checkpoint_dir(run_dir) / step_name(step)
    if final.exists():  # the same step saved again (a resumed run re-running it)
        trash = final.with_name(f".old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    pointer = checkpoint_dir(run_dir) / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, checkpoint_dir(run_dir) / LATEST)
    _fsync_dir(checkpoint_dir(run_dir))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load adapter or full weights saved by `save_model` into `model` (same structure)."""
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: keys not in the model: {unexpected[:5]}")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"}  # dropped by save_pretrained when tied to the embeddings
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"{path}: weights do not match the model (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )


def load_optimizer(path: Path) -> dict[str, Any]:
    """The saved optimizer state (keyed by parameter name)."""
    file = path / "optimizer.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no optimizer state (saved with save_optimizer=false?)")
    return torch.load(file, map_location="cpu", weights_only=False)


def load_rng(path: Path, rank: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for `rank`."""
    file = path / "rng" / f"rank-{rank}.pt"
    if not file.is_file():
        return False
    state = torch.load(file, map_location="cpu", weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True
