"""The training configuration's schema: nested frozen dataclasses with their checks.

Every default below is the `paper` preset (docs/METHOD.md, "Presets") with a one-line why (the
trailing comments are also the ``--help`` text). Each section checks its own values when built,
so a bad value stops the run at start-up with the key, the value and what is allowed. This module
imports no torch: ``python -m cepo.train --help`` and config tools start in well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from cepo.errors import ConfigError
from cepo.grading import DEFAULT_BATCH_BUDGET_S, check_grader

ALGOS = ("cepo", "rlsd", "grpo")
# docs/METHOD.md, "Presets": lr 5e-6 for CEPO, 1e-6 for the GRPO and RLSD baselines (used when
# optim.lr is None).
DEFAULT_LR = {"cepo": 5e-6, "rlsd": 1e-6, "grpo": 1e-6}
# cepo.train derives per-step seeds as about seed x 2.9e10 (seed_step); they must fit in 64 bits.
MAX_SEED = 2**29 - 1
MAX_GRADER_S = 3600.0  # an hour per answer or per batch is already far past any sane grading

# The RLSD baseline as the reference's RLSD script runs it (the RLSD paper's ε_w is 0.2 too):
# ε_w 0.2 and λ_k = 0.5·(1 − k/25), one step ahead of CEPO's schedule (used when None).
DEFAULT_EPS_W = {"cepo": 0.5, "rlsd": 0.2, "grpo": 0.5}
DEFAULT_LAM_OFFSET = {"cepo": 0, "rlsd": 1, "grpo": 0}


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


# Below this a sampling temperature is greedy in effect, and logits / T overflow in low precision.
MIN_TEMPERATURE = 0.01


def _require_temperature(key: str, value: float) -> None:
    _require(value == 0 or MIN_TEMPERATURE <= value < math.inf, key, value,
             f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}")


def check_eps_w(eps_w: float, key: str = "cepo.eps_w") -> None:
    """ε_w clips the token weights to [1 − ε_w, 1 + ε_w]: it must leave them positive."""
    _require(0 <= eps_w < 1, key, eps_w, "a number in [0, 1)")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    name: str = "Qwen/Qwen3-VL-2B-Instruct"  # hub id, local dir, "tiny" (random) or "tiny-warm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 GPU, fp32 CPU
    gradient_checkpointing: bool = True  # 2048-token responses: recompute activations
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None: default
    freeze_vision: bool = True  # full fine-tuning leaves the vision tower frozen too


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA adapters (peft); `enabled=False` is full fine-tuning."""

    enabled: bool = True  # False: full fine-tuning
    rank: int = 16  # docs/METHOD.md, "Presets"
    alpha: float = 32.0  # paper README 32; the reference scripts use 64
    dropout: float = 0.0  # docs/METHOD.md, "Presets"
    target_modules: tuple[str, ...] = ("all-linear",)  # peft names; all-linear skips the lm_head
    exclude_modules: str = r".*visual.*"  # regex of modules never adapted: the vision tower

    def __post_init__(self):
        _require(self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "a number in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
                 "at least one module name (or all-linear)")


