"""The offline default's starting model: the tiny Qwen3-VL briefly taught the synthetic task.

A random tiny model never boxes an answer, so every group has equal rewards, A = 0 everywhere and
RL has nothing to learn from. A short supervised warm-up on the synthetic train split fixes that.
On the default chain sums (``What is 3 + 5 + 2?``) it teaches two ways to answer:

  * worked steps, ``3+5=8, 8+2=10, so \\boxed{10}.``, which never slip, for `careful_fraction`
    of the unhinted targets; the rest add all terms at once, ``3+5+2=11, so \\boxed{11}.``, and
    are off by 1 or 2 with `slip_fraction`. So the model starts partly right, groups mix right
    and wrong answers that differ in a few tokens, and RL has something to learn: to work the
    steps (one early choice of token, shared by every problem);
  * `hint_fraction` of the targets follow a teacher hint (the prompt, then ``" {answer}"`` as the
    assistant turn's first tokens) and reach the hinted answer: a true hint with worked steps, a
    wrong one with a hasty, slipped sum. So the r+ and r- teachers disagree on the token where a
    rollout turns hasty and on the answer, as a large instruction-tuned model's would, and the
    CEPO weights carry signal;
  * `boxed_fraction` of the targets box the answer, the rest state it plainly.

Other synthetic kinds (`cepo.offline.synthetic.VISUAL_KINDS`) get
``"The answer is \\boxed{X}."`` targets.

The recipe is model-agnostic: `kind` ``"text"`` warms the tiny text-only Qwen3
(`cepo.offline.tiny_text`) on the same chain sums without images (``"tiny-text"`` as a model
name), cached next to it as tiny-qwen3-text-mini-warm-v<N>.

The result is a full checkpoint (model + processor), built deterministically for a seed and cached
like `cepo.offline.tiny`: ``$CEPO_CACHE_DIR`` (default ``~/.cache/cepo``)
/tiny-qwen3-vl-mini-warm-v<N>.
``"tiny-warm"`` as a model name (registered by `cepo.offline`) builds it on first use, in about
a minute of CPU time. Build it ahead of time with::

    python -m cepo.offline.warmup [--dir DIR] [--steps N] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cepo.cache import build_once, cache_root

logger = logging.getLogger(__name__)

_RECIPE_VERSION = 2
_STAMP = "cepo_warmup.json"


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 400  # AdamW steps of `batch_size` examples
    batch_size: int = 32
    lr: float = 3e-3  # peak lr, cosine to 10% after 20 warm-up steps
    boxed_fraction: float = 0.9  # targets with the answer inside \boxed{}
    hint_fraction: float = 1 / 3  # targets that follow a teacher hint
    careful_fraction: float = 0.5  # unhinted sums worked step by step (the rest: all at once)
    slip_fraction: float = 0.6  # sums done all at once that are off by 1 or 2
    seed: int = 0  # tiny model init, target choices, batch order


KINDS = ("vl", "text")  # the tiny Qwen3-VL (cepo.offline.tiny) or the tiny text-only Qwen3


def default_warm_dir(kind: str = "vl") -> Path:
    model = "qwen3-vl" if kind == "vl" else "qwen3-text"
    return cache_root() / f"tiny-{model}-mini-warm-v{_RECIPE_VERSION}"


def build_warm_tiny(
    directory: str | os.PathLike | None = None,
    config: WarmupConfig | None = None,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    kind: str = "vl",
) -> Path:
    """Build (or reuse) the warmed-up tiny Qwen3-VL (`kind` "vl") or text-only Qwen3 ("text")
    in `directory`; returns the directory.

    `base` is the random tiny model to start from (default: `cepo.offline.tiny.build_tiny_model`'s
    cached one, or `cepo.offline.tiny_text.build_tiny_text_model`'s for "text"). Written to a
    temporary sibling and renamed into place, so concurrent processes
    (several trainer ranks, test workers) never load a half-written checkpoint.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = config or WarmupConfig()
    target = Path(directory) if directory is not None else default_warm_dir(kind)
    stamp = {"recipe": _RECIPE_VERSION, **asdict(config)}
    if kind != "vl":  # the tiny Qwen3-VL's stamp as before: its cached builds stay valid
        stamp["kind"] = kind

    def write(staging: Path) -> None:
        threads = torch.get_num_threads()
        # Tiny tensors gain nothing from threads, and OpenMP threads spin badly on a busy machine.
        torch.set_num_threads(1)
        try:
            _warm_up(staging, config, base, kind)
        finally:
            torch.set_num_threads(threads)
        logger.info("warmed-up tiny %s model written to %s", kind, target)

    return build_once(target, stamp, _STAMP, write, overwrite=overwrite)


def _warm_up(directory: Path, config: WarmupConfig, base: str | os.PathLike | None,
             kind: str = "vl") -> None:
    from cepo.batch import collate, response_labels
    from cepo.contexts import hint_ids
    from cepo.data import encode_prompt, without_images
    from cepo.models import (
        load_model,
        load_processor,
        output_head,
        response_hidden,
        save_processor_files,
    )
    from cepo.offline.synthetic import chain_solution, chain_terms, synthetic_dataset
    from cepo.offline.tiny import build_tiny_model
    from cepo.offline.tiny_text import build_tiny_text_model
    from cepo_kernels import fused_linear_logprobs

    clock = time.perf_counter()
    logger.info("building the warmed-up tiny %s model (first use only)", kind)
    if base is None:
        build = build_tiny_model if kind == "vl" else build_tiny_text_model
        base = build(vocab="mini", seed=config.seed)
    processor = load_processor(str(base))
    tokenizer = processor.tokenizer
    torch.manual_seed(config.seed)
    model = load_model(str(base), device="cpu", dtype=torch.float32).train()
    examples = synthetic_dataset("train", seed=config.seed)
    if kind == "text":
        examples = without_images(examples)
    prompts = [encode_prompt(processor, e) for e in examples]
    rng = random.Random(f"cepo-warmup/{config.seed}")
    by_kind: dict[int, list[str]] = {}
    for i, p in enumerate(prompts):
        by_kind.setdefault(i % 4, []).append(p.example.answer)  # visual kinds: wrong hints

    def row(i: int):
        """(prefix, target ids) of one training example, drawn afresh each time it is used."""
        prompt = prompts[i]
        prefix = prompt.prefix()
        hinted = rng.random() < config.hint_fraction
        terms = chain_terms(prompt.example.problem)
        if terms is not None:
            # worked steps (never slip) or all terms at once (slip with `slip_fraction`); a hint
            # (a teacher's context) comes with worked steps when true, a slipped hasty sum when
            # wrong, so the teachers disagree on the step where a rollout turns hasty
            right_hint = rng.random() < 0.5
            careful = right_hint if hinted else rng.random() < config.careful_fraction
            if careful:
                work, total = chain_solution(terms)
            else:
                slip = (not right_hint) if hinted else rng.random() < config.slip_fraction
                total = sum(terms) + (rng.choice((-2, -1, 1, 2)) if slip else 0)
                work = "+".join(map(str, terms)) + f"={total}"
            answer = str(total)
            text = f"{work}, so \\boxed{{{answer}}}." if rng.random() < config.boxed_fraction \
                else f"{work}, so {answer}."
        else:
            answer = prompt.example.answer
            if hinted:  # the hint's answer (right half the time) is the one to repeat
                answer = answer if rng.random() < 0.5 else rng.choice(by_kind[i % 4])
            text = f"The answer is \\boxed{{{answer}}}." if rng.random() < config.boxed_fraction \
                else f"The answer is {answer}."
        if hinted:
            prefix = prefix.extend(hint_ids(tokenizer, " {answer}", answer))
        return prefix, tokenizer(text, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    order: list[int] = []
    for step in range(config.steps):
        warm = min(1.0, (step + 1) / 20)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm * cosine
        if len(order) < config.batch_size:
            order += rng.sample(range(len(prompts)), len(prompts))
        batch, order = order[: config.batch_size], order[config.batch_size :]
        rows = [row(i) for i in batch]
        width = max(len(ids) for _, ids in rows)
        response = torch.full((len(rows), width), tokenizer.pad_token_id)  # [B, T]
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (_, ids) in enumerate(rows):
            response[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), 1
        inputs = collate([p for p, _ in rows], tokenizer.pad_token_id, response, mask)
        hidden = response_hidden(model, inputs, width)  # [B, T, D]
        weight, bias = output_head(model)
        labels = response_labels(response, mask)
        logprobs = fused_linear_logprobs(hidden, weight, labels, bias=bias).logprobs
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("warm-up step %d/%d: loss %.3f", step + 1, config.steps, loss.item())
    model.eval()
    model.save_pretrained(directory)
    save_processor_files(processor, str(base), directory)  # as built, byte for byte
    logger.info("warm-up done in %.0fs", time.perf_counter() - clock)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cepo.offline.warmup",
                                     description="Build the warmed-up tiny model (offline).")
    parser.add_argument("--kind", choices=KINDS, default="vl",
                        help="vl: tiny Qwen3-VL (tiny-warm); text: tiny Qwen3 (tiny-text)")
    parser.add_argument("--dir", default=None, help="output (default: in $CEPO_CACHE_DIR)")
    parser.add_argument("--steps", type=int, default=WarmupConfig.steps)
    parser.add_argument("--seed", type=int, default=WarmupConfig.seed)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_warm_tiny(
        args.dir, WarmupConfig(steps=args.steps, seed=args.seed), overwrite=args.overwrite,
        kind=args.kind,
    )
    print(path)


if __name__ == "__main__":
    main()
