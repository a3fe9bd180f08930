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
        trainer_state.json                   step, λ, lr, world size, sharding, the lr schedule's
                                             length, and every other file's size and SHA-256
        rng/rank-<r>.pt                      python, numpy, torch (and CUDA) RNG states per process

Atomic: everything is written into ``checkpoints/.tmp-step-000010`` and then renamed into place;
``latest`` is rewritten through a temporary file and `os.replace`. A crash at any point leaves
either the previous checkpoint or the new one as ``latest``, never a half-written directory. The
λ and lr schedules and the data order derive from the step (`cepo.schedule`, `cepo.train`), so
the step (and the schedule's length) is all the "scheduler state" there is.

Verified: trainer_state.json records each file's size and SHA-256; a checkpoint is checked
against it after it is committed (before older ones are deleted) and before it is resumed,
evaluated or merged. A damaged one is skipped for the newest intact one, with a warning naming
the bad file. Nothing is unpickled beyond plain tensors and containers (``weights_only=True``),
and no path may leave the run directory (`cepo.rundir`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cepo.integrity import CheckpointError, check_safetensors, manifest, verify_files
from cepo.rundir import UnsafePathError, check_tree, fault_point, inside

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint against the sizes and SHA-256 its trainer_state.json records;
    returns that state. `CheckpointError` names the first bad file and why."""
    return verify_files(path, STATE, step_of(path))


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return inside(run_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [inside(root, p.name) for p in root.iterdir() if _NAME.match(p.name)]
    found = [p for p in found if _is_complete(p)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _is_complete(path: Path) -> bool:
    return (path / STATE).is_file()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names; the newest complete one if the pointer is missing/stale.
    A pointer that is not a plain checkpoint name (``../../other/...``) is refused."""
    root = checkpoint_dir(run_dir)
    pointer = inside(root, LATEST)
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _NAME.match(name):
            raise UnsafePathError(f"{pointer}: holds {name[:80]!r}, not the name of a checkpoint "
                                  "of this run (step-NNNNNN); refusing to follow it")
        if _is_complete(inside(root, name)):
            return inside(root, name)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: the one ``latest`` names, else older ones, newest first.

    A damaged one (`verify`) is skipped with a warning naming the bad file; None when the run has
    no checkpoint; `CheckpointError` listing what is wrong with each when none is intact.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [p for p in reversed(list_checkpoints(run_dir)) if step_of(p) < step_of(newest)]
    problems = []
    for path in [newest, *candidates]:
        try:
            verify(path)
        except (CheckpointError, UnsafePathError) as err:
            problems.append(str(err))
            logger.warning("checkpoint %s is damaged, skipped: %s", path.name, err)
            continue
        if problems:
            logger.warning("falling back to %s, the newest intact checkpoint", path)
        return path
    raise CheckpointError(f"{checkpoint_dir(run_dir)}: no intact checkpoint to resume from:\n  "
                          + "\n  ".join(problems))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """An intact checkpoint directory from itself, a run directory, or a run's ``checkpoints``
    folder (`resume_point`: a damaged newest one falls back to the previous intact one)."""
    path = Path(path)
    if _is_complete(path) and _NAME.match(path.name):
        verify(path)
        return path
    for run_dir in (path, path.parent) if path.name == "checkpoints" else (path,):
        found = resume_point(run_dir)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no checkpoint (expected step-*/trainer_state.json)")


# --------------------------------------------------------------------------- saving


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The temporary directory a checkpoint is written into (same on every process)."""
    return inside(checkpoint_dir(run_dir), f".tmp-{step_name(step)}")


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """Main process: a fresh, empty staging directory for `step`."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
    (tmp / "rng").mkdir(parents=True)
    return tmp


def _writing(file: Path, err: Exception) -> CheckpointError:
    """A write error that names the file (and says so when the disk is full)."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    why = "No space left on device" if full else str(err)
    return CheckpointError(f"{file}: could not write the checkpoint file: {why}")


class _KeepsWriteError:
    """The file torch.save writes through: keeps the OSError of a failed write, which torch
    itself reports only as 'unexpected pos 64 vs 0'."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, file: Path) -> None:
    """torch.save, synced to disk; a failed write (a full disk) raises `CheckpointError`
    naming the file and the cause."""
    try:
        with open(file, "wb") as f:
            out = _KeepsWriteError(f)
            try:
                torch.save(obj, out)
            except RuntimeError as err:
                raise (out.error or err) from None
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        raise _writing(file, err) from err


def save_model(model: torch.nn.Module, directory: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter (peft) or full weights, as safetensors, in Hugging Face layout. `state_dict`:
    the weights to write instead of the model's own (gathered from FSDP shards)."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    card = directory / "README.md"
    had_card = card.exists()
    try:
        model.save_pretrained(directory, safe_serialization=True, **extra)
    except (OSError, RuntimeError) as err:
        raise _writing(directory, err) from err
    if not had_card:  # peft writes an empty model-card template: noise in every checkpoint
        card.unlink(missing_ok=True)


def save_rng(directory: Path, rank: int) -> None:
    """This process's RNG states as plain tensors and numbers (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None | float)
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    _torch_save(state, directory / "rng" / f"rank-{rank}.pt")


def save_optimizer(state: dict[str, Any], directory: Path) -> None:
    """An optimizer state keyed by parameter name (`named_optimizer_state`)."""
    _torch_save(state, directory / "optimizer.pt")


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

    Records every file's size and SHA-256 in trainer_state.json, written last (it marks a
    checkpoint complete), syncs the files, renames the staging directory into place, verifies
    it as read back, points ``latest`` at it and only then deletes older checkpoints: the last
    `keep_last` up to `step` stay, and any later ones (left by a run that was resumed from an
    earlier step) go.
    """
    tmp = check_tree(run_dir, "checkpoints", staging_dir(run_dir, step).name)
    state_file = tmp / STATE
    try:
        with open(state_file, "w") as f:
            f.write(json.dumps({"step": step, **state, "files": manifest(tmp, skip=STATE)},
                               indent=2))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _writing(state_file, err) from err
    _fsync_tree(tmp)
    final = inside(checkpoint_dir(run_dir), step_name(step))
    if final.exists():  # the same step saved again (a resumed run re-running it)
        trash = inside(checkpoint_dir(run_dir), f".old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fault_point("mid_commit", step)
    verify(final)
    pointer = inside(checkpoint_dir(run_dir), f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, inside(checkpoint_dir(run_dir), LATEST))
    _fsync_dir(checkpoint_dir(run_dir))
    earlier = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
    later = [p for p in list_checkpoints(run_dir) if step_of(p) > step]
    for old in earlier[: max(0, len(earlier) - (keep_last - 1))] + later:
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
    """trainer_state.json of a checkpoint (`CheckpointError` naming it when unreadable)."""
    file = path / STATE
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable, not valid JSON (truncated or damaged?): "
                              f"{err}") from None


def _torch_load(file: Path) -> Any:
    """A torch file of tensors and plain containers only: ``weights_only=True`` refuses
    anything that would run code while unpickling."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{file}: refused: it holds a Python object{what} beyond tensors "
                              "and plain values, and loading it could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file}: unreadable (truncated or damaged?): {first}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load adapter or full weights saved by `save_model` into `model` (same structure)."""
    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, _load_safetensors(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: keys not in the model: {unexpected[:5]}")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_load_safetensors(file))
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
    return _torch_load(file)


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(file)
    try:
        return load_file(file)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file: {err}") from None


def load_rng(path: Path, rank: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for `rank`."""
    file = path / "rng" / f"rank-{rank}.pt"
    if not file.is_file():
        return False
    state = _torch_load(file)
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{file}: not an RNG state saved by cepo: {err!r}") from None
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True
