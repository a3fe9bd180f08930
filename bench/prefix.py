"""``python -m bench.prefix``: score-phase tokens/s with and without shared prefixes.

A prompt-heavy tiny configuration: P prompts of ``--prompt_tokens`` tokens, G rollouts each with
responses of ``--response_tokens`` (lengths drawn between half and all of it), and the three
streams of CEPO scoring per rollout (student, r+ teacher, r- teacher; hints of a few tokens).
Unshared is today's layout (every row ``[pad | prompt (+ hint) | response]``, micro-batches of
``--micro_batch_size`` rows, student rows in one forward and all teacher rows in another);
shared encodes each prompt once (`cepo.prefix`) and runs the 3·G continuations against it. Both
end in `fused_linear_logprobs`, and the first repeat checks they agree.

Repeats alternate the order (shared first, then unshared first, ...) so a shared machine's drift
hits both alike; the load average is recorded before and after. Prints one JSON object (and
writes it to ``--out`` if given); nothing is written to the README.

    python -m bench.prefix                       # text model, 256-token prompts, G = 8
    python -m bench.prefix --model vl --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cepo.batch import Prefix, collate
from cepo.models import output_head, response_hidden
from cepo.prefix import encode_prefix, resolve_prefix_sharing, shared_response_hidden
from cepo_kernels import fused_linear_logprobs

IGNORE = -100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("text", "vl"), default="text",
                   help="text: a Qwen3 causal LM built from a config; vl: the tiny Qwen3-VL")
    p.add_argument("--hidden", type=int, default=256, help="text model hidden size")
    p.add_argument("--layers", type=int, default=4, help="text model layers")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--response_tokens", type=int, default=96)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.prompt_tokens < 2 or args.response_tokens < 2:
        p.error("need --repeats >= 1, --prompt_tokens >= 2 and --response_tokens >= 2")
    return args


def build_model(args) -> tuple[torch.nn.Module, list[Prefix], int]:
    """The model, P prompt prefixes of ``prompt_tokens`` tokens, and a bound for random ids."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.model == "text":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(args.seed)
        heads = max(args.hidden // 64, 1)
        config = Qwen3Config(vocab_size=4096, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                             num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                             head_dim=64, max_position_embeddings=4096,
                             tie_word_embeddings=False, attn_implementation="sdpa")
        model, bound = Qwen3ForCausalLM(config).eval(), 4096
        prompts = [Prefix(torch.randint(1, bound, (args.prompt_tokens,), generator=gen),
                          torch.zeros(args.prompt_tokens, dtype=torch.int32))
                   for _ in range(args.prompts)]
        return model, prompts, bound
    from cepo.data import VISUAL_KINDS, encode_prompt, synthetic_dataset
    from cepo.models import load_model, load_processor

    model, processor = load_model("tiny", device="cpu"), load_processor("tiny")
    bound = 300  # mini vocabulary ids below the special tokens
    examples = synthetic_dataset("train", size=args.prompts, seed=args.seed, kinds=VISUAL_KINDS)
    prompts = []
    for example in examples:
        prefix = encode_prompt(processor, example).prefix()
        extra = max(args.prompt_tokens - prefix.input_ids.numel(), 0)  # lengthen with text
        prompts.append(prefix.extend(torch.randint(1, bound, (extra,), generator=gen)))
    return model, prompts, bound


def make_rollouts(args, prompts, bound):
    """Per prompt: response ids/mask [G, T] (right-padded) and the r+ / r- hints."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    g, t = args.group_size, args.response_tokens
    out = []
    for _ in prompts:
        lengths = torch.randint(t // 2, t + 1, (g,), generator=gen)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), torch.randint(1, bound, (g, t), generator=gen), 0)
        hints = [torch.randint(1, bound, (n,), generator=gen) for n in (3, 5)]
        out.append((ids, mask, hints))
    return out


def _unshared_hidden(model, prefixes, ids, mask):
    inputs = collate(prefixes, 0, ids, mask).to(output_head(model).weight.device)
    return response_hidden(model, inputs, ids.shape[1])


def _logprobs(model, hidden, ids, mask):
    weight, bias = output_head(model)
    labels = ids.masked_fill(~mask.bool(), IGNORE).to(weight.device)
    return fused_linear_logprobs(hidden, weight, labels, bias=bias, backend="torch").logprobs


def score_unshared(model, prompts, rollouts, mb):
    """Every stream's log-probs, rows re-encoding their prompt (today's scoring layout)."""
    results = []
    rows = [(p, ids[i], mask[i], hints) for p, (ids, mask, hints) in zip(prompts, rollouts)
            for i in range(ids.shape[0])]
    for start in range(0, len(rows), mb):
        chunk = rows[start:start + mb]
        ids = torch.stack([r[1] for r in chunk])
        mask = torch.stack([r[2] for r in chunk])
        student = _unshared_hidden(model, [r[0] for r in chunk], ids, mask)
        teachers = _unshared_hidden(model, [r[0].extend(r[3][k]) for k in (0, 1) for r in chunk],
                                    ids.repeat(2, 1), mask.repeat(2, 1))
        results.append(_logprobs(model, torch.cat([student, teachers]), torch.cat([ids, ids, ids]),
                                 torch.cat([mask, mask, mask])))
    return results


def score_shared(model, prompts, rollouts, mb):
    """The same log-probs with each prompt encoded once and shared by its 3·G continuations."""
    results = []
    for prefix, (ids, mask, hints) in zip(prompts, rollouts):
        encoded = encode_prefix(model, prefix)
        g = ids.shape[0]
        contexts = [ids.new_zeros(0)] * g + [hints[0]] * g + [hints[1]] * g
        all_ids, all_mask = ids.repeat(3, 1), mask.repeat(3, 1)
        hidden = shared_response_hidden(model, encoded, all_ids, all_mask, contexts=contexts,
                                        micro_batch_size=mb)
        results.append(_logprobs(model, hidden, all_ids, all_mask))
    return results


def _gather(results, rollouts):
    """Both paths return [student; pos; neg] blocks (per micro-batch or per group): flatten to
    (rollout, stream) order, valid tokens only, for the agreement check."""
    lp = torch.cat([r.view(3, -1, r.shape[-1]).transpose(0, 1).reshape(-1, r.shape[-1])
                    for r in results])
    mask = torch.cat([m for _, m, _ in rollouts]).repeat_interleave(3, 0).bool()
    return lp[mask.to(lp.device)].cpu()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prompts, bound = build_model(args)
    device = torch.device(args.device)
    model.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rollouts = make_rollouts(args, prompts, bound)
    use, line = resolve_prefix_sharing("auto", model)
    if not use:
        raise SystemExit(line)
    scored = 3 * sum(int(m.sum()) for _, m, _ in rollouts)  # response tokens, three streams
    load_before = os.getloadavg()
    runs = {"shared": score_shared, "unshared": score_unshared}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    with torch.no_grad():
        for name, fn in runs.items():  # warm-up, and the agreement check
            outputs[name] = _gather(fn(model, prompts, rollouts, args.micro_batch_size),
                                    rollouts)
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                sync()
                clock = time.perf_counter()
                runs[name](model, prompts, rollouts, args.micro_batch_size)
                sync()
                times[name].append(time.perf_counter() - clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "response_tokens_scored": scored,
        "seconds": times,
        "median_s": med,
        "tokens_per_s": {k: scored / v for k, v in med.items()},
        "speedup": med["unshared"] / med["shared"],
        "max_abs_logprob_diff": float((outputs["shared"] - outputs["unshared"]).abs().max()),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
