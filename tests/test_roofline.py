"""bench.roofline's FLOP and byte formulas against direct counts on small shapes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import roofline

N, D, V, S = 37, 24, 101, 3          # ragged against the blocks below
BR, BN, BV = 16, 8, 32


def _naive_flops(workload: str) -> int:
    """FLOPs torch counts for the materialised-logits computation (forward [+ backward])."""
    h = torch.randn(S if workload == "scoring" else 1, N, D, requires_grad=workload != "scoring")
    w = torch.randn(V, D, requires_grad=workload == "update_w")
    y = torch.randint(0, V, (N,))
    with FlopCounterMode(display=False) as fc:
        lp = torch.log_softmax(h @ w.T, -1).gather(-1, y.expand(h.shape[0], N)[..., None])
        if workload != "scoring":
            lp.sum().backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("workload", ["scoring", "update", "update_w"])
def test_flops_match_torch_flop_counter(workload):
    c = roofline.counts(workload, N, D, V, s=S)
    assert c["useful_flops"] == _naive_flops(workload)
    recompute = 0 if workload == "scoring" else 2 * N * D * V
    assert c["flops"] == c["useful_flops"] + recompute


def _simulate_tiles(workload: str, b: int) -> tuple[int, int]:
    """Walk the kernels' grids: bytes of unmasked tile loads, bytes of atomic adds."""
    def fwd(rows):
        loads = 0
        for r0 in range(0, rows, BR):
            nr = min(BR, rows - r0)
            for v0 in range(0, V, BV):
                nv = min(BV, V - v0)
                for d0 in range(0, D, 16):                 # logit_tile: h and w per D chunk
                    nd = min(16, D - d0)
                    loads += (nr * nd + nv * nd) * b
        return loads

    if workload == "scoring":
        return fwd(S * N), 0
    loads, atomic = fwd(N), 0
    for n0 in range(0, N, BN):
        nn = min(BN, N - n0)
        for v0 in range(0, V, BV):
            nv = min(BV, V - v0)
            loads += (nn + nv) * D * b                     # recompute z
            loads += nv * D * b                            # W for dH
            atomic += nn * D * 4                           # dH
            if workload == "update_w":
                loads += nn * D * b                        # H for dW
                atomic += nv * D * 4                       # dW
    return loads, atomic


@pytest.mark.parametrize("workload", ["scoring", "update", "update_w"])
@pytest.mark.parametrize("b", [2, 4])
def test_tile_traffic_matches_a_walk_of_the_grid(workload, b):
    c = roofline.counts(workload, N, D, V, s=S, b=b, block_r=BR, block_n=BN, block_v=BV)
    assert (c["bytes_tile"], c["bytes_atomic"]) == _simulate_tiles(workload, b)


@pytest.mark.parametrize("workload", ["scoring", "update", "update_w"])
def test_compulsory_bytes_are_the_kernels_tensors(workload):
    """Each kernel's inputs and outputs, listed as the tensors the launch code allocates."""
    bf16, f32, i32 = torch.bfloat16, torch.float32, torch.int32
    def t(*shape, dt=f32):
        return torch.empty(*shape, dtype=dt).nbytes
    rows = S * N if workload == "scoring" else N
    part = t(3, 1, rows)                                   # m, d, t; one split
    fwd = t(rows, D, dt=bf16) + t(V, D, dt=bf16) + t(N, dt=i32) + part
    if workload == "scoring":
        fin = part + t(N, dt=i32) + t(N) + t(N, dt=torch.int8) + t(3, N) + 3 * t(N)
        expect = fwd + fin
    else:
        fin = part + t(N, dt=i32) + t(2, N)                # → target, lse
        bwd = t(N, D, dt=bf16) + t(V, D, dt=bf16) + t(N, dt=i32) + 2 * t(N) + t(N, D)
        bwd += t(V, D) if workload == "update_w" else 0
        expect = fwd + fin + bwd
    assert roofline.counts(workload, N, D, V, s=S)["bytes_min"] == expect


def test_expected_times_follow_the_roofline():
    h200 = next(g for g in roofline.GPUS if g.name == "H200")
    c = roofline.counts("scoring", 32768, 2048)
    e = roofline.expected(c, h200)
    assert c["flops"] == 2 * 3 * 32768 * 2048 * 151936
    assert e["bound"] == "compute" and e["t_roof"] == pytest.approx(c["flops"] / 989e12)
    assert e["t_goal"] == pytest.approx(e["t_roof"] / 0.7)
    small = roofline.counts("update_w", 1, 2048)       # one token: W dominates, memory bound
    assert roofline.expected(small, h200)["bound"] == "memory"
    with pytest.raises(ValueError, match="workload"):
        roofline.counts("train", 1, 1)


def test_measured_times_are_judged_against_the_model():
    """The bench report's analytic section: fraction of the roofline reached and the 70% goal."""
    c = roofline.counts("scoring", 16384, 2048)
    t_peak = c["flops"] / 989e12
    fast = dict(workload="scoring", n=16384, d=2048, v=151936, dtype="bfloat16",
                time_median_s=t_peak / 0.8)
    slow = dict(fast, time_median_s=t_peak / 0.5)
    text = roofline.compare([fast, slow], "NVIDIA H200")
    assert "| 80% |" in text and "| 50% |" in text
    assert text.count("| met |") == 1 and text.count("| MISSED |") == 1
    assert roofline.gpu_for("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert roofline.gpu_for(None).name == "H200"
