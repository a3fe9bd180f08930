"""``python -m cepo.train``: the CEPO / RLSD / GRPO training loop.

    python -m cepo.train                                   # offline tiny run on the CPU
    python -m cepo.train --algo grpo --steps 10            # any option: --help lists them all
    python -m cepo.train --config configs/paper_2b.yaml    # the paper's Qwen3-VL-2B run
    python -m cepo.train --config configs/paper_2b.yaml --resume
    accelerate launch --num_processes 8 -m cepo.train --config configs/paper_2b.yaml
    accelerate launch --num_processes 8 -m cepo.train --config configs/full_4b_fsdp.yaml

`main` sets up (config, accelerator, model, optimizer, data, resume) and runs a plain loop over
training steps; `train_step` is one step read top to bottom. One step is one rollout batch
(docs/METHOD.md, "Schedules"): λ, the lr and the prompts of step k are functions of k, so a resumed
run continues exactly. Several processes each take whole prompt groups (prompts are sharded, not
rollouts), so r- is chosen from a complete group without communication; the loss is an exact global
token mean (cepo.update) and metrics are averaged over processes. The actor is replicated (DDP) or,
with ``--sharding fsdp``, sharded (cepo.sharding) and gathered whole for rollouts and scoring.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from cepo.config import (
    ConfigError,
    TrainConfig,
    build_config,
    exit_if_help,
    help_text,
    parse_args,
    save_yaml,
    to_dict,
)

if __name__ == "__main__":  # --help prints before the torch and trainer imports below (< 1 s)
    exit_if_help(sys.argv[1:])

import torch

import cepo.offline  # noqa: F401 - registers the offline kit's names (tiny-warm, synthetic)
from cepo import checkpoint as ckpt
from cepo import resume, sharding
from cepo.data import Example, iter_batches, load_split
from cepo.errors import UserError
from cepo.eval import evaluate
from cepo.experience import ExperienceConfig, default_grader, make_experience
from cepo.lora import count_parameters, parameter_groups, prepare_trainable
from cepo.metrics import (
    MetricsWriter,
    memory_stats,
    peak_memory_gib,
    progress_bar,
    reduce_across,
    reset_peak_memory,
    summarize,
)
from cepo.models import load_model, load_processor, resolve_model_dir
from cepo.plot import draw_curves
from cepo.rollout import RolloutEngine
from cepo.rollout_vllm import make_rollout_engine, resolve_engine
from cepo.rundir import UnsafePathError, fault_point, inside
from cepo.samples import SampleWriter
from cepo.schedule import lam_at, lr_at
from cepo.update import NonFiniteError, NonFiniteGuard, PolicyLoss, ppo_update

logger = logging.getLogger("cepo.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED = {"bf16": torch.bfloat16}  # FSDP compute dtype of --mixed_precision


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""

    cfg: TrainConfig
    accelerator: object  # accelerate.Accelerator
    model: torch.nn.Module  # the actor (peft or plain), unwrapped: rollouts, teachers, saving
    policy: torch.nn.Module  # PolicyLoss around `model`, wrapped for DDP: the update
    optimizer: torch.optim.Optimizer
    processor: object
    model_path: str  # the resolved base checkpoint
    engine: RolloutEngine  # HF generate or a colocated vLLM (--rollout.engine)
    experience: ExperienceConfig
    train_set: list[Example]
    val_set: list[Example]
    writer: MetricsWriter
    samples: SampleWriter  # a few rollouts per step with their per-token credit
    run_dir: Path
    start_step: int
    schedule_steps: int  # the lr schedule's length: the --steps the run started with
    guard: NonFiniteGuard  # skips NaN/inf optimizer steps, stops the run after too many

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


# --------------------------------------------------------------------------- one step


def train_step(run: Run, step: int) -> dict[str, float]:
    """One rollout batch: prompts → rollouts → rewards → Â → PPO update → metrics."""
    cfg, clock = run.cfg, time.perf_counter()
    seed_step(cfg.seed, step, run.rank)
    lam = 0.0 if cfg.algo == "grpo" else lam_at(step, cfg.cepo.lambda_init,
                                                cfg.cepo.lambda_warmup_steps,
                                                cfg.cepo.lambda_offset)
    lr = lr_at(step, lr=cfg.lr, total_steps=run.schedule_steps, schedule=cfg.optim.schedule,
               warmup_steps=cfg.optim.warmup_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    # 1. this process's share of the step's prompts: whole groups, so r- is chosen locally
    examples = prompts_for_step(run.train_set, step, cfg.prompts_per_step, cfg.seed,
                                run.rank, run.world)

    # 2-4. G rollouts per prompt → rewards → GRPO advantages A → student and teacher log-probs
    #      → Δ, w, Â, one fused kernel call per micro-batch (no teachers when λ = 0 or grpo)
    device = run.accelerator.device
    reset_peak_memory(device)
    with sharding.full_weights(run.policy):  # FSDP: gathered once for the whole phase
        experience = make_experience(run.model, run.processor, examples, lam=lam,
                                     config=run.experience, engine=run.engine,
                                     grader=default_grader(cfg.grader_timeout_s, cfg.grader))
    peaks = {"experience": peak_memory_gib(device)}
    reset_peak_memory(device)

    # 5. PPO on mini-batches: fused log-probs + dual-clip loss, accumulation, clipping, AdamW
    update = ppo_update(run.policy, run.optimizer, experience, cfg.ppo,
                        grad_clip=cfg.optim.grad_clip, accelerator=run.accelerator,
                        generator=step_generator(cfg.seed, step), guard=run.guard)

    peaks["update"] = peak_memory_gib(device)
    run.samples.write(experience, run.processor.tokenizer, step)

    # 6. metrics, averaged over processes (memory: the largest process)
    metrics = {**experience.metrics, **update, "lr": lr,
               **memory_stats(run.model, run.optimizer, peaks)}
    generated = float(experience.response_mask.sum())
    metrics["tokens/generated"] = generated
    metrics["throughput/rollout_tok_s"] = generated / max(metrics["time/rollout"], 1e-9)
    metrics["throughput/score_tok_s"] = generated / max(metrics["time/score"], 1e-9)
    metrics["throughput/update_tok_s"] = update["tokens/update"] / max(update["time/update"], 1e-9)
    metrics["time/step"] = time.perf_counter() - clock
    return reduce_across(metrics, run.accelerator)


def prompts_for_step(examples: list[Example], step: int, prompts_per_step: int, seed: int,
                     rank: int = 0, world: int = 1) -> list[Example]:
    """Step k's prompts (a function of k: shuffled epochs of whole batches), then this process's
    contiguous share of them."""
    per_epoch = len(examples) // prompts_per_step
    epoch, index = divmod(step - 1, per_epoch)
    batch = next(itertools.islice(
        iter_batches(examples, prompts_per_step, seed=seed, epoch=epoch), index, None))
    share = prompts_per_step // world
    return batch[rank * share : (rank + 1) * share]


def seed_step(seed: int, step: int, rank: int, salt: int = 0) -> None:
    """Seed sampling from (seed, step, process): a resumed step samples like the original."""
    torch.manual_seed(((seed * 1_000_003 + step) * 4099 + rank) * 7 + salt)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The mini-batch shuffle of a step, identical on every process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --------------------------------------------------------------------------- the loop


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, train, print a summary; returns the summary."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if parse_args(argv)[3]:
            print(help_text())
            return {}
        cfg = build_config(argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # peft calls a transformers property renamed in 5.x; harmless, and printed once per process
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    started = time.perf_counter()
    try:
        run = setup(cfg)
        if run.start_step >= cfg.steps:
            run.writer.close()
            getattr(run.engine, "close", lambda: None)()
            if run.is_main:
                print(f"nothing to do: the run has {run.start_step} steps "
                      f"({ckpt.latest_checkpoint(run.run_dir)}); pass --steps N with N > "
                      f"{run.start_step} to train further")
            return summarize(run.writer.history)
        try:
            train(run)
        finally:
            run.writer.close()
            getattr(run.engine, "close", lambda: None)()  # a vLLM engine frees its memory
    except UserError as err:  # a model, data set or data file that cannot be used: one line
        raise SystemExit(f"{err.label}: {err}") from None
    except (ckpt.CheckpointError, UnsafePathError, NonFiniteError) as err:
        raise SystemExit(f"error: {err}") from None
    summary = {}
    if run.is_main:
        summary = finish(run, time.perf_counter() - started)
    run.accelerator.wait_for_everyone()
    return summary


def train(run: Run) -> None:
    """Steps start_step+1 .. cfg.steps. A step is committed after its records are written
    (cepo.resume), so a crash at any moment resumes to the same records and weights."""
    cfg = run.cfg
    if run.start_step == 0 and cfg.val.before_train and cfg.val.every and run.val_set:
        run.writer.log(0, validate(run, 0))
    bar = progress_bar(cfg.steps, run.start_step, enabled=cfg.log.progress and run.is_main)
    deferred = False  # a save postponed because the weights had just given a NaN/inf loss
    for step in range(run.start_step + 1, cfg.steps + 1):
        metrics = guarded_step(run, step)
        if due(step, cfg.val.every, cfg.steps) and run.val_set:
            metrics.update(validate(run, step))
        save = deferred or due(step, cfg.checkpoint.every, cfg.steps, always_last=True)
        deferred = save and run.guard.in_a_row > 0
        if deferred:
            save = False
            if run.is_main:
                logger.warning("step %d: not saved, its last optimizer step was skipped as "
                               "non-finite; saving after the next finite one", step)
        if save:
            metrics["time/checkpoint"] = resume.stage(run, step)
        fault_point("before_records", step)
        run.writer.log(step, metrics)
        fault_point("after_records", step)
        if save:
            resume.commit(run, step, metrics)
        fault_point("after_commit", step)
        bar.update()
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", lam=f"{metrics['cepo/lambda']:.2f}")
    bar.close()


def guarded_step(run: Run, step: int) -> dict[str, float]:
    """`train_step`, with a clear message when it fails right after non-finite updates (a
    diverged model makes sampling fail on NaN probabilities)."""
    try:
        return train_step(run, step)
    except RuntimeError as err:
        if not run.guard.in_a_row or isinstance(err, NonFiniteError):
            raise
        raise NonFiniteError(
            f"step {step} failed right after {run.guard.in_a_row} optimizer step(s) with a "
            f"non-finite loss or gradient norm: the update diverged ({err}). Nothing was saved "
            "since; lower --optim.lr and --resume from the last checkpoint") from err


def due(step: int, every: int, last: int, *, always_last: bool = False) -> bool:
    if every > 0 and (step % every == 0 or step == last):
        return True
    return always_last and step == last


def validate(run: Run, step: int) -> dict[str, float]:
    """docs/METHOD.md, "Presets" validation sampling on the val split (every process scores a
    share)."""
    cfg = run.cfg
    seed_step(cfg.seed, step, run.rank, salt=1)  # its own stream: training sampling is untouched
    with sharding.full_weights(run.policy):
        return evaluate(
            run.model, run.processor, run.val_set,
            temperature=cfg.val.temperature, top_p=cfg.val.top_p,
            max_new_tokens=cfg.val.max_new_tokens or cfg.rollout.max_new_tokens,
            max_prompt_tokens=cfg.rollout.max_prompt_tokens, batch_size=cfg.val.batch_size,
            grader=default_grader(cfg.grader_timeout_s, cfg.grader), accelerator=run.accelerator,
        )


# --------------------------------------------------------------------------- set-up


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, model (+ LoRA), optimizer, data, metrics writer, and the resume point."""
    accelerator = make_accelerator(cfg)
    resolve_engine(cfg.rollout.engine, accelerator.device)  # vllm asked for but missing: say so now
    world = accelerator.num_processes
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    if cfg.prompts_per_step % world:
        raise SystemExit(f"config error: prompts_per_step={cfg.prompts_per_step} must be a "
                         f"multiple of the number of processes ({world}): groups stay whole")
    run_dir = Path(cfg.output_dir)
    finished = ckpt.latest_checkpoint(run_dir)
    if finished is not None and not cfg.resume:  # never overwrite a run's checkpoints silently
        raise SystemExit(f"{run_dir} already holds a run (checkpoint {finished.name}); pass "
                         "--resume to continue it, or a new --output_dir to start another")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # same LoRA init on every process
    with accelerator.main_process_first():  # the first process builds "tiny-warm", others reuse
        model_path = resolve_model_dir(cfg.model.name)
        processor = load_processor(model_path, min_pixels=cfg.data.min_pixels,
                                   max_pixels=cfg.data.max_pixels)
    # the data before the model: a bad file or row is reported before minutes of loading
    train_set = load_split(cfg.data.train, cfg.data.train_split, limit=cfg.data.train_limit,
                           seed=cfg.seed, processor=processor)
    if len(train_set) < cfg.prompts_per_step:
        raise SystemExit(f"config error: {len(train_set)} training examples, fewer than "
                         f"prompts_per_step={cfg.prompts_per_step}")
    val_set = []
    if cfg.val.every or cfg.val.before_train:
        val_set = load_split(cfg.data.val or cfg.data.train, cfg.data.val_split,
                             limit=cfg.data.val_limit, seed=cfg.seed, processor=processor)
    dtype = DTYPES.get(cfg.model.dtype)  # None ("auto"): bf16 on GPU, fp32 on CPU
    model = load_model(model_path, device=accelerator.device, dtype=dtype,
                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                       attn_implementation=cfg.model.attn_implementation)
    model = prepare_trainable(model, cfg.lora, cfg.model)
    model.train()
    trainable, total = count_parameters(model)
    found = resume.find_resume_point(cfg, run_dir, accelerator)  # the newest intact one
    if found is not None:  # weights before wrapping: FSDP shards what is loaded
        resume.load_checkpoint_weights(cfg, found, model, accelerator)
    policy, optimizer = wrap_for_training(cfg, model, accelerator)

    state = {"step": 0, "schedule_steps": cfg.steps}
    if cfg.resume and found is None and accelerator.is_main_process:
        logger.warning("--resume: no checkpoint in %s; starting from step 0", run_dir)
    if found is not None:
        state.update(resume.resume_state(cfg, found, policy, optimizer, accelerator))
    start_step = state["step"]
    if accelerator.is_main_process:
        save_yaml(cfg, inside(run_dir, "config.yaml"))
        logger.info("config: %s (every setting of this run)", run_dir / "config.yaml")
        logger.info("%s on %s x%d: %s, %s trainable of %s parameters; %d train / %d val examples",
                    cfg.algo, accelerator.device, world, model_path, f"{trainable:,}",
                    f"{total:,}", len(train_set), len(val_set))
    writer = MetricsWriter(run_dir, enabled=accelerator.is_main_process, resume_step=start_step,
                           tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                           wandb_project=cfg.log.wandb_project, run_name=cfg.log.run_name,
                           config=to_dict(cfg))
    samples = SampleWriter(run_dir, cfg.log.samples_per_step,
                           enabled=accelerator.is_main_process, resume_step=start_step)
    experience = ExperienceConfig(algo=cfg.algo, eps_w=cfg.cepo.eps_w,
                                  grader_timeout_s=cfg.grader_timeout_s, grader=cfg.grader,
                                  grader_batch_budget_s=cfg.grader_batch_budget_s,
                                  kernel_backend=cfg.kernel_backend, rollout=cfg.rollout,
                                  prefix_sharing=cfg.prefix_sharing,
                                  uniform_zero=cfg.advantage.uniform_zero,
                                  teacher=cfg.teacher)
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps)
    return Run(cfg, accelerator, model, policy, optimizer, processor, model_path,
               make_rollout_engine(model, processor, model_path, cfg.rollout, seed=cfg.seed),
               experience, train_set, val_set, writer,
               samples, run_dir, start_step, state["schedule_steps"], guard)


