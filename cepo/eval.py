"""Validation and ``python -m cepo.eval``: accuracy and format rate of a policy on a split.

Sampling follows the validation settings of docs/METHOD.md, "Presets" (T 0.6, top_p 0.95, one
sample per prompt) unless told otherwise. The trainer calls `evaluate` every ``val.every`` steps;
the command line scores a saved run:

    python -m cepo.eval --checkpoint runs/tiny-cepo                 # its latest checkpoint
    python -m cepo.eval --checkpoint runs/tiny-cepo/checkpoints/step-000010 --split val --limit 64
    python -m cepo.eval --model tiny-warm --data synthetic --split val   # a model without a run
    python -m cepo.eval --model runs/tiny-cepo/merged                    # a merged LoRA run

The data, split, base model and token limits default to the run's own config (a merged folder
keeps it as cepo_config.yaml). Results are printed and written as JSON next to the checkpoint
(or to ``--output``). A model or data set that is not available is one line saying what to pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import cepo.offline  # noqa: F401 - registers the offline kit's names (tiny-warm, synthetic)
from cepo.data import Example, encode_prompts
from cepo.errors import UserError
from cepo.grading import Grader
from cepo.reward import compute_rewards
from cepo.rollout import HFRolloutEngine, RolloutConfig

logger = logging.getLogger(__name__)
MERGED_CONFIG = "cepo_config.yaml"  # written by cepo.lora next to a merged model


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor,
    examples: Sequence[Example],
    *,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 2048,
    max_prompt_tokens: int = 768,
    batch_size: int = 64,
    grader: Grader,
    accelerator=None,
) -> dict[str, float]:
    """One sample per example; mean reward, accuracy, format rate and response length.

    With an `accelerator` of several processes each scores its share of `examples` (every
    W-th one) and the sums are reduced, so all processes return the same numbers.
    """
    clock = time.perf_counter()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(examples)[rank::world]
    prompts, _ = encode_prompts(processor, mine, max_prompt_tokens=max_prompt_tokens)
    config = RolloutConfig(group_size=1, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    engine = HFRolloutEngine(model, processor)
    sums = torch.zeros(5, dtype=torch.float64)  # reward, accuracy, format, length, count
    for start in range(0, len(prompts), batch_size):
        rollouts = engine.generate(prompts[start : start + batch_size], config)
        rewards = compute_rewards(rollouts.texts, rollouts.ground_truths(), grader)
        sums += torch.tensor([
            rewards.reward.sum().item(),
            rewards.accuracy.sum().item(),
            rewards.format.sum().item(),
            rollouts.response_mask.sum().item(),
            float(len(rollouts.texts)),
        ], dtype=torch.float64)
    if world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    count = max(sums[4].item(), 1.0)
    return {
        "val/reward": sums[0].item() / count,
        "val/accuracy": sums[1].item() / count,
        "val/format": sums[2].item() / count,
        "val/response_length": sums[3].item() / count,
        "val/examples": sums[4].item(),
        "time/val": time.perf_counter() - clock,
    }


_RUN = object()  # default of --min_pixels / --max_pixels: the run's value


def _pixels(text: str) -> int | None:
    if text.lower() in ("none", "null"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a pixel count must be >= 1 (or none), got {text}")
    return value


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in ("--suite", "--compare") for a in argv):
        from cepo.evalsuite.cli import main as suite_main

        return suite_main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m cepo.eval",
        description="Score a saved CEPO run (or any model) on a split: accuracy, format rate. "
        "The paper's five benchmarks with error bars: --suite paper / --compare A B "
        "(python -m cepo.eval --suite paper --help).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint dir, or a run dir (latest checkpoint)")
    source.add_argument("--model", help="a model without a run: hub id, dir, tiny, tiny-warm")
    parser.add_argument("--data", help="data source (default: the run's validation source)")
    parser.add_argument("--split", help="split (default: the run's validation split)")
    parser.add_argument("--limit", type=int, help="first N examples only")
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy (default 0.6)")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--max_new_tokens", type=int, help="default: the run's rollout limit")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, help="CPU threads (default: the run's)")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--min_pixels", type=_pixels, default=_RUN,
                        help="images resized to at least this many pixels (default: the run's "
                        "data.min_pixels, or the paper preset's; none: the processor's own)")
    parser.add_argument("--max_pixels", type=_pixels, default=_RUN,
                        help="images resized to at most this many pixels (default: as above)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except UserError as err:
        raise SystemExit(f"{err.label}: {err}") from None


def _run(args: argparse.Namespace) -> dict[str, float]:
    from cepo.config import TrainConfig, finalize, from_yaml
    from cepo.data import load_split
    from cepo.models import load_model, load_processor

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if args.checkpoint:
        from cepo.checkpoint import resolve_checkpoint_path

        try:
            path = resolve_checkpoint_path(args.checkpoint)
        except FileNotFoundError as err:
            raise UserError(f"{err}; pass a run directory or one of its checkpoints") from None
        cfg = from_yaml(path / "config.yaml")
        output = Path(args.output) if args.output else path / "eval.json"
    else:
        saved = Path(args.model) / MERGED_CONFIG  # a merged run keeps its config
        cfg = from_yaml(saved) if saved.is_file() else finalize(TrainConfig())
        output = Path(args.output) if args.output else None
    threads = args.num_threads if args.num_threads is not None else cfg.num_threads
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    # processor and data before the model: what is missing is said before the slow part
    name = args.model or cfg.model.name
    low = cfg.data.min_pixels if args.min_pixels is _RUN else args.min_pixels
    high = cfg.data.max_pixels if args.max_pixels is _RUN else args.max_pixels
    processor = load_processor(name, min_pixels=low, max_pixels=high)  # the run's image sizes
    source = args.data or cfg.data.val or cfg.data.train
    split = args.split or cfg.data.val_split
    limit = args.limit or (cfg.data.val_limit if not args.split else None)
    try:
        examples = load_split(source, split, limit=limit, seed=cfg.seed, processor=processor)
    except UserError:
        raise
    except (FileNotFoundError, KeyError) as err:  # a directory without the split, no such split
        raise UserError(f"{err.args[0] if err.args else err}; pass --data a local file or "
                        "directory and --split one it holds, or --data synthetic") from None
    if args.checkpoint:
        from cepo.lora import load_checkpoint_model

        model = load_checkpoint_model(cfg, path, device)
    else:
        model = load_model(args.model, device=device)
    torch.manual_seed(args.seed)
    grader = Grader(timeout_s=cfg.grader_timeout_s, batch_budget_s=cfg.grader_batch_budget_s,
                    backend=cfg.grader)
    try:
        result = evaluate(
            model, processor, examples,
            temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens,
            max_prompt_tokens=cfg.rollout.max_prompt_tokens,
            batch_size=args.batch_size, grader=grader,
        )
    finally:
        grader.close()
    result = {"source": source, "split": split, "checkpoint": args.checkpoint,
              "model": name, **result}
    print(json.dumps(result, indent=2))
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
