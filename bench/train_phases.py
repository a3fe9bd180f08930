"""``python -m bench.train_phases``: seconds and tokens/s per training phase for GRPO, RLSD and
CEPO, measured side by side, so the teachers' cost over GRPO is visible (the paper's reference
code pays about +10% wall-clock for CEPO over GRPO).

    python -m bench.train_phases                         # 12 steps x 6 runs per algorithm
    python -m bench.train_phases --quick                 # 2 steps x 1 repeat: a smoke run
    python -m bench.train_phases --steps 10 --rollout.max_new_tokens 64   # + any cepo.train flag
    python -m bench.train_phases --readme README.md      # run, then rewrite the README paragraph
    python -m bench.train_phases --render-only --readme README.md   # paragraph from --out's JSON
    python -m bench.train_phases --prompt-heavy          # prefix sharing on vs off (its module:
                                                         # bench/train_phases_prefix.py)

Every run is the offline tiny default of ``python -m cepo.train`` with the same seed (step 1's
rollouts are identical across algorithms; later ones drift apart with the policies), a constant
λ = λ0 (the default schedule reaches 0 at step 26, after which the teachers would not run),
validation off and one checkpoint at the end (outside ``time/step``). Many short runs alternate
in order (grpo, rlsd, cepo, then reversed) so a shared machine's drift hits every algorithm
alike. The first step of each run is kept in the raw numbers but left out of the summary: it
pays one-time costs (the grader's child process, first calls). Writes ``train_phases.json``
(raw steps, summary, machine) and ``train_phases.md`` (the table) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

import torch
import yaml

from bench import report
from cepo.config import RENAMED, flatten

ALGOS = ("grpo", "rlsd", "cepo")
PHASES = ("rollout", "reward", "score", "update")  # in step order; "other" is the rest
RAW_PREFIXES = ("time/", "cpu/", "tokens/")  # throughput/* = tokens / time: left out
RAW_KEYS = ("step", "reward/mean", "rollout/mixed_groups", "rollout/response_length",
            "cepo/lambda")
SETTINGS = ("model.name", "data.train", "prompts_per_step", "rollout.group_size",
            "rollout.max_new_tokens", "rollout.temperature", "optim.lr", "seed", "num_threads",
            "kernel_backend", "prefix_sharing", "lora.enabled", "teacher.micro_batch_size",
            "ppo.micro_batch_size", "ppo.mini_batches", "cepo.lambda_init",
            "cepo.lambda_warmup_steps")
README_BEGIN = "<!-- train-phases:begin (python -m bench.train_phases --readme README.md) -->"
README_END = "<!-- train-phases:end -->"
DEFAULT_OUT = report.REPO / "bench/results" / report.machine_name("cpu") / "train_phases"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """Our options; anything else is passed on to every ``cepo.train`` run."""
    p = argparse.ArgumentParser(prog="python -m bench.train_phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--repeats", type=int, default=6,
                   help="runs per algorithm (short runs, many: finer interleaving)")
    p.add_argument("--warmup", type=int, default=1,
                   help="first steps of each run left out of the summary (kept when a run has "
                        "no others)")
    p.add_argument("--quick", action="store_true", help="2 steps x 1 repeat")
    p.add_argument("--readme", type=Path, default=None,
                   help="rewrite this README's train-phases paragraph from --out's JSON")
    p.add_argument("--render-only", action="store_true",
                   help="no run: render --out's train_phases.json (to --readme, else stdout)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args, train_args = p.parse_known_args(argv)
    if args.quick:
        args.steps, args.repeats = 2, 1
    return args, train_args


def train_once(algo: str, steps: int, run_dir: Path, train_args: list[str]) -> list[dict]:
    """One ``cepo.train`` run in this process; returns its step records from metrics.jsonl, each
    with ``cpu/step``: this process's CPU seconds in the step (the grader's child not included),
    which other load on a shared machine moves far less than wall-clock (up to 3x between runs)."""
    from cepo import train
    from cepo.metrics import read

    cpu, train_step = {}, train.train_step

    def timed_step(run, step):
        clock = time.process_time()
        metrics = train_step(run, step)
        cpu[step] = time.process_time() - clock
        return metrics

    argv = ["--algo", algo, "--steps", str(steps), "--output_dir", str(run_dir),
            "--cepo.lambda_warmup_steps", "0", "--val.every", "0", "--val.before_train", "false",
            "--checkpoint.every", "0", "--log.progress", "false", *train_args]
    run_dir.mkdir(parents=True)
    with (open(run_dir / "stdout.log", "w") as log, contextlib.redirect_stdout(log),
          mock.patch.object(train, "train_step", timed_step)):
        train.main(argv)  # its config dump and summary go to the log, not our table
    return [{**r, "cpu/step": cpu[r["step"]]} for r in read(run_dir / "metrics.jsonl")
            if "time/step" in r]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per algorithm: means per step over the kept steps of all its runs, and ratios to GRPO."""
    kept = {a: [r for run in runs if run["algo"] == a for r in run["steps"] if r["step"] > warmup]
            for a in ALGOS}
    out = {}
    for algo, recs in kept.items():
        step = _mean(r["time/step"] for r in recs)
        tokens = _mean(r["tokens/generated"] for r in recs)
        phases = {}
        for ph in PHASES:
            s = _mean(r[f"time/{ph}"] for r in recs)
            done = _mean(r["tokens/update"] for r in recs) if ph == "update" else tokens
            phases[ph] = {"s": s, "tok_s": done / s if s > 0 else None, "share": s / step}
        other = step - sum(p["s"] for p in phases.values())
        phases["other"] = {"s": other, "tok_s": None, "share": other / step}
        out[algo] = {"steps": len(recs), "tokens_per_step": tokens,
                     "step_s_median": statistics.median(r["time/step"] for r in recs),
                     "cpu_step_s": _mean(r["cpu/step"] for r in recs),
                     "mixed_groups": _mean(r.get("rollout/mixed_groups", 0.0) for r in recs),
                     "phases": phases, "step_s": step, "step_tok_s": tokens / step}
    base = out["grpo"]
    grpo_score_per_token = base["phases"]["score"]["s"] / base["tokens_per_step"]
    for algo, s in out.items():
        s["vs_grpo_step"] = s["step_s"] / base["step_s"]
        s["vs_grpo_step_median"] = s["step_s_median"] / base["step_s_median"]  # spike-proof
        s["vs_grpo_cpu"] = s["cpu_step_s"] / base["cpu_step_s"]  # load-proof
        s["vs_grpo_per_token"] = ((s["step_s"] / s["tokens_per_step"])
                                  / (base["step_s"] / base["tokens_per_step"]))
        s["vs_grpo_step_per_repeat"] = [
            _mean(r["time/step"] for r in run["steps"] if r["step"] > warmup)
            / _mean(r["time/step"] for g in runs if g["algo"] == "grpo"
                    and g["repeat"] == run["repeat"] for r in g["steps"] if r["step"] > warmup)
            for run in runs if run["algo"] == algo]
        # the score phase is one fused call (student + teachers): the teachers' part is what
        # exceeds GRPO's student-only scoring cost per token
        teacher = s["phases"]["score"]["s"] - s["tokens_per_step"] * grpo_score_per_token
        s["teacher_s_est"] = 0.0 if algo == "grpo" else teacher
        s["teacher_share_est"] = s["teacher_s_est"] / s["step_s"]
    return out


