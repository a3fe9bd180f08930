"""Build-once directories (the tiny models): written to a temporary sibling, then renamed.

Concurrent processes (trainer ranks, test workers) therefore never load a half-written
checkpoint, and a directory whose stamp matches the recipe is reused instead of rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where built tiny models (and other build-once directories) live: ``$CEPO_CACHE_DIR``,
    default ``~/.cache/cepo``."""
    return Path(os.environ.get("CEPO_CACHE_DIR", "~/.cache/cepo")).expanduser()


def read_stamp(directory: Path, stamp_name: str) -> dict | None:
    try:
        return json.loads((directory / stamp_name).read_text())
    except (OSError, ValueError):
        return None


def build_once(target: Path, stamp: dict, stamp_name: str, write: Callable[[Path], None], *,
               overwrite: bool = False) -> Path:
    """Return ``target``, first building it with ``write(staging_dir)`` unless its stamp matches."""
    if not overwrite and read_stamp(target, stamp_name) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        (staging / stamp_name).write_text(json.dumps(stamp))
        if target.exists():
            if not overwrite and read_stamp(target, stamp_name) == stamp:  # another process won
                return target
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