@dataclass(frozen=True)
class DataConfig:
    train: str = "hiyouga/geometry3k"  # "synthetic", a Geo3k file or directory, or a hub id
    train_split: str = "train"  # Geo3k train: 2,101 problems
    train_limit: int | None = None  # use only the first N training examples
    val: str | None = None  # validation source; None: the training source
    val_split: str = "test"  # the paper validates on Geo3k test (601)
    val_limit: int | None = None  # validate on the first N examples only
    # Every image is first resized to between min_pixels and max_pixels, as the reference's
    # dataset does, then by the processor's own rule; the same in rollouts, scoring, updates,
    # validation and cepo.eval. None: no bound on that side.
    min_pixels: int | None = 262_144  # 512 × 512: a 300×200 figure gets 260 visual tokens
    max_pixels: int | None = 4_194_304  # 2048 × 2048

    def __post_init__(self):
        for key in ("train_limit", "val_limit"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key}", value, "None or an integer >= 1")
        for key in ("min_pixels", "max_pixels"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key}", value, "None or an integer >= 1")
        if self.min_pixels is not None and self.max_pixels is not None:
            _require(self.min_pixels <= self.max_pixels, "data.min_pixels", self.min_pixels,
                     f"at most data.max_pixels={self.max_pixels}")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings; defaults are docs/METHOD.md, "Presets" (preset `paper`)."""

    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 2048
    max_prompt_tokens: int = 768  # longer prompts are dropped (never truncated: images)
    generation_batch_size: int | None = None  # sequences per `generate` call; None = all at once
    engine: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when installed and on CUDA, else HF
    gpu_memory_utilization: float | None = None  # vLLM's share (None: 0.3 on CUDA, 0.1 on CPU)
    sleep: bool = True  # vLLM on CUDA frees its memory while the trainer scores and updates

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.engine not in ("auto", "hf", "vllm"):
            raise ValueError(f"engine must be 'auto', 'hf' or 'vllm', got {self.engine!r}")
        share = self.gpu_memory_utilization
        if share is not None and not 0 < share < 1:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1), got {share}")


NEG_CHOICES = ("worst", "most_frequent", "reference")
NegChoice = Literal["worst", "most_frequent", "reference"]
REFERENCE_THRESHOLD = 0.5  # the reference's "rejected": reward below this


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher contexts are built; defaults are docs/METHOD.md, "Teachers" and "Presets"
    (preset `paper`)."""

    hint_template: str = " {answer}"  # r+ and r- always share it, so only the answer differs
    # False: image-blind as the reference's CEPO teachers (pads for the image); None: by algorithm,
    # False for cepo, True for rlsd (the reference's RLSD teacher sees the image)
    teacher_images: bool | None = True  # False: image-blind (reference); None: False for cepo
    # worst: lowest-reward rejected rollout with a boxed answer; most_frequent: the commonest
    # wrong answer; reference: the reference code's (lowest reward below 0.5, boxed or not)
    neg_choice: NegChoice = "worst"  # reference: the reference code's (unboxed allowed, " None")
    num_neg: int = 1  # K wrong answers; K > 1 mixes them as logmeanexp_k (extension)
    neg_fallback: Literal["student", "positive"] = "student"  # group without a usable r-
    teacher_model: Literal["actor", "base"] = "actor"  # "base": peft adapters disabled
    micro_batch_size: int = 8  # rollouts per scoring forward

    def __post_init__(self):
        if "{answer}" not in self.hint_template and self.hint_template:
            raise ValueError(f"hint_template must contain '{{answer}}', got {self.hint_template!r}")
        if self.neg_choice not in NEG_CHOICES:
            raise ValueError(
                f"neg_choice must be one of {', '.join(NEG_CHOICES)}, got {self.neg_choice!r}"
            )
        if self.neg_fallback not in ("student", "positive"):
            raise ValueError(
                f"neg_fallback must be 'student' or 'positive', got {self.neg_fallback!r}"
            )
        if self.teacher_model not in ("actor", "base"):
            raise ValueError(f"teacher_model must be 'actor' or 'base', got {self.teacher_model!r}")
        if self.num_neg < 1 or self.micro_batch_size < 1:
            raise ValueError("num_neg and micro_batch_size must be >= 1")


@dataclass(frozen=True)
class ContrastConfig:
    """The contrastive-evidence credit: λ's schedule and the weight clip ε_w (the ``cepo:``
    section; docs/METHOD.md, "Schedules" and "Advantages")."""

    lambda_init: float = 0.5  # λ at step 1 (docs/METHOD.md, "Schedules")
    lambda_warmup_steps: int = 25  # T_warm: λ falls linearly to 0 at step T_warm + 1; 0: constant
    # λ_k = λ0·max(0, 1 − (k − 1 + offset)/T_warm): rlsd's 1 starts at 0.48, ends a step early
    lambda_offset: int | None = None  # None: 0 (cepo, grpo), 1 (rlsd, the reference RLSD script)
    eps_w: float | None = None  # weight clip ε_w; None: 0.5 (cepo), 0.2 (rlsd); reference 0.2

    def __post_init__(self):
        _require(0 <= self.lambda_init <= 1, "cepo.lambda_init", self.lambda_init,
                 "a number in [0, 1]")
        _require(self.lambda_warmup_steps >= 0, "cepo.lambda_warmup_steps",
                 self.lambda_warmup_steps, "an integer >= 0")
        if self.eps_w is not None:
            check_eps_w(self.eps_w)
        _require(self.lambda_offset is None or self.lambda_offset >= 0, "cepo.lambda_offset",
                 self.lambda_offset, "None or an integer >= 0")


