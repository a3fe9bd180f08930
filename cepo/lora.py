"""What is trained: LoRA adapters (peft) or the full model, and merging adapters for serving.

LoRA follows docs/METHOD.md, "Presets": rank 16, α 32 (paper) or 64 (reference scripts), dropout 0,
every linear layer of the language model (peft's ``all-linear``, which never adapts the lm_head,
so the fused log-prob kernels keep reading one weight), the vision tower excluded by the regex
``.*visual.*``. Full fine-tuning trains every parameter, the vision tower frozen by default.

Merging (`merge_adapter`, or ``python -m cepo.lora --checkpoint DIR --output DIR``) folds a saved
adapter into its base model and writes a plain Hugging Face checkpoint (safetensors + config +
processor) that any Qwen3-VL server loads without peft.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from cepo.config import AdapterConfig, ModelConfig
from cepo.models import unwrap_model

logger = logging.getLogger(__name__)


@contextmanager
def quiet_peft():
    """peft reads a transformers property renamed in 5.x (``is_gradient_checkpointing``): a
    FutureWarning on every load that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def load_adapter(base: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """`base` with the saved peft adapter of checkpoint directory `path`."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(base, str(path))


def apply_lora(model: torch.nn.Module, settings: AdapterConfig,
               base_name: str | None = None) -> torch.nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters (only the adapters require grad).

    `base_name` (the configured model name, e.g. ``tiny-warm`` or a hub id) is what saved
    adapters record as their base, instead of the resolved, machine-specific local path."""
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        exclude_modules=settings.exclude_modules or None,
        bias="none",
    )
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules={settings.target_modules} matched no module of "
                         f"the model ({err})") from None
    if base_name:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    if not adapted:
        raise ValueError(
            f"lora.target_modules={settings.target_modules} matched no module of the model"
        )
    return peft_model


def prepare_trainable(model: torch.nn.Module, lora: AdapterConfig, mcfg: ModelConfig):
    """The model to train: LoRA-wrapped, or the full model with the vision tower optionally
    frozen. Returns the model with exactly its trainable parameters requiring grad."""
    if lora.enabled:
        return apply_lora(model, lora, base_name=mcfg.name)
    model.requires_grad_(True)
    if mcfg.freeze_vision:
        visual = getattr(unwrap_model(model).model, "visual", None)
        if visual is not None:
            visual.requires_grad_(False)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D)."""
    decay = [p for p in trainable_parameters(model) if p.ndim >= 2]
    no_decay = [p for p in trainable_parameters(model) if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trainable_parameters(model)), total


# --------------------------------------------------------------------------- merging


def readable_by_all(directory: Path) -> None:
    """Give the files of `directory` the usual mode (0644 under the common umask 022): the
    safetensors writer creates 0600 files, which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~umask)


def merge_adapter(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Fold a checkpoint's LoRA adapter into its base model; write a standalone model to `output`.

    `checkpoint` is a checkpoint directory or a run directory (its latest checkpoint). The base
    model is the one named in the checkpoint's config.yaml. Weights keep the base's dtype.
    """
    import cepo.offline  # noqa: F401 - registers the offline kit's names (tiny-warm)
    from cepo.checkpoint import resolve_checkpoint_path
    from cepo.config import from_yaml
    from cepo.models import load_model, load_processor, resolve_model_dir, save_processor_files

    path = resolve_checkpoint_path(checkpoint)
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (a full fine-tuning "
                                "checkpoint is already a complete model)")
    cfg = from_yaml(path / "config.yaml")
    base_path = resolve_model_dir(cfg.model.name)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(cfg.model.dtype)
    base = load_model(base_path, device="cpu", dtype=dtype)
    merged = load_adapter(base, path).merge_and_unload()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    save_processor_files(load_processor(base_path), base_path, out)
    shutil.copy2(path / "config.yaml", out / "cepo_config.yaml")
    readable_by_all(out)
    logger.info("merged %s into %s -> %s", path, cfg.model.name, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cepo.lora",
        description="Merge a CEPO run's LoRA adapter into its base model (safetensors).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(merge_adapter(args.checkpoint, args.output))


if __name__ == "__main__":
    main()


def load_checkpoint_model(cfg, path: Path, device: str) -> torch.nn.Module:
    """A checkpoint's policy for evaluation: base model + adapter, or the saved full model."""
    from cepo.models import load_model

    if (path / "adapter_model.safetensors").is_file():
        base = load_model(cfg.model.name, device=device)
        return load_adapter(base, path).eval()
    return load_model(str(path), device=device)
