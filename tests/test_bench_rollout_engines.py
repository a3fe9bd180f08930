"""``bench.rollout_engines`` without vllm: its summary statistics on a hand-made runs list, the
README paragraph against the committed results, and the paper-step estimate's arithmetic."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from bench import paper_step, rollout_engines

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _step(step: int, tokens: float, rollout: float, score: float = 0.5, update: float = 1.0,
          reward: float = 0.1, extra: float = 0.2, length: float = 100.0) -> dict:
    return {"step": step, "tokens/generated": tokens, "rollout/response_length": length,
            "time/rollout": rollout, "time/reward": reward, "time/score": score,
            "time/update": update, "time/step": rollout + reward + score + update + extra}


def _runs() -> list[dict]:
    """Two repeats per engine; step 1 of each run is a slow outlier the summary must drop."""
    def run(engine, repeat, rollouts):
        steps = [_step(1, 6400, 100.0)] + [_step(i + 2, 6400, r) for i, r in enumerate(rollouts)]
        return {"engine": engine, "repeat": repeat, "loadavg_start": "1.0 1.0 1.0",
                "steps": steps}
    return [run("hf", 0, [2.0, 2.0]), run("vllm", 0, [1.0, 1.0]),
            run("vllm", 1, [0.5, 1.5]), run("hf", 1, [4.0, 4.0])]


def test_summary_statistics_of_synthetic_runs():
    s = rollout_engines.summarize(_runs(), warmup=1)
    hf, vl = s["hf"], s["vllm"]
    # per run: 12,800 tokens over the kept steps' rollout seconds
    assert hf["rollout_tok_s_runs"]["runs"] == pytest.approx([3200.0, 1600.0])
    assert vl["rollout_tok_s_runs"]["runs"] == pytest.approx([6400.0, 6400.0])
    assert hf["rollout_tok_s_runs"]["median"] == pytest.approx(2400.0)
    assert (hf["rollout_tok_s_runs"]["min"], hf["rollout_tok_s_runs"]["max"]) == \
        pytest.approx((1600.0, 3200.0))
    # pooled: mean tokens per kept step over mean rollout seconds (3.0 s HF, 1.0 s vLLM)
    assert hf["rollout_tok_s"] == pytest.approx(6400 / 3.0)
    assert vl["rollout_speedup"] == pytest.approx(3.0)
    # ratios pair the runs of one repeat: 6400/3200 and 6400/1600
    assert vl["rollout_speedup_runs"]["runs"] == pytest.approx([2.0, 4.0])
    assert vl["rollout_speedup_runs"]["median"] == pytest.approx(3.0)
    assert hf["steps"] == vl["steps"] == 4 and hf["rollouts_per_step"] == 64
    for e in (hf, vl):
        step = e["step_s"]
        assert e["phases"]["other"]["s"] == pytest.approx(0.2)
        assert sum(p["share"] for p in e["phases"].values()) == pytest.approx(1.0)
        assert e["phases"]["rollout"]["share"] == pytest.approx(e["phases"]["rollout"]["s"] / step)
    assert hf["step_s"] == pytest.approx(3.0 + 0.1 + 0.5 + 1.0 + 0.2)


def test_summary_refuses_runs_without_kept_steps():
    runs = [r for r in _runs() if r["engine"] == "hf"]
    with pytest.raises(ValueError, match="no vllm steps"):
        rollout_engines.summarize(runs, warmup=1)


def _committed() -> pathlib.Path:
    block = rollout_engines.readme_block(ROOT / "README.md")
    found = re.search(r"`(bench/results/[^/`]+/rollout_engines)/`", block)
    assert found, "the README's rollout-engines block names no results folder"
    return ROOT / found.group(1)


def test_readme_rollout_engines_block_is_the_committed_results():
    """The README paragraph is what the committed rollout_engines.json renders to (regenerate
    with `python -m bench.rollout_engines --render-only --readme README.md`)."""
    results = _committed()
    assert rollout_engines.readme_block(ROOT / "README.md") == rollout_engines.render(results)


def test_committed_rollout_engines_run_measured_128_token_responses_on_both_engines():
    result = json.loads((_committed() / "rollout_engines.json").read_text())
    args = result["meta"]["settings"]["train_args"]
    assert args[args.index("--rollout.max_new_tokens") + 1] == "128"
    engines = [run["engine"] for run in result["runs"]]
    assert engines.count("hf") == engines.count("vllm") == result["repeats"] >= 2
    assert all(run["loadavg_start"] for run in result["runs"])
    text = " ".join(rollout_engines.render(_committed()).split())
    ratio = rollout_engines.summarize(result["runs"], result["warmup"])["vllm"]
    assert f"{ratio['rollout_speedup_runs']['median']:.2f}×" in text


def test_paper_step_estimate_arithmetic():
    # Qwen3-VL-2B's language model: about 1.7 B parameters, 112 KiB of bf16 KV per token
    assert 1.6e9 < paper_step.params() < 1.8e9
    assert paper_step.kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2
    e = paper_step.estimate()
    # decode is never faster than the host time per step or the HBM roofline of its bytes
    for engine in ("hf", "vllm"):
        assert e[engine]["rollout_s"] >= paper_step.RESPONSE * paper_step.HOST_S[engine]
        weights_only = (paper_step.RESPONSE * paper_step.params() * 2
                        / (4.8e12 * paper_step.EFFICIENCY))
        assert e[engine]["rollout_s"] > weights_only
        assert e[engine]["step_s"] == pytest.approx(
            e[engine]["rollout_s"] + e[engine]["score_s"] + e[engine]["update_s"])
    # score (3 forwards) and update (6·N·T) cost the same FLOPs: 6·N·T each
    tokens = paper_step.ROLLOUTS_PER_GPU * (paper_step.PROMPT + paper_step.RESPONSE)
    assert e["hf"]["score_s"] == pytest.approx(
        6 * paper_step.params() * tokens / (989e12 * paper_step.MFU))
    assert e["vllm"]["rollout_s"] < e["hf"]["rollout_s"]


def test_render_reads_its_figures_from_the_json(tmp_path):
    """A hand-made result renders with its own medians, ranges and load, and the markers
    round-trip through a README."""
    runs = _runs()
    for run, load in zip(runs, ("2.0", "3.5", "1.5", "2.5")):
        run["loadavg_start"] = f"{load} 1.0 1.0"
    meta = {"cores": 2, "loadavg_before": "1.00 1.00 1.00", "loadavg_after": "2.00 2.00 2.00",
            "date_utc": "2030-01-01 00:00 UTC",
            "settings": {"algo": "grpo", "model": "random",
                         "train_args": ["--rollout.max_new_tokens", "128"]}}
    result = {"command": "python -m bench.rollout_engines --steps 3 --repeats 2", "steps": 3,
              "repeats": 2, "warmup": 1, "wall_s": 90.0, "meta": meta, "runs": runs}
    (tmp_path / "rollout_engines.json").write_text(json.dumps(result))
    text = " ".join(rollout_engines.render(tmp_path).split())
    assert "rollouts at 2,400 tokens/s (median; 1,600–3,200) with HF" in text
    assert "6,400 tokens/s (median; 6,400–6,400) with vLLM" in text
    assert "3.00× (median of the runs' ratios; 2.00–4.00×)" in text
    assert "1.5–3.5 (1 min) as runs started" in text and "1.5 min on 2 shared cores" in text
    assert "at most 128 new tokens" in text and "64 rollouts" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{rollout_engines.README_BEGIN}\nold\n{rollout_engines.README_END}\nb\n")
    rollout_engines.write_readme(readme, rollout_engines.render(tmp_path))
    assert rollout_engines.readme_block(readme) == rollout_engines.render(tmp_path)
    assert readme.read_text().startswith("a\n") and readme.read_text().endswith("\nb\n")