# Old option names that still work (with a warning once); docs/METHOD.md and README list them.
RENAMED = {
    "cepo.lam0": "cepo.lambda_init",
    "cepo.lam_warmup_steps": "cepo.lambda_warmup_steps",
    "cepo.lam_offset": "cepo.lambda_offset",
}

# Options that change how a run computes, not what: a run saved before one existed is the same run.
EXECUTION_ONLY = ("prefix_sharing",)


@dataclass(frozen=True)
class AdvantageConfig:
    uniform_zero: bool = True  # all-equal groups get A = 0 exactly; False: the reference's tiny A


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = None  # None: cepo 5e-6, grpo and rlsd 1e-6 (docs/METHOD.md, "Presets")
    weight_decay: float = 0.01  # AdamW, docs/METHOD.md, "Presets"
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW defaults
    eps: float = 1e-8  # AdamW default
    grad_clip: float = 1.0  # max global grad norm; 0: no clipping
    schedule: Literal["cosine", "constant"] = "cosine"  # paper cosine; reference scripts constant
    warmup_steps: int = 5  # linear lr warm-up over the first training steps (paper: 5)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_nonfinite_steps: int = 3  # stop after this many skipped NaN/inf optimizer steps in a row

    def __post_init__(self):
        _require(self.lr is None or 0 < self.lr <= 1, "optim.lr", self.lr,
                 "None or a number > 0 and <= 1 (AdamW moves each weight by about lr per step)")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 self.betas, "two numbers in [0, 1)")
        _require(0 < self.eps <= 1, "optim.eps", self.eps, "a number in (0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "a number >= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
                 "an integer >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio,
                 "a number in [0, 1]")
        _require(self.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps",
                 self.max_nonfinite_steps, "an integer >= 1")


@dataclass(frozen=True)
class PPOConfig:
    mini_batches: int = 2  # optimizer steps per rollout batch (paper: 256 rollouts / 128)
    micro_batch_size: int = 8  # rollouts per forward/backward; gradients accumulate over them
    epochs: int = 1  # passes over each rollout batch
    shuffle: bool = False  # shuffle rollouts before splitting into mini-batches
    clip_low: float = 0.2  # docs/METHOD.md, "Loss"
    clip_high: float = 0.28  # docs/METHOD.md, "Loss" (DAPO clip-higher)
    clip_dual: float = 3.0  # docs/METHOD.md, "Loss"
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"  # docs/METHOD.md, "Loss": token mean over the whole mini-batch
    )

    def __post_init__(self):
        for key in ("mini_batches", "micro_batch_size", "epochs"):
            value = getattr(self, key)
            _require(value >= 1, f"ppo.{key}", value, "an integer >= 1")
        _require(0 <= self.clip_low < 1, "ppo.clip_low", self.clip_low, "a number in [0, 1)")
        _require(self.clip_high >= 0, "ppo.clip_high", self.clip_high, "a number >= 0")
        _require(self.clip_dual > 1, "ppo.clip_dual", self.clip_dual, "a number > 1")