def wrap_for_training(cfg: TrainConfig, model, accelerator):
    """The loss module around `model`, wrapped for DDP or sharded with FSDP, and its AdamW."""
    temperature = cfg.rollout.temperature or 1.0  # the update scores like the rollouts sampled
    policy = PolicyLoss(model, cfg.ppo, temperature=temperature, backend=cfg.kernel_backend,
                        prefix_sharing=cfg.prefix_sharing, sharded=cfg.sharding == "fsdp")
    if cfg.sharding == "fsdp":  # FSDP2 by hand (cepo.sharding); the optimizer takes the shards
        policy = sharding.shard(policy, model, MIXED.get(cfg.mixed_precision))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.sharding == "fsdp":
        return policy, accelerator.prepare(optimizer)
    return accelerator.prepare(policy, optimizer)  # DDP when there are several processes


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config error: device='cuda' but no CUDA device is available")
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    # FSDP applies mixed precision itself (gathered weights in bf16, fp32 shards and AdamW)
    mixed = "no" if cfg.sharding == "fsdp" else cfg.mixed_precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
    kind = accelerator.distributed_type.value
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU"):
        raise SystemExit(
            f"config error: accelerate distributed_type={kind} is not supported. Launch with a "
            "multi-GPU config (configs/accelerate/8gpu.yaml) and pass --sharding fsdp to "
            "shard weights, gradients and optimizer state (configs/full_4b_fsdp.yaml sets it); "
            "the trainer applies FSDP itself (cepo/sharding.py)."
        )
    if cfg.sharding == "fsdp" and accelerator.num_processes < 2:
        raise SystemExit("config error: sharding='fsdp' needs at least 2 processes (accelerate "
                         "launch --num_processes N or torchrun); one process trains unsharded")
    return accelerator


