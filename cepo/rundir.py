"""Paths inside a run directory: every file the trainer reads or writes stays inside it.

A run directory can be shared, copied or tampered with, so nothing below it is trusted: a
symbolic link (``checkpoints/.tmp-step-*`` pointing elsewhere, a linked ``metrics.jsonl`` or
checkpoint) or a name that climbs out (``latest`` holding ``../../other/...``) is refused with an
`UnsafePathError` naming the path, instead of being followed. The run directory itself may be a
link (e.g. ``runs -> /scratch/runs``): it is resolved once and everything is checked below it.

`fault_point` is the hook the crash tests use to kill the trainer at named moments.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class UnsafePathError(RuntimeError):
    """A path inside a run directory that is a link or leads outside it."""


def inside(run_dir: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """``run_dir / parts``, refused if any existing component below `run_dir` is a symbolic link
    or a part would leave `run_dir` (``..``, an absolute path). The path need not exist."""
    root = Path(run_dir)
    path = root
    for part in Path(*parts).parts if parts else ():
        if part in (".", "..") or Path(part).is_absolute():
            raise UnsafePathError(f"{Path(run_dir, *parts)}: {part!r} leaves the run directory "
                                  f"{root}; refusing it")
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(
                f"{path}: is a symbolic link (to {os.readlink(path)}); cepo does not follow links "
                f"inside a run directory ({root}). Remove it and retry.")
    return path


def check_tree(run_dir: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`inside`, and refused as well if anything under that directory is a symbolic link."""
    directory = inside(run_dir, *parts)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            if Path(root, name).is_symlink():
                raise UnsafePathError(f"{Path(root, name)}: is a symbolic link inside a "
                                      "checkpoint; cepo does not follow links in a run directory")
    return directory


def fault_point(name: str, step: int) -> None:
    """Crash-test hook: ``CEPO_FAULT_AT=name:step`` kills this process (SIGKILL, like a power
    cut or the OOM killer) when it reaches point `name` of step `step`. Unset: does nothing."""
    if os.environ.get("CEPO_FAULT_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
