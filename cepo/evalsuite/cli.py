"""``python -m cepo.eval --suite paper`` and ``python -m cepo.eval --compare A B``.

    python -m cepo.eval --suite paper --checkpoint runs/cepo-2b            # lmms-eval + vLLM (GPU)
    python -m cepo.eval --suite paper --checkpoint runs/cepo-2b --samples 4
    python -m cepo.eval --suite paper --checkpoint runs/cepo-2b --data-dir bench/  # native, offline
    python -m cepo.eval --compare runs/cepo-2b runs/grpo-2b               # paired A - B ± 95% CI

Results go to ``<checkpoint>/eval-paper/`` (lmms-eval) or ``<checkpoint>/eval-paper-native/``:
``results.json`` (every question's k scores), ``summary.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import cepo.offline  # noqa: F401 - registers the offline kit's names (tiny-warm)
from cepo.evalsuite import report
from cepo.evalsuite.benchmarks import PAPER_SETTINGS, SamplingSettings, select

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cepo.eval",
        description="The paper's evaluation (DynaMath, LogicVista, MathVision-testmini, MMMU-val, "
        "WeMath-testmini) with 95% confidence intervals, or a paired comparison of two runs.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--suite", choices=["paper"], help="run the paper's five benchmarks")
    mode.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                      help="paired difference A - B from two runs' saved suite results")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint or run dir (LoRA adapters are merged)")
    src.add_argument("--model", help="a model without a run: hub id, dir, tiny, tiny-warm")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir",
                   help="local benchmark copies (<name>.parquet|jsonl): score natively, offline")
    p.add_argument("--samples", type=int, default=1, help="samples per question (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sample j: seed + j)")
    p.add_argument("--benchmarks", nargs="+", help="a subset: dynamath logicvista mathvision "
                   "mmmu wemath (default: all)")
    p.add_argument("--limit", type=int, help="first N questions per benchmark (quick checks)")
    p.add_argument("--max_new_tokens", type=int, default=PAPER_SETTINGS.max_new_tokens,
                   help="default: the paper's 32000")
    p.add_argument("--batch_size", type=int, help="prompts per generate call (native: 8, "
                   "lmms-eval: 64)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--device", default="auto", help="native path: auto, cpu or cuda")
    p.add_argument("--num_threads", type=int, help="native path on CPU: torch threads")
    p.add_argument("--output", help="output directory (needed with --model)")
    return p


def main(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compare:
        a, b = (report.load(x) for x in args.compare)
        diff = report.compare(a, b)
        print(report.compare_table(a, b, diff))
        return diff
    for name, value in (("--samples", args.samples), ("--max_new_tokens", args.max_new_tokens),
                        ("--limit", args.limit), ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if not (args.checkpoint or args.model):
        raise SystemExit("--suite paper needs --checkpoint RUN or --model NAME")
    if args.model and not args.output:
        raise SystemExit("--suite paper --model needs --output DIR for its results")
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    benchmarks = select(args.benchmarks)
    native = args.data_dir is not None
    if args.checkpoint:
        from cepo.checkpoint import resolve_checkpoint_path

        ckpt = resolve_checkpoint_path(args.checkpoint)
        out = Path(args.output) if args.output else ckpt / report.EVAL_DIRS[int(native)]
    else:
        ckpt, out = None, Path(args.output)
    if native:
        scores, name, extra = _native(args, ckpt, benchmarks, settings)
    else:
        from cepo.evalsuite import lmms

        lmms.check_installed()  # before merging: a missing install must not cost a merge
        name, model_path = _served_model(args, ckpt, out)
        scores = lmms.run(model_path, out, benchmarks, samples=args.samples, seed=args.seed,
                          settings=settings, batch_size=args.batch_size or 64, limit=args.limit,
                          tensor_parallel_size=args.tensor_parallel_size)
        extra = {"served_model": model_path}
    results = report.make_results(
        backend="native" if native else "lmms-eval", model=name,
        checkpoint=str(ckpt) if ckpt else None, samples=args.samples, seed=args.seed,
        settings={**settings.to_dict(), "limit": args.limit}, scores=scores, extra=extra,
    )
    path = report.save(results, out)
    summary = report.summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = report.table(results, summary)
    (out / "table.md").write_text(text)
    print(text)
    logger.info("per-question results: %s", path)
    return summary


def _base_name(ckpt: Path) -> str:
    from cepo.config import from_yaml

    return from_yaml(ckpt / "config.yaml").model.name


def _served_model(args, ckpt: Path | None, out: Path) -> tuple[str, str]:
    """(model name for the table, directory or hub id vLLM loads); a LoRA run is merged."""
    if ckpt is None:
        from cepo.models import resolve_model_dir

        return args.model, resolve_model_dir(args.model)
    name = _base_name(ckpt)
    if not (ckpt / "adapter_model.safetensors").is_file():
        return name, str(ckpt)  # full fine-tuning: the checkpoint is a complete model
    merged = out / "merged-model"
    if (merged / "cepo_config.yaml").is_file():  # written last by merge_adapter
        logger.info("reusing the merged model in %s", merged)
    else:
        from cepo.lora import merge_adapter

        merge_adapter(ckpt, merged)
    return name, str(merged)


def _native(args, ckpt: Path | None, benchmarks, settings: SamplingSettings):
    from cepo.evalsuite import native
    from cepo.grading import Grader
    from cepo.models import load_model, load_processor

    local = {b.key: native.find_local(args.data_dir, b) for b in benchmarks}
    if not any(local.values()):
        raise SystemExit(f"--data-dir {args.data_dir}: none of "
                         f"{[b.key + '.parquet|jsonl' for b in benchmarks]} found")
    missing = [k for k, p in local.items() if p is None]
    if missing:
        logger.warning("no local copy of %s in %s: not scored", missing, args.data_dir)
    items = {b.key: native.load_items(local[b.key], b, limit=args.limit)
             for b in benchmarks if local[b.key]}  # every file checked before the model loads
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cpu" and args.num_threads:
        torch.set_num_threads(args.num_threads)
    if ckpt is not None:
        from cepo.config import from_yaml
        from cepo.lora import load_checkpoint_model

        name = _base_name(ckpt)
        model = load_checkpoint_model(from_yaml(ckpt / "config.yaml"), ckpt, device)
    else:
        name, model = args.model, load_model(args.model, device=device)
    processor = load_processor(name)
    torch.manual_seed(args.seed)
    grader = Grader()
    scores, too_long = {}, {}
    try:
        for key, its in items.items():
            logger.info("%s: %d questions x %d sample(s)", key, len(its), args.samples)
            scores[key], too_long[key] = native.score_items(
                its, model, processor, settings=settings, samples=args.samples, grader=grader,
                batch_size=args.batch_size or 8)
    finally:
        grader.close()
    extra = {"data": {k: str(local[k]) for k in items}, "too_long": too_long,
             "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return scores, name, extra
