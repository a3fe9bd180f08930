"""``python -m bench.train_phases --prompt-heavy``: the cost of each training phase with and
without prefix sharing (`cepo/prefix.py`) in a prompt-heavy tiny configuration.

    python -m bench.train_phases --prompt-heavy                  # 4 steps x 2 runs per variant
    python -m bench.train_phases --prompt-heavy --steps 2 --repeats 1    # a smoke run
    python -m bench.train_phases --prompt-heavy --readme README.md       # run, rewrite README's
    python -m bench.train_phases --prompt-heavy --render-only --readme README.md   # paragraph

The offline tiny run of ``python -m cepo.train`` with its images enlarged to 512 × 512 pixels
(``--data.min_pixels 262144`` and the tiny processor's own size cap raised to match: 256 visual
tokens, prompts of about 340 tokens instead of 85) and up to 128 new tokens. GRPO and CEPO each run
with ``--prefix_sharing true`` and ``false``, interleaved (reversed every other repeat), constant
λ, no validation. The warmed-up tiny model answers the enlarged images with noise (every reward
0, so no group would be mixed and no teacher would run), so the teachers are made to run on every
row, the most they ever cost: advantages ±1 alternating within each group instead of GRPO's,
and r− = "0" for a group without a wrong answer. Reported per variant: score- and update-phase
seconds and tokens/s (generated tokens per score second, update tokens per update second), the
score and update speed-ups of sharing, and the CEPO-step / GRPO-step ratio with and without it.
Writes ``train_phases_prefix.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

from bench import report
from bench.train_phases import _mean, machine_info, train_once

ALGOS = ("grpo", "cepo")
SHARING = ("true", "false")
PIXELS = 512 * 512  # 32 x 32 patches of 16, merged 2 x 2: 256 visual tokens
HEAVY_ARGS = ["--data.min_pixels", str(PIXELS), "--rollout.max_new_tokens", "128"]
DEFAULT_OUT = (report.REPO / "bench/results" / report.machine_name("cpu")
               / "train_phases_prefix")
README_BEGIN = ("<!-- train-phases-prefix:begin (python -m bench.train_phases --prompt-heavy "
                "--readme README.md) -->")
README_END = "<!-- train-phases-prefix:end -->"
PROMPT: dict = {}  # prompt and visual tokens of the first training prompt, as the runs saw it


def _large_images(load_processor):
    """`cepo.train.load_processor` whose image processor keeps images up to `PIXELS` (the tiny
    model's processor caps them at 64 × 64)."""

    def load(*args, **kwargs):
        from cepo.data import encode_prompt
        from cepo.offline.synthetic import synthetic_dataset

        processor = load_processor(*args, **kwargs)
        size = processor.image_processor.size
        processor.image_processor.size = {"shortest_edge": size.shortest_edge,
                                          "longest_edge": PIXELS}
        prompt = encode_prompt(processor, synthetic_dataset("train", size=1, seed=0)[0])
        PROMPT.update(tokens=int(prompt.input_ids.numel()),
                      visual=int(prompt.mm_token_type_ids.sum()))
        return processor

    return load


def _every_row_scored():
    """Patches that make the teachers run on every rollout (see the module docstring)."""
    import torch

    from cepo import contexts, experience

    def advantages(rewards, group_size, **_):
        return torch.tensor([1.0, -1.0]).repeat((rewards.numel() + 1) // 2)[: rewards.numel()]

    real = contexts.select_wrong_answers

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) or ["0"]

    return (mock.patch.object(experience, "group_advantages", advantages),
            mock.patch.object(contexts, "select_wrong_answers", wrong))


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per variant ``algo/sharing``: mean seconds and tokens/s per phase over the kept steps;
    then the speed-ups of sharing and the CEPO / GRPO step ratios."""
    out = {}
    for algo in ALGOS:
        for share in SHARING:
            recs = [r for run in runs if (run["algo"], run["sharing"]) == (algo, share)
                    for r in run["steps"] if r["step"] > warmup]
            gen, upd = (_mean(r[k] for r in recs) for k in ("tokens/generated", "tokens/update"))
            score, update, step = (_mean(r[f"time/{k}"] for r in recs)
                                   for k in ("score", "update", "step"))
            out[f"{algo}/{share}"] = {
                "steps": len(recs), "tokens_per_step": gen, "score_s": score,
                "score_tok_s": gen / score, "update_s": update, "update_tok_s": upd / update,
                "step_s": step, "cpu_step_s": _mean(r["cpu/step"] for r in recs),
                "response_length": _mean(r["rollout/response_length"] for r in recs)}
    ratios = {}
    for algo in ALGOS:
        on, off = out[f"{algo}/true"], out[f"{algo}/false"]
        ratios[f"{algo}_score_speedup"] = off["score_s"] / on["score_s"]
        ratios[f"{algo}_update_speedup"] = off["update_s"] / on["update_s"]
        ratios[f"{algo}_step_speedup"] = off["step_s"] / on["step_s"]
    for share in SHARING:
        cepo, grpo = out[f"cepo/{share}"], out[f"grpo/{share}"]
        ratios[f"cepo_vs_grpo_step_{share}"] = cepo["step_s"] / grpo["step_s"]
        ratios[f"cepo_vs_grpo_cpu_{share}"] = cepo["cpu_step_s"] / grpo["cpu_step_s"]
    return {"variants": out, "ratios": ratios}


def markdown(result: dict) -> str:
    m, s, r = result["meta"], result["summary"]["variants"], result["summary"]["ratios"]
    p = result["prompt"]
    resp = s["cepo/true"]["response_length"]
    lines = [
        f"# Prefix sharing, prompt-heavy tiny run ({m['machine']})", "",
        (f"`{result['command']}`: {m['date_utc']}, {m['cpu']} ({m['cores']} cores, load average "
         f"{m['loadavg_before']} at the start, {m['loadavg_after']} at the end), torch "
         f"{m['torch']}. Prompts of {p['tokens']} tokens ({p['visual']} visual), responses of "
         f"{resp:.1f} tokens on average (CEPO, shared): prompt:response ≈ "
         f"{p['tokens'] / resp:.1f}:1. {result['steps']} steps × {result['repeats']} run(s) per "
         f"variant, interleaved, the first {result['warmup']} step(s) of each run left out; "
         f"total {result['wall_s'] / 60:.1f} min."), "",
        ("Teachers forced to run on every rollout (advantages ±1 alternating in each group, "
         "r− = \"0\" where a group has no wrong answer): the tiny model answers these images "
         "with noise, so no group would be mixed. Tokens/s: generated tokens per score second, "
         "update tokens per update second."), "",
        ("| algo | prefix sharing | score s (tok/s) | update s (tok/s) | step s | CPU s/step "
         "| response tokens |"),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, v in s.items():
        algo, share = key.split("/")
        lines.append(f"| {algo} | {share} | {v['score_s']:.3f} ({v['score_tok_s']:.0f}) | "
                     f"{v['update_s']:.3f} ({v['update_tok_s']:.0f}) | {v['step_s']:.3f} | "
                     f"{v['cpu_step_s']:.3f} | {v['response_length']:.1f} |")
    score_goal = "met" if r["cepo_score_speedup"] >= 2.0 else "missed"
    step_goal = "met" if r["cepo_vs_grpo_step_true"] <= 1.10 else "missed"
    lines += [
        "",
        (f"Sharing speeds up CEPO's score phase {r['cepo_score_speedup']:.2f}× (GRPO's "
         f"{r['grpo_score_speedup']:.2f}×), its update phase {r['cepo_update_speedup']:.2f}× "
         f"(GRPO's {r['grpo_update_speedup']:.2f}×), its whole step "
         f"{r['cepo_step_speedup']:.2f}×. A CEPO step takes {r['cepo_vs_grpo_step_true']:.2f}× "
         f"a GRPO step with sharing ({r['cepo_vs_grpo_cpu_true']:.2f}× in CPU time), "
         f"{r['cepo_vs_grpo_step_false']:.2f}× without ({r['cepo_vs_grpo_cpu_false']:.2f}×)."),
        "",
        (f"Goals: score phase ≥ 2× faster with sharing: {score_goal} "
         f"({r['cepo_score_speedup']:.2f}×, at prompt:response ≈ {p['tokens'] / resp:.1f}:1); "
         f"CEPO step ≤ 1.10× a GRPO step: {step_goal} "
         f"({r['cepo_vs_grpo_step_true']:.2f}×)."),
    ]
    return "\n".join(lines) + "\n"


def render(results: Path) -> str:
    """The README paragraph: every figure read from ``results/train_phases_prefix.json``."""
    result = json.loads((results / "train_phases_prefix.json").read_text())
    m, r, p = result["meta"], result["summary"]["ratios"], result["prompt"]
    resp = result["summary"]["variants"]["cepo/true"]["response_length"]
    text = (
        f"Prefix sharing in a prompt-heavy tiny run (`{result['command']}`: images of 512 × 512 "
        f"pixels, prompts of {p['tokens']} tokens ({p['visual']} visual), responses of "
        f"{resp:.0f} tokens, prompt:response ≈ {p['tokens'] / resp:.1f}:1, the teachers made to "
        f"run on every rollout; {result['steps']} steps × {result['repeats']} runs per variant "
        f"on {m['cores']} shared cores, load average {m['loadavg_before']} at the start, "
        f"{m['date_utc']}): sharing makes CEPO's score phase {r['cepo_score_speedup']:.2f}× "
        f"faster (GRPO's {r['grpo_score_speedup']:.2f}×) and its update "
        f"{r['cepo_update_speedup']:.2f}× (GRPO's {r['grpo_update_speedup']:.2f}×); a CEPO step "
        f"takes {r['cepo_vs_grpo_step_true']:.2f}× a GRPO step with sharing "
        f"({r['cepo_vs_grpo_cpu_true']:.2f}× in CPU time) and "
        f"{r['cepo_vs_grpo_step_false']:.2f}× without ({r['cepo_vs_grpo_cpu_false']:.2f}×). "
        f"Table and raw numbers: `{report._rel(results)}/`.")
    text = re.sub(r"`[^`]*`", lambda c: c.group().replace(" ", "\0"), text)  # code spans whole
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False).replace(
        "\0", " ") + "\n"


def readme_block(readme: Path) -> str:
    return report.read_readme_section(readme, README_BEGIN, README_END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_phases --prompt-heavy",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-heavy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--readme", type=Path, default=None,
                   help="rewrite this README's prefix-sharing paragraph from --out's JSON")
    p.add_argument("--render-only", action="store_true",
                   help="no run: render --out's JSON (to --readme, else stdout)")
    args, train_args = p.parse_known_args(argv)
    if args.render_only:
        text = render(args.out)
        if args.readme is None:
            sys.stdout.write(text)
        else:
            report.write_readme_section(args.readme, text, README_BEGIN, README_END,
                                        demote=False)
        return 0
    warmup = min(args.warmup, args.steps - 1)
    command = " ".join(["python -m bench.train_phases", *(sys.argv[1:] if argv is None else argv)])
    from cepo import train

    runs, t0, load_before = [], time.time(), report.loadavg()
    variants = [(a, s) for a in ALGOS for s in SHARING]
    forced_adv, forced_neg = _every_row_scored()
    with (tempfile.TemporaryDirectory(prefix="train_phases_prefix-") as tmp,
          mock.patch.object(train, "load_processor", _large_images(train.load_processor)),
          forced_adv, forced_neg):
        for rep in range(args.repeats):
            for algo, share in variants if rep % 2 == 0 else variants[::-1]:
                clock = time.time()
                extra = [*HEAVY_ARGS, "--prefix_sharing", share, *train_args]
                records = train_once(algo, args.steps, Path(tmp) / f"{algo}-{share}-{rep}", extra)
                steps = [{k: round(v, 6) for k, v in r.items()
                          if k.startswith(("time/", "cpu/", "tokens/", "rollout/"))
                          or k == "step"} for r in records]
                runs.append({"algo": algo, "sharing": share, "repeat": rep,
                             "wall_s": time.time() - clock, "steps": steps})
                print(f"  [{time.time() - t0:5.0f}s] {algo} sharing={share} run {rep + 1}/"
                      f"{args.repeats}: {_mean(r['time/step'] for r in steps):.3f} s/step",
                      flush=True)
    settings = {"extra_args": [*HEAVY_ARGS, *train_args], "image_longest_edge": PIXELS,
                "teachers": "forced on every row (advantages ±1, r- '0' when none)"}
    result = {"command": command, "steps": args.steps, "repeats": args.repeats,
              "warmup": warmup, "wall_s": time.time() - t0, "prompt": dict(PROMPT),
              "meta": machine_info(settings, load_before),
              "summary": summarize(runs, warmup), "runs": runs}
    report.save_run(args.out, "train_phases_prefix", result, markdown(result),
                    "bench.train_phases --prompt-heavy")
    if args.readme is not None:
        report.write_readme_section(args.readme, render(args.out), README_BEGIN, README_END,
                                    demote=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
