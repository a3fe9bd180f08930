"""Saving a training step and resuming from it: the trainer's side of `cepo.checkpoint`.

A step is committed in this order, so that a crash at any moment (``kill -9`` included) leaves a
run that ``--resume`` continues exactly, records included:

    1. `stage`: weights (refused if not finite), optimizer, RNG and config into the staging dir
    2. the step's records: metrics.jsonl, samples.jsonl (already written), TensorBoard, W&B
    3. `commit`: checksums + trainer_state.json, rename into place, verify, ``latest``, rotate

A crash before 3 resumes from the previous checkpoint and drops the records written after it
(`cepo.metrics.truncate`); a crash after 3 finds the step's records already on disk.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from cepo import checkpoint as ckpt
from cepo import sharding
from cepo.config import RENAMED, TrainConfig, flatten, save_yaml, to_dict
from cepo.integrity import first_nonfinite
from cepo.models import save_processor_files
from cepo.rundir import fault_point
from cepo.update import NonFiniteError, check_replicas

logger = logging.getLogger("cepo.train")


def stage(run, step: int) -> float:
    """Write step `step`'s checkpoint files into the staging directory (every process: its RNG
    state; FSDP: gathers); returns the seconds it took. Refuses NaN/inf weights."""
    clock, cfg, acc = time.perf_counter(), run.cfg, run.accelerator
    check_replicas(run.model, acc)
    check_finite_weights(run, step)
    if run.is_main:
        ckpt.begin(run.run_dir, step)
    acc.wait_for_everyone()
    tmp = ckpt.staging_dir(run.run_dir, step)
    ckpt.save_rng(tmp, run.rank)
    weights, optimizer_state = None, None  # sharded: full state dicts, gathered by every process
    if cfg.sharding == "fsdp":
        weights = sharding.gather_weights(run.model, trainable_only=cfg.lora.enabled)
        if cfg.checkpoint.save_optimizer:
            optimizer_state = sharding.gather_optimizer(run.policy, run.optimizer)
    elif cfg.checkpoint.save_optimizer and run.is_main:
        optimizer_state = ckpt.named_optimizer_state(
            run.optimizer.state_dict(), ckpt.optimizer_param_names(run.policy, run.optimizer))
    if run.is_main:
        ckpt.save_model(run.model, tmp, state_dict=weights)
        fault_point("mid_save", step)
        if not cfg.lora.enabled:  # a full model: make the directory loadable on its own
            save_processor_files(run.processor, run.model_path, tmp)
        save_yaml(cfg, tmp / "config.yaml")
        if cfg.checkpoint.save_optimizer:
            ckpt.save_optimizer(optimizer_state, tmp)
    acc.wait_for_everyone()
    return time.perf_counter() - clock


def commit(run, step: int, metrics: dict[str, float]) -> None:
    """Make the staged step `step` the run's latest checkpoint (after its records are out)."""
    if run.is_main:
        state = {"world_size": run.world, "sharding": run.cfg.sharding,
                 "lambda": metrics.get("cepo/lambda"), "lr": metrics.get("lr"),
                 "reward": metrics.get("reward/mean"), "schedule_steps": run.schedule_steps}
        ckpt.commit(run.run_dir, step, state, run.cfg.checkpoint.keep_last)
    run.accelerator.wait_for_everyone()


def check_finite_weights(run, step: int) -> None:
    """Refuse to save weights holding NaN/inf: they would become ``latest`` and rotate out
    the good checkpoints. Every process checks its own (FSDP: its shards) and all agree."""
    import torch

    local = ((name, p.to_local() if hasattr(p, "to_local") else p)
             for name, p in run.model.named_parameters() if p.requires_grad)
    bad = first_nonfinite(local)
    flag = bad is not None
    if run.world > 1:
        tensor = torch.tensor([float(flag)], device=run.accelerator.device)
        flag = bool(run.accelerator.reduce(tensor, reduction="max").item())
    if flag:
        where = bad or "on another process"
        raise NonFiniteError(
            f"refusing to save step {step}: the weights hold NaN or inf ({where}); the update "
            "diverged. The last checkpoint stays latest: lower --optim.lr and --resume")


def find_resume_point(cfg: TrainConfig, run_dir: Path, accelerator) -> Path | None:
    """--resume: the newest intact checkpoint (checked once, by the main process)."""
    if not cfg.resume:
        return None
    found, error = None, None
    if accelerator.is_main_process:
        try:
            found = ckpt.resume_point(run_dir)
        except ckpt.CheckpointError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found, error = broadcast_object_list([found, error])
    if error:
        raise ckpt.CheckpointError(f"--resume: {error}")
    return found


def load_checkpoint_weights(cfg: TrainConfig, found: Path, model, accelerator) -> None:
    """Resume, part 1 (before any wrapping): warn about changed settings, load the weights."""
    saved = flatten(yaml.safe_load((found / "config.yaml").read_text()))
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}  # a checkpoint from before a rename
    volatile = ("steps", "resume", "log.", "checkpoint.", "val.", "num_threads", "sharding")
    changed = {k: (v, saved.get(k)) for k, v in flatten(to_dict(cfg)).items()
               if saved.get(k) != v and not k.startswith(volatile)}
    if changed and accelerator.is_main_process:
        logger.warning("resuming with settings that differ from the checkpoint's (now, then): %s",
                       changed)
    ckpt.load_weights(model, found)


def resume_state(cfg: TrainConfig, found: Path, policy, optimizer,
                 accelerator) -> dict[str, Any]:
    """Resume, part 2 (after wrapping): AdamW state and RNG; returns trainer_state.json.

    The AdamW state is saved whole and keyed by parameter name in both layouts, so a DDP
    checkpoint resumes under FSDP and back.
    """
    if cfg.checkpoint.save_optimizer:
        if cfg.sharding == "fsdp":  # the main process reads the file, FSDP scatters the shards
            state = ckpt.load_optimizer(found) if accelerator.is_main_process else {}
            sharding.scatter_optimizer(policy, optimizer, state)
        else:
            names = ckpt.optimizer_param_names(policy, optimizer)
            optimizer.load_state_dict(ckpt.indexed_optimizer_state(ckpt.load_optimizer(found),
                                                                   names))
    ckpt.load_rng(found, accelerator.process_index)
    state = ckpt.read_state(found)
    if accelerator.is_main_process:
        logger.info("resumed from %s (step %d)", found, state["step"])
        if state.get("schedule_steps", cfg.steps) != cfg.steps:
            logger.warning(
                "--steps %d: the lr schedule keeps the length this run started with (%d steps; "
                "a cosine stays at its final lr after that). For another schedule, start a new "
                "run in a new --output_dir", cfg.steps, state["schedule_steps"])
    return state
