"""Integrity of checkpoint files: sizes and SHA-256 recorded at save, checked before use.

A checkpoint's state file lists every other file with its size and SHA-256 (`manifest`);
`verify_files` checks them, so flipped bytes or a truncated file are caught by name instead of
loading garbage. Safetensors files are also checked against their own header (`check_safetensors`)
before they are hashed, which catches a write cut short by a full disk. `first_nonfinite` guards
against saving NaN/inf weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

from cepo.rundir import check_tree, inside


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, damaged, unsafe to load or could not be written."""


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(directory: Path, skip: str) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `directory` but `skip`, by relative path.
    Safetensors files are checked for truncation first (their header gives the size)."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != skip):
        if file.suffix == ".safetensors":
            check_safetensors(file)
        files[file.relative_to(directory).as_posix()] = {"bytes": file.stat().st_size,
                                                         "sha256": sha256(file)}
    return files


def check_safetensors(file: Path) -> None:
    """Raise `CheckpointError` if `file` is not a whole safetensors file (header + data)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({size} bytes; "
                              f"truncated or damaged?): {err}") from None
    if 8 + length + end != size:
        raise CheckpointError(f"{file}: truncated or damaged: {size} bytes, its header "
                              f"describes {8 + length + end}")


def verify_files(path: Path, state_name: str, step: int) -> dict[str, Any]:
    """Check checkpoint `path` of `step` against the sizes and SHA-256 its state file records;
    returns that state. `CheckpointError` names the first bad file and why."""
    check_tree(path.parent, path.name)
    state_file = path / state_name
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{state_file}: unreadable, not valid JSON (truncated or "
                              f"damaged?): {err}") from None
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict) or state.get("step") != step:
        raise CheckpointError(f"{state_file}: no file checksums or a step other than {step} "
                              "(damaged, or written by an older cepo)")
    for name, entry in files.items():
        file = inside(path, *Path(name).parts)
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{file}: {size} bytes, the checkpoint recorded "
                                  f"{entry.get('bytes')} (truncated or damaged)")
        if sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{file}: SHA-256 differs from the one the checkpoint "
                                  "recorded (damaged)")
    return state


def first_nonfinite(tensors) -> str | None:
    """The name of the first (name, tensor) pair holding a NaN or inf; None if all finite."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
