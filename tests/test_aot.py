"""bench.aot: the Triton kernels compile for sm_80 and sm_90 without spills (real ptxas, no GPU),
the committed full-matrix table is current, and the README shows it.

CI compiles the ``--quick`` subset (12 compiles: forward, backward, finalize; bf16 and fp32/tf32
with every flag on; sm_80 and sm_90). The full matrix (every config, dtype, flag combination and
sm_100) is ``python -m bench.aot``; its committed table must match the kernel sources here.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import aot, aot_report

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "bench" / "results" / "cpu-amd-epyc-2c" / "aot"
HAVE_PTXAS = (importlib.util.find_spec("triton") is not None
              and Path(aot._tool("ptxas", 80)).exists())

PTXAS_LOG = """ptxas info    : Compiling entry function 'logit_grad_bwd_kernel' for 'sm_80'
ptxas info    : Function properties for logit_grad_bwd_kernel
    1456 bytes stack frame, 1488 bytes spill stores, 1380 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 1456 bytes cumulative stack size
"""


def test_ptxas_log_and_sass_are_parsed():
    assert aot.parse_ptxas(PTXAS_LOG) == dict(regs=128, stack=1456, spill_stores=1488,
                                              spill_loads=1380)
    assert aot.parse_ptxas("ptxas info : Used 40 registers")["spill_stores"] == 0
    sass = ("  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4]\n  HGMMA.64x128x16.F32.BF16 R24\n"
            "  HMMA.16816")
    assert aot.tensor_core_ops(sass) == "HGMMA 2, HMMA 1"
    assert aot.tensor_core_ops("FFMA R1, R2, R3, R4") == "-"


@pytest.mark.parametrize("regs, warps, smem, arch, expect", [
    (255, 8, 65536, 90, (1, "regs")),       # 255 → 256 regs/thread: 32 warps' worth → 1 block
    (128, 8, 0, 90, (2, "regs")),
    (64, 4, 0, 80, (8, "regs")),            # 8 warps/block... 32 warps by registers
    (32, 4, 102400, 90, (2, "smem")),       # 233472 // (102400 + 1024)
    (16, 1, 0, 80, (32, "blocks")),
])
def test_blocks_per_sm(regs, warps, smem, arch, expect):
    assert aot.blocks_per_sm(aot.ARCHS[arch], regs, warps, smem) == expect


def test_configs_are_per_architecture(monkeypatch):
    """Hopper keeps 64-wide bf16 hidden chunks in the backward; sm_80 takes 32 to stop spills."""
    from cepo_kernels.ops import triton_launch as tlm

    monkeypatch.setattr(tlm, "interpreting", lambda: False)
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    assert tlm.backward_config(4096, 151936, 2048, bf16, arch=90)["BLOCK_D"] == 64
    assert tlm.backward_config(4096, 151936, 2048, bf16, arch=80)["BLOCK_D"] == 32
    assert tlm.backward_config(4096, 151936, 2048, bf16, arch=86) == \
        tlm.backward_config(4096, 151936, 2048, bf16, arch=80)
    fwd = tlm.forward_config(4096, 151936, 2048, bf16, cpu, arch=90)
    assert (fwd["BLOCK_R"], fwd["BLOCK_V"], fwd["num_warps"], fwd["num_stages"]) == \
        (128, 128, 8, 2)
    ieee = tlm.forward_config(4096, 151936, 2048, torch.float32, cpu, arch=90, precision="ieee")
    assert ieee["BLOCK_D"] == 16


def _run_aot(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CEPO_CACHE_DIR", str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "bench.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not HAVE_PTXAS, reason="needs triton's ptxas (triton with the CUDA backend)")
def test_quick_matrix_compiles_without_spills_on_sm80_and_sm90(tmp_path):
    proc = _run_aot("--quick", "--jobs", "2", "--out", str(tmp_path / "aot"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rs, meta = aot_report.read(tmp_path / "aot")
    assert {(r["kernel"], r["arch"]) for r in rs} == {
        (k, a) for k in ("forward", "backward", "finalize") for a in ("sm_80", "sm_90")}
    for r in rs:
        assert r["status"] == "ok" and r["spill_stores"] == 0 and r["regs"] > 0, r
        assert r["smem"] <= r["smem_limit"] and r["blocks_per_sm"] >= 1, r
        if r["kernel"] != "finalize":   # the matmuls run on tensor cores
            assert r["tensor_core"].startswith("HGMMA" if r["arch"] == "sm_90" else "HMMA"), r
    assert meta["source_hash"] == aot.source_hash()


@pytest.mark.skipif(not HAVE_PTXAS, reason="needs triton's ptxas (triton with the CUDA backend)")
def test_a_spilling_config_fails_the_check(tmp_path, monkeypatch):
    """The pre-tuning sm_80 backward (64-wide hidden chunks) spills: the check must say so."""
    case = aot.Case("backward", 80, "bf16", "ieee", dict(bias=True, entropy=True, dw=True),
                    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2))
    code = ("import sys, json; from bench import aot; from dataclasses import asdict; "
            f"c = aot.Case(**{aot.asdict(case)!r}); r = aot.compile_case(c); "
            "print(json.dumps([r.status, r.spill_stores, r.problems]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    status, spills, problems = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert status == "SPILL" and spills > 0 and "spills" in problems[0]


def test_committed_table_is_current_and_clean():
    """Rerun ``python -m bench.aot`` after changing a kernel or a config: this fails until then."""
    rs, meta = aot_report.read(COMMITTED)
    assert meta["source_hash"] == aot.source_hash(), "stale: rerun python -m bench.aot"
    assert {r["arch"] for r in rs} >= {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rs} == {"forward", "backward", "finalize"}
    assert {r["dtype"] for r in rs} == {"bf16", "fp16", "fp32"}
    bad = [r for r in rs if r["status"] != "ok" or r["spill_stores"] or r["spill_loads"]]
    assert not bad, bad[:3]


def test_readme_block_is_generated_from_the_committed_table():
    """Rerun ``python -m bench.aot_report --readme README.md`` when this fails."""
    text = (REPO / "README.md").read_text()
    assert aot_report.README_BEGIN in text and aot_report.README_END in text
    block = text.split(aot_report.README_BEGIN, 1)[1].split(aot_report.README_END, 1)[0]
    assert block.strip() == aot_report.readme_block(COMMITTED).strip()


def test_source_hash_ignores_comments_but_not_code():
    """Rewording a comment in a kernel leaves the committed table current; a code change does
    not."""
    base = aot._code_only("def k(x):\n    y = x + 1  # one\n    return y\n")
    assert base == aot._code_only("def k(x):\n    # a new comment\n\n    y = x + 1  # two\n"
                                  "    return y\n")
    assert base != aot._code_only("def k(x):\n    y = x + 2  # one\n    return y\n")
    assert base != aot._code_only("def k(x):\n    y = x + 1\n    return x\n")
