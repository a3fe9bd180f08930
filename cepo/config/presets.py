"""Presets (docs/METHOD.md, "Presets"), the offline default run, and `finalize`.

A run's config is built in layers, later ones winning (`cepo.config.cli.build_config`):

    preset (`paper` | `reference`)
      -> YAML files given with --config (none given: `offline`, the built-in tiny run on the CPU,
         the same as configs/tiny_cpu.yaml)
      -> command-line overrides

then `finalize` fills the values that derive from others (the lr, ε_w, λ offset and teacher
images of the algorithm, ``{preset}``/``{algo}`` in the output directory).
"""

from __future__ import annotations

import dataclasses

from cepo.config.schema import DEFAULT_EPS_W, DEFAULT_LAM_OFFSET, TrainConfig
from cepo.errors import ConfigError


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


def offline(base: TrainConfig | None = None) -> TrainConfig:
    """The run of `python -m cepo.train` without --config (= configs/tiny_cpu.yaml), on top of
    `base` (default: the paper preset): the built-in tiny Qwen3-VL, warmed up on the synthetic
    task (cepo.offline.warmup), trained offline on 2 CPU cores in a few minutes. Method settings (λ
    schedule, ε_w, clipping, LoRA rank) stay the preset's; the scale shrinks and the lr grows to
    suit a 0.25M-parameter model."""
    cfg = base if base is not None else paper()
    replace = dataclasses.replace
    return replace(
        cfg,
        output_dir="runs/tiny-{algo}",
        steps=30,
        prompts_per_step=8,
        num_threads=1,  # tiny tensors: threads only add OpenMP spinning on a shared machine
        model=replace(cfg.model, name="tiny-warm", gradient_checkpointing=False),
        # the tiny model's own small images (64×64, 4 visual tokens); a Qwen3-VL processor at the
        # paper's 262,144-pixel minimum would make each synthetic image 256 visual tokens
        data=replace(cfg.data, train="synthetic", val_split="val", min_pixels=None,
                     max_pixels=None),
        # at temperature 1.0 the tiny model's samples are mostly copying noise
        rollout=replace(cfg.rollout, group_size=8, max_new_tokens=24, temperature=0.6),
        teacher=replace(cfg.teacher, micro_batch_size=32),
        # lr 2e-3 drives the tiny model's samples to garbage within a few steps
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=2),
        ppo=replace(cfg.ppo, micro_batch_size=32),
        val=replace(cfg.val, every=10),
        checkpoint=replace(cfg.checkpoint, every=10),
    )


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Fill the derived values: lr, ε_w, λ offset and teacher images by algorithm, {preset}/{algo}
    in output_dir."""
    try:
        output_dir = cfg.output_dir.format(preset=cfg.preset, algo=cfg.algo)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not allowed: only {{preset}} and "
                          f"{{algo}} are filled in (write {{{{ }}}} for a literal brace); "
                          f"{type(err).__name__}: {err}") from None
    eps_w, offset = cfg.cepo.eps_w, cfg.cepo.lambda_offset
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
            lambda_offset=DEFAULT_LAM_OFFSET[cfg.algo] if offset is None else offset,
        ),
        output_dir=output_dir,
    )
