"""Smoke test of bench/ at a tiny size: every benchmarked implementation that runs here
returns the naive log-probs (so a baseline cannot silently drift), and the harness writes its CSV,
markdown and metadata. No timing is asserted: speed goals live in ``python -m bench`` only."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch

from bench import baselines as B
from bench import report, run

V, N, D = 4096, 64, 32
CPU = torch.device("cpu")
ATOL = 1e-4
# torch.compile needs 5-20 s with a cold inductor cache; Liger FLCE runs only interpreted here
SLOW = {"cce_compile", "liger_flce"}


def _require(name: str) -> B.Impl:
    impl = B.get(name)
    ok, why = impl.available(CPU)
    if not ok:
        pytest.skip(why)
    return impl


def _close(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ATOL, f"{what}: max |diff| {err:.3g} > {ATOL}"


def _check_scoring(impl: B.Impl):
    inp = B.make_inputs(N, D, V, seed=1)
    with torch.no_grad():
        got, want = impl.score(inp), B.IMPLS["naive"].score(inp)
    if impl.name == "floor":
        assert got == B.Scored(None, None, None, None, None)
        return
    for field in B.Scored._fields:
        _close(getattr(got, field), getattr(want, field), f"{impl.name} scoring {field}")


def _check_update(impl: B.Impl, weight_grad: bool):
    inp = B.make_inputs(N, D, V, seed=2)
    out = []
    for i in (impl, B.IMPLS["naive"]):
        h = inp.policy.detach().clone().requires_grad_(True)
        w = inp.weight.detach().clone().requires_grad_(weight_grad)
        lp = i.update(inp, h, w)
        out.append((lp, h.grad, w.grad))
    (lp, dh, dw), (lp_ref, dh_ref, dw_ref) = out
    assert dh is not None and dh.shape == dh_ref.shape
    assert (dw is not None) == weight_grad
    if impl.name == "floor":
        assert lp is None
        return
    _close(lp.detach(), lp_ref.detach(), f"{impl.name} log-probs")
    _close(dh, dh_ref, f"{impl.name} d hidden")
    if weight_grad:
        _close(dw, dw_ref, f"{impl.name} d weight")


@pytest.mark.parametrize("name", [n for n in B.IMPLS if n not in SLOW])
def test_scoring_matches_naive(name):
    _check_scoring(_require(name))


@pytest.mark.parametrize("weight_grad", [False, True], ids=["dh", "dh+dW"])
@pytest.mark.parametrize("name", [n for n in B.IMPLS if n not in SLOW])
def test_update_matches_naive(name, weight_grad):
    _check_update(_require(name), weight_grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_slow_impls_match_naive(name):
    """cce_compile: forward only, one compilation (~14 s with a cold inductor cache, ~3 s warm;
    its backward would add ~5 s more, and every benchmark case already compares d hidden with
    naive: ``err_vs_naive``).
    Liger FLCE runs through the Triton interpreter on CPU."""
    impl = B.get(name)
    if name == "liger_flce" and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Liger FLCE needs CUDA or TRITON_INTERPRET=1")
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed")
        impl = B.Impl(name, impl.summary, impl.logprobs)  # bypass the CUDA-only availability
    else:
        impl = _require(name)
    if name == "cce_compile":
        _check_scoring(impl)
    else:
        _check_update(impl, weight_grad=True)


def test_every_impl_is_run_or_says_why():
    for name, impl in B.IMPLS.items():
        ok, why = impl.available(CPU)
        assert ok or why, f"{name} unavailable without a reason"


def test_trl_baseline_is_what_the_grpo_trainer_calls():
    """The benchmark calls trl.kernels' function with the trainer's chunk size, read from TRL."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    spec = importlib.util.find_spec("trl.trainer.utils")
    if spec is None:
        pytest.skip("trl is not installed")
    src = open(spec.origin, encoding="utf-8").read()
    assert re.search(r"from \.\.kernels import ChunkedLogProbFunction as _ChunkedLogProbFunction",
                     src), "TRL's trainer no longer uses trl.kernels.ChunkedLogProbFunction"
    assert "_ChunkedLogProbFunction.apply(" in src
    assert B.trl_vocab_chunk() > 0


def test_harness_writes_csv_markdown_meta(tmp_path):
    # one child per implementation keeps this test short; `--isolate case` differs only in grouping
    rc = run.main(["--only", "naive,ours,liger_flce", "--workload", "scoring,update",
                   "--n", "64", "--d", str(D), "--v", str(V), "--repeats", "1,2", "--budget", "0",
                   "--out", str(tmp_path), "--device", "cpu", "--isolate", "impl"])
    assert rc == 0
    rows = report.read_csv(tmp_path / "results.csv")
    by = {(r["workload"], r["impl"]): r for r in rows}
    assert by[("scoring", "liger_flce")]["status"] == "unavailable"
    assert by[("scoring", "liger_flce")]["reason"]
    for workload in ("scoring", "update"):
        naive = by[(workload, "naive")]
        assert naive["status"] == "ok", naive["reason"]
        assert naive["mem_mib"] >= 0 and naive["time_median_s"] > 0 and naive["repeats"] >= 1
        assert naive["time_vs_naive"] == pytest.approx(1.0)
        assert naive["load_before"] >= 0 and naive["load_after"] >= 0
        if by[(workload, "ours")]["status"] != "unavailable":
            assert by[(workload, "ours")]["status"] == "ok", by[(workload, "ours")]["reason"]
            assert by[(workload, "ours")]["err_vs_naive"] <= ATOL
    md = (tmp_path / "results.md").read_text()
    assert "### Goals" in md and "| naive |" in md and "liger_flce" in md
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["versions"]["torch"] and meta["config"]["n"] == [64]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "memory_vs_n.png").stat().st_size > 0
        assert (tmp_path / "time_vs_n.png").stat().st_size > 0


def test_readme_section_is_replaced_between_markers(tmp_path):
    from bench.report import README_BEGIN, README_END, write_readme_section

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nintro\n{README_BEGIN}\nold table\n{README_END}\n## After\n")
    write_readme_section(readme, "## Benchmark: x\n| a |\n|---|\n")
    text = readme.read_text()
    assert "old table" not in text and "### Benchmark: x" in text
    assert text.startswith("# Title\nintro\n") and text.endswith(f"{README_END}\n## After\n")


def test_readme_bench_section_is_the_committed_results(tmp_path):
    """The README's benchmark block is what ``python -m bench.report`` makes of the committed
    CPU results (regenerate both together)."""
    from pathlib import Path

    from bench.report import README_BEGIN, README_END, write_readme_section

    repo = Path(__file__).resolve().parents[1]
    results = repo / "bench/results/cpu-amd-epyc-2c"
    rows = report.read_csv(results / "results.csv")
    meta = json.loads((results / "meta.json").read_text())
    readme = (repo / "README.md").read_text()
    fresh = tmp_path / "README.md"
    fresh.write_text(readme)
    write_readme_section(fresh, report.markdown(rows, meta, img_prefix=str(
        results.relative_to(repo)) + "/"))
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block == fresh.read_text().split(README_BEGIN, 1)[1].split(README_END, 1)[0], (
        "README benchmark section is stale: run python -m bench.report "
        "bench/results/cpu-amd-epyc-2c --prefix bench/results/cpu-amd-epyc-2c/ --readme README.md")
    assert all(r["repeats"] >= 3 for r in rows if r["status"] == "ok"), "fewer than 3 repeats"