def machine_info(settings: dict, load_before: str) -> dict:
    import transformers

    return {"machine": report.machine_name("cpu"), "cpu": report._cpu_model(),
            "loadavg_before": load_before, "loadavg_after": report.loadavg(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": report._git("rev-parse", "--short", "HEAD"), "settings": settings}


def settings_of(result: dict) -> dict:
    """The recorded settings under today's option names (older results used renamed ones)."""
    return {RENAMED.get(k, k): v for k, v in result["meta"]["settings"].items()}


def markdown(result: dict) -> str:
    m, s, cfg = result["meta"], result["summary"], settings_of(result)
    lines = [
        f"# Training phases: GRPO vs RLSD vs CEPO ({m['machine']})", "",
        (f"`{result['command']}`: {m['date_utc']}, {m['cpu']} ({m['cores']} cores), torch "
         f"{m['torch']}, {cfg.get('num_threads')} thread(s); {cfg.get('model.name')}, "
         f"{cfg.get('prompts_per_step')} prompts × {cfg.get('rollout.group_size')} rollouts of "
         f"≤ {cfg.get('rollout.max_new_tokens')} tokens per step, constant λ = "
         f"{cfg.get('cepo.lambda_init')}. {result['steps']} steps × {result['repeats']} run(s) "
         "per "
         f"algorithm, interleaved; means per step over {s['grpo']['steps']} steps per algorithm "
         f"(the first {result['warmup']} of each run left out); total "
         f"{result['wall_s'] / 60:.1f} min."), "",
        "Seconds per step (tokens/s) by phase, wall-clock:", "",
        ("| algo | tokens/step | mixed groups | rollout | reward | score | update | other "
         "| step |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for algo in ALGOS:
        a, ph = s[algo], s[algo]["phases"]
        cells = " | ".join(f"{p['s']:.3f}" + (f" ({p['tok_s']:.0f})" if p["tok_s"] else "")
                           for p in ph.values())  # PHASES, then other
        lines.append(f"| {algo} | {a['tokens_per_step']:.0f} | {a['mixed_groups']:.2f} | "
                     f"{cells} | {a['step_s']:.3f} ({a['step_tok_s']:.0f}) |")
    lines += [
        "", "Overhead over GRPO:", "",
        ("| algo | step time vs GRPO (per run) | median | per token | CPU s/step | CPU vs GRPO "
         "| score share of step | teachers' share (est.) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for algo in ALGOS:
        a = s[algo]
        per_run = ", ".join(f"{x:.2f}" for x in a["vs_grpo_step_per_repeat"])
        lines.append(
            f"| {algo} | {a['vs_grpo_step']:.2f}× ({per_run}) | {a['vs_grpo_step_median']:.2f}× "
            f"| {a['vs_grpo_per_token']:.2f}× | {a['cpu_step_s']:.3f} | {a['vs_grpo_cpu']:.2f}× "
            f"| {a['phases']['score']['share']:.0%} | {a['teacher_share_est']:.0%} |")
    lines += [
        "",
        ("Phases are `time/*` of `metrics.jsonl` (cepo/train.py, cepo/experience.py): rollout = "
         "generate; reward = grading + group advantages; score = old log-probs, for grpo of the "
         "student only (`score_student`: experience.py skips the teachers for grpo and λ = 0), "
         "for rlsd student + r+ teacher, for cepo student + r+ and r- teachers, one fused call "
         "per micro-batch; update = PPO; other = the rest of the step. tok/s = generated tokens "
         "(update: tokens/update) per second. Step time vs GRPO: ratio of mean wall-clock step "
         "times (per run pair in brackets); median: of median step times; per token: per "
         "generated token (response lengths differ after step 1). CPU s/step: this process's "
         "CPU seconds (grader child excluded), much less moved by other load than wall-clock. "
         "Teacher forwards skip rollouts with A = 0 (groups all right or all wrong), so their "
         "cost follows the mixed-group fraction. Teachers' share (est.): (score s − tokens × "
         "GRPO's score s per token) / step s."),
    ]
    return "\n".join(lines) + "\n"


def config_drift(settings: dict) -> list[str]:
    """The recorded settings that differ from today's ``python -m cepo.train`` default (the
    benchmark's own constant λ aside): a stale result says so in the README."""
    from cepo.config import build_config, to_dict

    now = flatten(to_dict(build_config([])))
    settings = {RENAMED.get(k, k): v for k, v in settings.items()}  # recorded before a rename
    return [f"{k} {settings[k]} (now {now.get(k)})" if k in settings
            else f"{k} not recorded (now {now.get(k)})"
            for k in SETTINGS
            if k != "cepo.lambda_warmup_steps" and settings.get(k) != now.get(k)]


def render(results: Path) -> str:
    """The README paragraph: every figure read from ``results/train_phases.json`` (no run)."""
    result = json.loads((results / "train_phases.json").read_text())
    m, s, cfg = result["meta"], result["summary"], settings_of(result)
    grpo, rlsd, cepo = (s[a] for a in ALGOS)

    def vs_grpo(a: dict) -> str:
        runs = a["vs_grpo_step_per_repeat"]
        return (f"{a['vs_grpo_step']:.2f}× a GRPO step ({a['vs_grpo_cpu']:.2f}× in CPU time; "
                f"{min(runs):.2f}–{max(runs):.2f}× run by run)")

    def seconds(phase: str) -> str:
        return " / ".join(f"{s[a]['phases'][phase]['s']:.3f}" for a in ALGOS)

    tokens, temp, lr = (cfg.get(k) for k in ("rollout.max_new_tokens", "rollout.temperature",
                                             "optim.lr"))
    rollouts = cfg["prompts_per_step"] * cfg["rollout.group_size"]
    drift = config_drift(cfg)
    load = f", load average {m['loadavg_before']} at the start" if m.get("loadavg_before") else ""
    text = (
        f"Teacher overhead, per phase (`{result['command']}`: the offline tiny run, GRPO, RLSD and "
        f"CEPO interleaved, {result['steps']} steps × {result['repeats']} runs each, constant λ = "
        f"{cfg.get('cepo.lambda_init')}, {cfg['prompts_per_step']} prompts × "
        f"{cfg['rollout.group_size']} rollouts of at most {tokens} new tokens per step, "
        + (f"temperature {temp}" if temp is not None else "temperature not recorded")
        + (f", lr {lr:g}" if lr is not None else "")
        + f"; {result['wall_s'] / 60:.1f} min on {m['cores']} shared cores{load}, "
        f"{m['date_utc']}): a CEPO step takes {vs_grpo(cepo)}, an RLSD step {vs_grpo(rlsd)}. "
        f"Rollout takes {seconds('rollout')} s per step, update {seconds('update')} s and "
        f"score {seconds('score')} s (GRPO / RLSD / CEPO): in the score phase GRPO computes only "
        f"the student's old log-probs ({grpo['phases']['score']['share']:.0%} of its step) "
        "and CEPO the student and both teachers in one fused call "
        f"({cepo['phases']['score']['share']:.0%} of its step, about "
        f"{100 * cepo['teacher_share_est']:.0f} points of it the teachers). The paper's reference "
        "code pays about +10% with 2,048-token responses, where generation dominates; responses "
        f"here are at most {tokens} tokens ({grpo['tokens_per_step'] / rollouts:.1f} on average "
        "for GRPO), so scoring weighs more (our reading, not measured). "
        + ("Measured on the current default config of `python -m cepo.train`. " if not drift
           else "Measured on a config other than today's default of `python -m cepo.train`: "
           + "; ".join(drift) + ". ")
        + f"Tables and raw numbers: `{report._rel(results)}/` (regenerate with "
        "`python -m bench.train_phases --readme README.md`; `--render-only` rewrites only this "
        "paragraph).")
    text = re.sub(r"`[^`]*`", lambda c: c.group().replace(" ", "\0"), text)  # code spans whole
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False).replace(
        "\0", " ") + "\n"


def write_readme(readme: Path, text: str) -> None:
    """Replace the text between this block's markers of ``readme``."""
    from bench.report import write_readme_section

    write_readme_section(readme, text, README_BEGIN, README_END, demote=False)


def readme_block(readme: Path) -> str:
    """The text between the markers, as `write_readme` wrote it."""
    from bench.report import read_readme_section

    return read_readme_section(readme, README_BEGIN, README_END)


def main(argv=None) -> int:
    if "--prompt-heavy" in (sys.argv[1:] if argv is None else argv):
        from bench import train_phases_prefix

        return train_phases_prefix.main(argv)
    args, train_args = parse_args(argv)
    if args.render_only:
        if train_args:
            raise SystemExit(f"--render-only runs nothing: unexpected {' '.join(train_args)}")
        text = render(args.out)
        if args.readme is None:
            sys.stdout.write(text)
        else:
            write_readme(args.readme, text)
        return 0
    warmup = min(args.warmup, args.steps - 1)
    command = " ".join(["python -m bench.train_phases", *(sys.argv[1:] if argv is None else argv)])
    runs, t0, load_before = [], time.time(), report.loadavg()
    with tempfile.TemporaryDirectory(prefix="train_phases-") as tmp:
        for rep in range(args.repeats):
            for algo in ALGOS if rep % 2 == 0 else ALGOS[::-1]:
                clock = time.time()
                records = train_once(algo, args.steps, Path(tmp) / f"{algo}-{rep}", train_args)
                steps = [{k: round(v, 6) for k, v in r.items()  # µs: the summary uses these
                          if k.startswith(RAW_PREFIXES) or k in RAW_KEYS} for r in records]
                runs.append({"algo": algo, "repeat": rep, "wall_s": time.time() - clock,
                             "steps": steps})
                print(f"  [{time.time() - t0:5.0f}s] {algo} run {rep + 1}/{args.repeats}: "
                      f"{_mean(r['time/step'] for r in steps):.3f} s/step", flush=True)
        saved = flatten(yaml.safe_load((Path(tmp) / "grpo-0" / "config.yaml").read_text()))
    result = {"command": command, "steps": args.steps, "repeats": args.repeats,
              "warmup": warmup, "wall_s": time.time() - t0,
              "meta": machine_info({k: saved.get(k) for k in SETTINGS},
                                                      load_before),
              "summary": summarize(runs, warmup), "runs": runs}
    report.save_run(args.out, "train_phases", result, markdown(result), "bench.train_phases")
    if args.readme is not None:
        write_readme(args.readme, render(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