def finish(run: Run, seconds: float) -> dict:
    """Print and save the run's summary (reward at start vs end), draw curves.png, and say where
    every output of the run is."""
    summary = summarize(run.writer.history)
    latest = ckpt.latest_checkpoint(run.run_dir)
    curves = draw_curves(run.run_dir)
    summary.update({"wall_time_s": round(seconds, 1), "checkpoint": str(latest),
                    "metrics": str(run.writer.path), "curves": curves and str(curves),
                    "algo": run.cfg.algo})
    inside(run.run_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["", (f"{run.cfg.algo} run done: {summary['steps']} steps; this session took "
                  f"{seconds / 60:.1f} min (set-up included)")]
    for key, label in (("reward/mean", "train reward"), ("reward/accuracy", "train accuracy"),
                       ("reward/format", "train format"), ("val/accuracy", "val accuracy"),
                       ("val/format", "val format")):
        if f"{key} start" in summary:
            lines.append(f"  {label:15s} {summary[f'{key} start']:.3f} -> "
                         f"{summary[f'{key} end']:.3f}")
    lines += [f"  checkpoint      {latest}", f"  metrics         {run.writer.path}",
              f"  samples         {run.samples.path}",
              f"  credit map      python -m cepo.credit {run.run_dir} --out "
              f"{run.run_dir / 'credit'}",
              f"  curves          {curves or 'not drawn: pip install matplotlib'}",
              f"  config          {run.run_dir / 'config.yaml'}"]
    if run.cfg.log.tensorboard:
        lines.append(f"  tensorboard     tensorboard --logdir {run.run_dir / 'tensorboard'}")
    lines.append(f"  evaluate        python -m cepo.eval --checkpoint {run.run_dir}")
    if run.cfg.lora.enabled:
        lines.append(f"  merge LoRA      python -m cepo.lora --checkpoint {run.run_dir} "
                     f"--output {run.run_dir / 'merged'}")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
