"""The training configuration: nested frozen dataclasses, presets, YAML files, CLI overrides.

Every default below is the `paper` preset (docs/METHOD.md, "Presets") with a one-line why. A run's
config is built in layers, later ones winning:

    preset (`paper` | `reference`)
      -> YAML files given with --config (none given: the built-in offline run, `OFFLINE_DEFAULT`,
         the same as configs/tiny_cpu.yaml)
      -> command-line overrides: ``--section.key value``, ``--section.key=value``, or ``--key``
         alone when that last part names one option only (``--lr``, ``--lam0``, ``--group_size``)

then `finalize` fills the values that derive from others (the lr, ε_w, λ offset and teacher
images of the algorithm, `{algo}` in the output directory). The result is printed and saved with
the run and every checkpoint. Unknown keys and invalid values stop the run at start-up with the
key, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cepo.contexts import TeacherConfig
from cepo.errors import ConfigError
from cepo.grading import DEFAULT_BATCH_BUDGET_S, check_grader
from cepo.rollout import RolloutConfig

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


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    name: str = "Qwen/Qwen3-VL-2B-Instruct"  # hub id, local dir, "tiny" (random) or "tiny-warm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 GPU, fp32 CPU
    gradient_checkpointing: bool = True  # 2048-token responses: recompute activations
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None: default
    freeze_vision: bool = True  # full fine-tuning leaves the vision tower frozen too


@dataclass(frozen=True)
class LoraSettings:
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
class CEPOSettings:
    lam0: float = 0.5  # λ at step 1 (docs/METHOD.md, "Schedules")
    lam_warmup_steps: int = 25  # T_warm: λ falls linearly to 0 at step T_warm + 1; 0: constant
    # λ_k = λ0·max(0, 1 − (k − 1 + lam_offset)/T_warm): rlsd's 1 starts at 0.48, ends a step early
    lam_offset: int | None = None  # None: 0 (cepo, grpo), 1 (rlsd, the reference RLSD script)
    eps_w: float | None = None  # weight clip ε_w; None: 0.5 (cepo), 0.2 (rlsd); reference 0.2

    def __post_init__(self):
        _require(0 <= self.lam0 <= 1, "cepo.lam0", self.lam0, "a number in [0, 1]")
        _require(self.lam_warmup_steps >= 0, "cepo.lam_warmup_steps", self.lam_warmup_steps,
                 "an integer >= 0")
        _require(self.eps_w is None or 0 <= self.eps_w < 1, "cepo.eps_w", self.eps_w,
                 "None or a number in [0, 1)")
        _require(self.lam_offset is None or self.lam_offset >= 0, "cepo.lam_offset",
                 self.lam_offset, "None or an integer >= 0")


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
    grader_timeout_s: float = 5.0  # hard limit per graded answer
    grader_batch_budget_s: float = DEFAULT_BATCH_BUDGET_S  # grading time per step; then 0s
    # math_verify; mathruler: the reference code's grader (pip install 'cepo[mathruler]')
    grader: Literal["math_verify", "mathruler"] = "math_verify"  # mathruler: the reference's grader
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cepo: CEPOSettings = field(default_factory=CEPOSettings)
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


# --------------------------------------------------------------------------- presets


def paper() -> TrainConfig:
    """docs/METHOD.md, "Presets", paper/README column: Qwen3-VL-2B, Geo3k, 50 steps of 32 × 8,
    LoRA r16/α32, cosine lr with 5 warm-up steps, ε_w 0.5 (the RLSD baseline: ε_w 0.2,
    λ_k = 0.5·(1 − k/25)), images of 262,144 to 4,194,304 pixels."""
    return TrainConfig()


def reference() -> TrainConfig:
    """docs/METHOD.md, "Presets", reference-scripts column: as `paper` but LoRA α 64, constant lr,
    ε_w 0.2, and the reference code's own choices where they differ from the paper: r- chosen as it
    does (lowest reward below 0.5, unboxed allowed, so the hint can be " None"), r- = r+ for a group
    without one, image-blind teachers (pads for the image), and its group std (uniform groups keep
    the tiny A that rounding leaves)."""
    cfg = paper()
    return dataclasses.replace(
        cfg,
        preset="reference",
        lora=dataclasses.replace(cfg.lora, alpha=64.0),
        optim=dataclasses.replace(cfg.optim, schedule="constant", warmup_steps=0),
        cepo=dataclasses.replace(cfg.cepo, eps_w=0.2),
        teacher=dataclasses.replace(cfg.teacher, neg_choice="reference", neg_fallback="positive",
                                    teacher_images=None),  # by algorithm, see finalize
        advantage=dataclasses.replace(cfg.advantage, uniform_zero=False),
    )


PRESETS = {"paper": paper, "reference": reference}

# The run of `python -m cepo.train` without arguments (= configs/tiny_cpu.yaml): the built-in
# tiny Qwen3-VL, warmed up on the synthetic task (cepo.warmup), trained offline on 2 CPU cores in
# a few minutes. Method settings (λ schedule, ε_w, clipping, LoRA rank) stay the preset's; the
# scale shrinks and the lr grows to suit a 0.25M-parameter model.
OFFLINE_DEFAULT: dict[str, Any] = {
    "output_dir": "runs/tiny-{algo}",
    "steps": 30,
    "prompts_per_step": 8,
    "num_threads": 1,  # tiny tensors: threads only add OpenMP spinning on a shared machine
    "model.name": "tiny-warm",
    "model.gradient_checkpointing": False,
    "data.train": "synthetic",
    "data.val_split": "val",
    # the tiny model's own small images (64×64, 4 visual tokens); a Qwen3-VL processor at the
    # paper's 262,144-pixel minimum would make each synthetic image 256 visual tokens
    "data.min_pixels": None,
    "data.max_pixels": None,
    "rollout.group_size": 8,
    "rollout.max_new_tokens": 24,
    "rollout.temperature": 0.6,  # at 1.0 the tiny model's samples are mostly copying noise
    "teacher.micro_batch_size": 32,
    "optim.lr": 1e-3,  # 2e-3 drives the tiny model's samples to garbage within a few steps
    "optim.warmup_steps": 2,
    "ppo.micro_batch_size": 32,
    "val.every": 10,
    "checkpoint.every": 10,
}


# --------------------------------------------------------------------------- dict <-> config


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


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def option_types(cls=TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf option as ``{"section.key": type}``, in declaration order."""
    out = {}
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if is_dataclass(tp):
            out.update(option_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with dotted-key overrides applied (values coerced to the option's type)."""
    types_ = option_types()
    values = {k: coerce(v, types_[k], k) for k, v in flatten(to_dict(cfg)).items()}
    for key, value in overrides.items():
        full = resolve_key(key, types_)
        values[full] = coerce(value, types_[full], full)
    return from_flat(values)


def from_flat(values: dict[str, Any], cls=TrainConfig, prefix: str = ""):
    """Build `cls` from a complete ``{"section.key": value}`` mapping (values already typed)."""
    kwargs = {}
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        if is_dataclass(tp):
            kwargs[f.name] = from_flat(values, tp, name + ".")
        elif name in values:
            kwargs[f.name] = values[name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # sections defined elsewhere (rollout, teacher)
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: {err}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a flat ``{"section.key": value}`` dict."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # syntax errors, and tags (!!python/...): never constructed
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {why}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return flatten(data)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_yaml(path: str | Path) -> TrainConfig:
    """A saved (complete) config, e.g. a checkpoint's config.yaml."""
    flat = load_yaml(path)
    base = PRESETS[flat.get("preset", "paper")]()
    return apply_overrides(base, flat)


# --------------------------------------------------------------------------- keys and values


def resolve_key(key: str, types_: dict[str, Any] | None = None) -> str:
    """The full dotted name of `key`: itself, or the one option whose last part(s) it is."""
    types_ = types_ or option_types()
    key = key.replace("-", "_")
    if key in types_:
        return key
    matches = [k for k in types_ if k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"{key!r} is ambiguous: say which of {', '.join(matches)}")
    names = {k: k for k in types_} | {k.rpartition(".")[2]: k for k in types_}
    close = sorted({names[m] for m in difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)})
    hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every option"
    raise ConfigError(f"unknown option {key!r}{hint}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (a CLI string or a YAML value) as type `tp`, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed: one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not allowed: a list (or comma-separated text)")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v.strip() if isinstance(v, str) else v, args[0], key)
                         for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={value!r} is not allowed: {len(args)} values")
        return tuple(coerce(v.strip() if isinstance(v, str) else v, a, key)
                     for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not allowed: true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: an integer")
        try:
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)  # exact: a float would round integers past 2**53
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not allowed: an integer") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not allowed: a number") from None
        if not math.isfinite(number):  # inf / nan (YAML .inf, .nan) never make a sane setting
            raise ConfigError(f"{key}={value!r} is not allowed: a finite number")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: text")
        return str(value)
    raise ConfigError(f"{key}: unsupported option type {tp}")  # pragma: no cover


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Fill the derived values: lr, ε_w, λ offset and teacher images by algorithm, {preset}/{algo}
    in output_dir."""
    try:
        output_dir = cfg.output_dir.format(preset=cfg.preset, algo=cfg.algo)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not allowed: only {{preset}} and "
                          f"{{algo}} are filled in (write {{{{ }}}} for a literal brace); "
                          f"{type(err).__name__}: {err}") from None
    eps_w, offset = cfg.cepo.eps_w, cfg.cepo.lam_offset
    images = cfg.teacher.teacher_images
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(
            cfg.teacher, teacher_images=cfg.algo != "cepo" if images is None else images
        ),
        optim=dataclasses.replace(cfg.optim, lr=cfg.lr),
        cepo=dataclasses.replace(
            cfg.cepo,
            eps_w=DEFAULT_EPS_W[cfg.algo] if eps_w is None else eps_w,
            lam_offset=DEFAULT_LAM_OFFSET[cfg.algo] if offset is None else offset,
        ),
        output_dir=output_dir,
    )


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[list[str], str | None, dict[str, Any], bool]:
    """Split argv into (config files, preset, overrides, wants help)."""
    files, preset, overrides, wants_help = [], None, {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                if key in ("config", "preset") or option_types()[resolve_key(key)] is not bool:
                    raise ConfigError(f"--{key} needs a value (--{key} VALUE or --{key}=VALUE)")
                value = "true"  # a bare flag: --resume
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            files.append(value)
        elif key == "preset":
            preset = value
        else:
            overrides[key] = value
    return files, preset, overrides, wants_help


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_config(argv: list[str]) -> TrainConfig:
    """The finalized config of a command line (see the module docstring for the layers), checked
    against this machine (`check_machine`) so a run fails before any set-up."""
    files, preset, overrides, _ = parse_args(argv)
    layers = [load_yaml(f) for f in files] if files else [dict(OFFLINE_DEFAULT)]
    if preset is None:
        presets = [layer["preset"] for layer in layers if "preset" in layer]
        preset = presets[-1] if presets else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is not allowed: one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    for layer in layers:
        cfg = apply_overrides(cfg, {k: v for k, v in layer.items() if k != "preset"})
    cfg = finalize(apply_overrides(cfg, overrides))
    check_machine(cfg)
    return cfg


def check_machine(cfg: TrainConfig) -> None:
    """Refuse settings this machine cannot honour (a saved config elsewhere may still use them)."""
    import torch

    from cepo_kernels.backend import resolve_backend

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device='cuda' is not allowed: no CUDA device is available here")
    device = torch.device("cuda" if cuda and cfg.device != "cpu" else "cpu")
    try:
        if cfg.kernel_backend == "triton":  # auto and torch run anywhere
            resolve_backend(cfg.kernel_backend, device)
    except ValueError as err:
        raise ConfigError(f"kernel_backend={cfg.kernel_backend!r} is not allowed on this "
                          f"machine: {err}; use auto or torch") from None


def field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in `cls`'s source (the help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for match in re.finditer(r"^\s+(\w+): [^\n]*?=[^\n]*?#\s*([^\n]+)$", source, re.M):
        docs.setdefault(match.group(1), match.group(2).strip())
    return docs


def help_text(prog: str = "python -m cepo.train") -> str:
    """Every option with its type, its default (the paper preset) and the offline default."""
    paper_values = flatten(to_dict(finalize(paper())))
    offline = flatten(to_dict(build_config([])))
    lines = [
        f"usage: {prog} [--config FILE ...] [--preset {{{','.join(PRESETS)}}}] [--KEY VALUE ...]",
        "",
        "Train a Qwen3-VL policy with CEPO, RLSD or GRPO (docs/METHOD.md). Without arguments: the",
        "offline tiny run on the CPU (built-in tiny Qwen3-VL, synthetic data, a few minutes).",
        "",
        "  --config FILE   YAML file(s) of options (default: the offline tiny run)",
        "  --preset NAME   docs/METHOD.md, 'Presets' column the values start from: paper (default)",
        "                  or reference",
        "  --KEY VALUE     any option below, as a dotted key; the last part alone when unique",
        "",
        "option (type)  default = paper preset  [offline default when different]  why",
    ]
    section = None
    for key, tp in option_types().items():
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            lines.append(f"\n[{head or 'run'}]")
        paper_value, offline_value = paper_values[key], offline[key]
        extra = f"  [{offline_value!r}]" if offline_value != paper_value else ""
        doc = _section_docs(key)
        lines.append(f"  --{key} ({_type_name(tp)})".ljust(44) + f" {paper_value!r}{extra}")
        if doc:
            lines.append(" " * 8 + doc)
    return "\n".join(lines)


def _section_docs(key: str) -> str:
    cls, parts = TrainConfig, key.split(".")
    for part in parts[:-1]:
        cls = _hints(cls)[part]
    return field_docs(cls).get(parts[-1], "")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))