@dataclass(frozen=True)
class ValConfig:
    every: int = 5  # validate every N steps (and after the last); 0: never
    before_train: bool = True  # also at step 0, the starting point of the reward curve
    temperature: float = 0.6  # docs/METHOD.md, "Presets" validation sampling
    top_p: float = 0.95  # docs/METHOD.md, "Presets"
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    batch_size: int = 64  # prompts per generate call

    def __post_init__(self):
        _require(self.every >= 0, "val.every", self.every, "an integer >= 0")
        _require_temperature("val.temperature", self.temperature)
        _require(0 < self.top_p <= 1, "val.top_p", self.top_p, "a number in (0, 1]")
        _require(self.batch_size >= 1, "val.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 10  # save every N steps (and after the last); 0: only at the end
    keep_last: int = 2  # older checkpoints are deleted
    save_optimizer: bool = True  # needed for an exact --resume

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # a progress bar on the main process
    tensorboard: bool = False  # needs the tensorboard package
    wandb: bool = False  # needs the wandb package (and a login, or WANDB_MODE=offline)
    wandb_project: str = "cepo"
    run_name: str | None = None  # None: the output directory's name
    samples_per_step: int = 2  # rollouts with per-token Δ, w, Â to samples.jsonl; 0: none

    def __post_init__(self):
        _require(self.samples_per_step >= 0, "log.samples_per_step", self.samples_per_step,
                 "an integer >= 0")


@dataclass(frozen=True)
class TrainConfig:
    preset: Literal["paper", "reference"] = "paper"  # docs/METHOD.md, "Presets" column to start at
    algo: Literal["cepo", "rlsd", "grpo"] = "cepo"  # grpo = no teachers (λ ≡ 0)
    steps: int = 50  # training steps; one step = one rollout batch (docs/METHOD.md, "Schedules")
    prompts_per_step: int = 32  # prompts per rollout batch, over all processes (× group_size)
    seed: int = 0  # data order, sampling, LoRA init, synthetic data
    output_dir: str = "runs/{preset}-{algo}"  # {preset} and {algo} are filled in
    resume: bool = False  # continue from output_dir's latest checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp32 weights, bf16 compute (full FT)
    sharding: Literal["none", "fsdp"] = "none"  # fsdp: shard weights/grads/AdamW (cepo.sharding)
    num_threads: int = 0  # CPU threads per process; 0: cores / processes
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"  # cepo_kernels backend
    # each prompt encoded once per group in scoring and update (cepo.prefix); same math
    prefix_sharing: Literal["auto", "true", "false"] = "auto"  # prompt encoded once per group
    grader_timeout_s: float = 5.0  # hard limit per graded answer
    grader_batch_budget_s: float = DEFAULT_BATCH_BUDGET_S  # grading time per step; then 0s
    # math_verify; mathruler: the reference code's grader (pip install 'cepo[mathruler]')
    grader: Literal["math_verify", "mathruler"] = "math_verify"  # mathruler: the reference's grader
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cepo: ContrastConfig = field(default_factory=ContrastConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    val: ValConfig = field(default_factory=ValConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        _require(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step,
                 "an integer >= 1")
        _require(self.num_threads >= 0, "num_threads", self.num_threads, "an integer >= 0")
        _require(0 <= self.seed <= MAX_SEED, "seed", self.seed,
                 f"an integer in [0, {MAX_SEED}] (2**29 - 1)")
        _require(self.rollout.group_size >= 2, "rollout.group_size", self.rollout.group_size,
                 f"an integer >= 2: {self.algo}'s advantages are relative to the group, so with "
                 "one rollout per prompt every advantage is 0 and nothing is learned")
        _require(0 < self.grader_timeout_s <= MAX_GRADER_S, "grader_timeout_s",
                 self.grader_timeout_s, f"a number in (0, {MAX_GRADER_S:.0f}] (seconds)")
        _require(0 < self.grader_batch_budget_s <= MAX_GRADER_S, "grader_batch_budget_s",
                 self.grader_batch_budget_s, f"a number in (0, {MAX_GRADER_S:.0f}] (seconds)")
        _require_temperature("rollout.temperature", self.rollout.temperature)
        _require(self.lr * self.optim.weight_decay < 1, "optim.weight_decay",
                 self.optim.weight_decay, f"less than 1 / lr = {1 / self.lr:.3g} (AdamW scales "
                 "weights by 1 - lr * weight_decay each step)")
        try:
            check_grader(self.grader)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"grader={self.grader!r}: {err}") from None
        _require(self.sharding != "fsdp" or self.mixed_precision != "fp16", "mixed_precision",
                 self.mixed_precision, "'no' or 'bf16' with sharding=fsdp (fp16 needs loss "
                 "scaling, which the FSDP path does not do)")

    @property
    def lr(self) -> float:
        """The learning rate in use (`optim.lr`, or the algorithm's value in
        docs/METHOD.md, "Presets")."""
        return self.optim.lr if self.optim.lr is not None else DEFAULT_LR[self.algo]




# --------------------------------------------------------------------------- dicts


def to_dict(cfg) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), ready for YAML or JSON."""

    def plain(value):
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; dotted keys pass through."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *heads, last = key.split(".")
        node = nested
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return nested
