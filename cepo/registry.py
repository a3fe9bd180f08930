"""Names the core resolves without knowing who provides them: model names (``tiny-warm``) and
dataset names (``synthetic``).

The offline kit (`cepo.offline`) sits above the core and registers its names here when it is
imported, so `cepo.models` and `cepo.data` never import it (no import circle, nothing upward).
Entry points (`cepo.train`, `cepo.eval`, the examples, the benches) import `cepo.offline`; a
library user who wants ``"tiny-warm"`` does too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

_MODELS: dict[str, Callable[[], str | Path]] = {}
_DATASETS: dict[str, Callable[..., list]] = {}


def register_model(name: str, build: Callable[[], str | Path]) -> None:
    """`name` as a model name means the directory `build()` returns (built on first use)."""
    _MODELS[name] = build


def register_dataset(name: str, load: Callable[..., list]) -> None:
    """`name` as a data source means ``load(split, limit=..., seed=...)`` (a list of examples)."""
    _DATASETS[name] = load


def resolve_model_dir(name_or_path: str) -> str:
    """A registered model name's directory (building it if needed); any other name unchanged."""
    build = _MODELS.get(name_or_path)
    return str(build()) if build is not None else name_or_path


def dataset_loader(name: str) -> Callable[..., list] | None:
    return _DATASETS.get(name)


def registered() -> dict[str, Any]:
    """The registered names, for error messages: ``{"models": [...], "datasets": [...]}``."""
    return {"models": sorted(_MODELS), "datasets": sorted(_DATASETS)}
