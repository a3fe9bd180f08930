"""Run logging: a JSON-lines file, optional TensorBoard and W&B, a progress bar, a summary.

Only the main process writes. `metrics.jsonl` gets one object per training step (``{"step": k,
...}``) and one per validation (``{"step": k, "val/accuracy": ...}``); a resumed run first drops
the lines of steps after its checkpoint, so the file always reads like one uninterrupted run.
TensorBoard and W&B (the ``logging`` extra) are used when asked for and installed; asked for but
missing, they are skipped with a warning (the JSON-lines file always exists). TensorBoard writes
to ``<run_dir>/tensorboard`` and W&B to ``<run_dir>/wandb``; a resumed run continues both (the
W&B run id is kept in ``<run_dir>/wandb_id.txt``).

The trainer writes a step's records before it commits the step's checkpoint, so after a crash
at any moment the resumed run's truncation leaves exactly the records of committed steps. A
record torn by a crash or a full disk mid-write (the last line) is dropped on resume with a
warning. No file is followed through a symbolic link (`cepo.rundir`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cepo.checkpoint import unwrap_optimizer
from cepo.rundir import inside

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
GIB = 2.0**30
WANDB_ID_FILE = "wandb_id.txt"


class MetricsWriter:
    """Appends step metrics to ``<run_dir>/metrics.jsonl`` and mirrors them to TB / W&B."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "cepo",
        run_name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.history: list[dict[str, Any]] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = inside(run_dir, METRICS_FILE)
        self.history = truncate(self.path, resume_step) if resume_step else []
        if not resume_step:
            self.path.write_text("")
        run_dir = Path(run_dir)
        name = run_name or run_dir.name
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("log.tensorboard=true but tensorboard is not installed; skipped")
            else:
                # On resume, purge_step hides the crashed run's events after the checkpoint step
                # (TensorBoard drops events with step >= purge_step from the older event files).
                self._tb = SummaryWriter(str(inside(run_dir, "tensorboard")),
                                         purge_step=resume_step + 1 if resume_step else None)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                logger.warning("log.wandb=true but wandb is not installed; skipped")
            else:
                self._wandb = wandb_lib.init(
                    project=wandb_project, name=name, config=config,
                    dir=str(inside(run_dir, "wandb").parent),
                    id=wandb_run_id(run_dir, name, resume=bool(resume_step)), resume="allow",
                )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record. TB/W&B get only its finite numbers: add_scalar raises on a string or
        None and W&B cannot chart them, so a stray non-numeric value must not end the run."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(record)
        append_line(self.path, json.dumps(record))
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))}  # NaN/inf are None by now
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        """Flush and close TB / finish the W&B run (safe to call twice)."""
        tb, run, self._tb, self._wandb = self._tb, self._wandb, None, None
        if tb is not None:
            tb.close()
        if run is not None:
            run.finish()


def wandb_run_id(run_dir: Path, name: str, *, resume: bool) -> str:
    """The W&B run id of `run_dir`, kept in ``<run_dir>/wandb_id.txt``.

    A resumed run reads it back, so W&B (``resume="allow"``) continues the same run. A fresh start
    gets a new id (the run name plus a random suffix) even in an existing directory: re-using the
    old id would append a second step 1, 2, ... to the old W&B run, which W&B drops.
    """
    path = inside(run_dir, WANDB_ID_FILE)
    if resume and path.is_file() and (run_id := path.read_text().strip()):
        return run_id
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "run"
    run_id = f"{slug}-{secrets.token_hex(4)}"
    path.write_text(run_id + "\n")
    return run_id


def _plain(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.generic)):  # one-element tensors, numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def append_line(path: Path, line: str) -> None:
    """Append one JSON line and sync it: a record is on disk before its step is committed."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A torn last line (a crash or a full disk mid-write) is
    left out with a warning; a bad line before it is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}:{number}: not a JSON record: {err}") from None
            logger.warning("%s:%d: torn last record (a crash or a full disk mid-write), "
                           "dropped: %r", path, number, line[:80])
    return records


def truncate(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records of steps <= `last_step` (a resumed run re-does the later ones), and
    drop a torn last line."""
    kept = [r for r in read(path) if r.get("step", 0) <= last_step]
    tmp = inside(path.parent, path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                   encoding="utf-8")
    tmp.replace(path)
    return kept


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over training steps (a no-op object when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        file=sys.stderr)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def reduce_across(metrics: dict[str, float], accelerator) -> dict[str, float]:
    """The mean of every metric over processes (max for ``*_max``, min for ``*_min``).

    Each process holds whole groups and, with equal shares of prompts, equally many rollouts, so
    means of per-process means are the global means.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import gather_object

    keys = sorted(set(gather_object(list(metrics))))  # a key may be missing on some process
    values = torch.tensor([float(metrics.get(k, math.nan)) for k in keys], dtype=torch.float64,
                          device=accelerator.device)
    present = torch.isfinite(values)
    gathered = accelerator.gather(torch.where(present, values, 0.0)[None]).view(-1, len(keys))
    counts = accelerator.gather(present.double()[None]).view(-1, len(keys))
    out = {}
    for i, key in enumerate(keys):
        column, seen = gathered[:, i], counts[:, i] > 0
        if not seen.any():
            out[key] = float("nan")
        elif key.endswith("_max"):
            out[key] = column[seen].max().item()
        elif key.endswith("_min"):
            out[key] = column[seen].min().item()
        else:
            out[key] = column[seen].mean().item()
    return out


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process stores for `tensor` (its own shard of a sharded DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def memory_stats(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 peaks: dict[str, float | None]) -> dict[str, float]:
    """GiB held by this process: parameters (with FSDP, its shard), optimizer state, and the
    peak allocated in each phase (`peak_memory_gib`; CUDA only). Keys end in ``_max``, so the
    process with the most is reported."""
    states = [v for state in unwrap_optimizer(optimizer).state.values() for v in state.values()
              if isinstance(v, torch.Tensor)]
    out = {
        "memory/params_gib_max": sum(_local_bytes(p) for p in model.parameters()) / GIB,
        "memory/optimizer_gib_max": sum(_local_bytes(t) for t in states) / GIB,
    }
    out.update({f"memory/peak_{phase}_gib_max": gib for phase, gib in peaks.items()
                if gib is not None})
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """GiB allocated at most since `reset_peak_memory` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def summarize(history: Iterable[dict[str, Any]], *, window: int = 3) -> dict[str, Any]:
    """Start vs end of a run: mean training reward of the first and last `window` steps, and the
    first and last validation accuracy/reward."""
    train = [r for r in history if "reward/mean" in r]
    val = [r for r in history if "val/accuracy" in r]
    out: dict[str, Any] = {"steps": len(train)}
    if train:  # windows never overlap: a 3-step run compares step 1 with step 3
        window = max(1, min(window, len(train) // 2))
        head, tail = train[:window], train[-window:]
        for key in ("reward/mean", "reward/accuracy", "reward/format"):
            out[f"{key} start"] = sum(r[key] for r in head) / len(head)
            out[f"{key} end"] = sum(r[key] for r in tail) / len(tail)
    if val:
        for key in ("val/accuracy", "val/reward", "val/format"):
            out[f"{key} start"] = val[0][key]
            out[f"{key} end"] = val[-1][key]
        out["val steps"] = (val[0]["step"], val[-1]["step"])
    return out
