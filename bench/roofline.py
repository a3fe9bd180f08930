"""Analytic model of one kernel call: FLOPs, bytes, arithmetic intensity, expected GPU time.

``python -m bench.roofline`` prints it at the paper's shapes (V 151,936, D 2,048 / 2,560, N up
to 32,768). A GPU run of ``bench`` is judged against these figures: the goal is ≥ 70% of the
bare matmul's throughput, i.e. a time ≤ t_compute / 0.7 on a compute-bound call.

Per call (S streams, N tokens, D hidden, V vocab, b bytes per input element):

- scoring (forward of S streams + epilogue):  matmul FLOPs 2·S·N·D·V, S·N·V exponentials.
- update (forward of the policy + backward, d/d hidden): forward 2·N·D·V, backward recompute
  2·N·D·V + dH 2·N·D·V; ``update_w`` adds dW 2·N·D·V. "useful" FLOPs leave the recompute out
  (what a materialised-logits implementation does, and what ``bench`` divides by).
- bytes_min: compulsory HBM traffic (each input read and each output written once per kernel).
- bytes_tile: what the programs load from L2/HBM under the kernel's tiling: every program
  reloads its hidden rows for each vocab tile and every W tile for each row block; L2 reuse
  decides how much of it reaches HBM. bytes_atomic: fp32 atomic adds of the backward (dH once
  per vocab tile, dW once per row tile), served by L2. The L2 bandwidth the tile traffic needs
  to keep the tensor cores busy is bytes_tile / t_compute.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

V_QWEN = 151_936


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float     # dense tensor-core peak, FLOP/s (datasheet)
    hbm_bytes: float      # HBM bandwidth, B/s (datasheet)


GPUS = [Gpu("A100 SXM", 312e12, 2.039e12), Gpu("H100 SXM", 989e12, 3.35e12),
        Gpu("H200", 989e12, 4.8e12)]
GOAL = 0.70   # of the bare matmul's throughput


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def counts(workload: str, n: int, d: int, v: int = V_QWEN, s: int = 3, b: int = 2,
           block_r: int = 128, block_n: int = 128, block_v: int = 128, splits: int = 1) -> dict:
    """FLOPs and bytes of one call (see the module docstring); blocks = the kernels' tiles."""
    ndv = n * d * v
    part = 3 * 4 * splits     # m, d, t partials (fp32) per row and split: written, read back
    if workload == "scoring":
        rows = s * n
        flops = useful = 2 * s * ndv
        exps = s * n * v
        fwd = b * (rows * d + v * d) + 4 * n + part * rows
        fin = part * rows + 4 * n + 4 * n + n + 6 * 4 * n   # y, A, valid → lp×3, Δ, w, Â
        bytes_min = fwd + fin
        tile = b * d * (rows * _cdiv(v, block_v) + v * _cdiv(rows, block_r))
        atomic = 0
    elif workload in ("update", "update_w"):
        dw = workload == "update_w"
        useful = (6 if dw else 4) * ndv
        flops = useful + 2 * ndv                            # the backward recomputes z
        exps = 2 * n * v
        fwd = b * (n * d + v * d) + 4 * n + part * n                # forward kernel
        fwd += part * n + 4 * n + 2 * 4 * n                         # finalize → target, lse
        bwd = b * (n * d + v * d) + 3 * 4 * n + 4 * n * d + (4 * v * d if dw else 0)
        bytes_min = fwd + bwd                                       # (y, lse, g → dH, dW)
        tile = b * d * (n * _cdiv(v, block_v) + v * _cdiv(n, block_r))      # forward (S = 1)
        tile += b * d * (n * _cdiv(v, block_v) + 2 * v * _cdiv(n, block_n))  # z, then W again
        if dw:
            tile += b * d * n * _cdiv(v, block_v)                             # H again for dW
        atomic = 4 * d * (n * _cdiv(v, block_v) + (v * _cdiv(n, block_n) if dw else 0))
    else:
        raise ValueError(f"workload must be scoring, update or update_w, got {workload!r}")
    return dict(workload=workload, n=n, d=d, v=v, s=s if workload == "scoring" else 1,
                flops=flops, useful_flops=useful, exps=exps, bytes_min=bytes_min,
                bytes_tile=tile, bytes_atomic=atomic)


def expected(c: dict, gpu: Gpu) -> dict:
    """Roofline times of one call on ``gpu``: compute, HBM, the bound, and the 70% goal."""
    t_compute = c["flops"] / gpu.bf16_flops
    t_hbm = c["bytes_min"] / gpu.hbm_bytes
    return dict(gpu=gpu.name, t_compute=t_compute, t_hbm=t_hbm, t_roof=max(t_compute, t_hbm),
                bound="compute" if t_compute >= t_hbm else "memory",
                t_goal=max(t_compute, t_hbm) / GOAL,
                l2_needed=(c["bytes_tile"] + 2 * c["bytes_atomic"]) / t_compute)


PAPER_CASES = [(w, n, d) for w in ("scoring", "update", "update_w") for d in (2048, 2560)
               for n in (4096, 16384, 32768)]


def rows(cases=PAPER_CASES, gpus=GPUS) -> list[dict]:
    out = []
    for w, n, d in cases:
        c = counts(w, n, d)
        for g in gpus:
            out.append({**c, **expected(c, g)})
    return out


def _si(x: float, unit: str) -> str:
    for k, p in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= p:
            return f"{x / p:.1f} {k}{unit}"
    return f"{x:.0f} {unit}"


def markdown(rs: list[dict] | None = None, gpu: str = "H200") -> str:
    rs = [r for r in (rs or rows()) if r["gpu"] == gpu]
    g = next(x for x in GPUS if x.name == gpu)
    lines = [f"Analytic model (`python -m bench.roofline`), V = {V_QWEN:,}, bf16, {gpu} "
             f"({g.bf16_flops / 1e12:.0f} TFLOP/s dense bf16, {g.hbm_bytes / 1e12:.2f} TB/s "
             "HBM, datasheet). FLOPs include the backward's recompute of the logits; "
             "intensity = FLOPs / compulsory HBM bytes; goal = roofline time / 0.7. "
             "Tile traffic: loads of the kernels' 128×128 tiles plus fp32 atomic adds "
             "(read-modify-write), and the L2 bandwidth it needs at peak FLOP/s.", "",
             "| workload | N | D | FLOPs | HBM bytes | FLOP/B | bound | t at peak | goal ≤ "
             "| tile traffic | atomics | L2 needed |", "|" + "---|" * 12]
    for r in rs:
        lines.append(
            f"| {r['workload']} | {r['n']:,} | {r['d']} | {_si(r['flops'], 'FLOP')} | "
            f"{_si(r['bytes_min'], 'B')} | {r['flops'] / r['bytes_min']:,.0f} | {r['bound']} | "
            f"{r['t_roof'] * 1e3:.1f} ms | {r['t_goal'] * 1e3:.1f} ms | "
            f"{_si(r['bytes_tile'], 'B')} | {_si(r['bytes_atomic'], 'B')} | "
            f"{_si(r['l2_needed'], 'B/s')} |")
    return "\n".join(lines) + "\n"


def gpu_for(name: str | None) -> Gpu:
    """The model GPU for a device name (H100 / A100 by name, else H200)."""
    name = (name or "").upper()
    for key, g in (("H100", GPUS[1]), ("A100", GPUS[0])):
        if key in name:
            return g
    return GPUS[2]


def compare(measured: list[dict], gpu_name: str | None) -> str:
    """Measured kernel times (bench rows: workload, n, d, v, dtype, time_median_s) beside the
    model: roofline time, fraction of it reached, and the 70% goal."""
    g = gpu_for(gpu_name)
    lines = [f"Analytic model on {g.name} ({g.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
             f"{g.hbm_bytes / 1e12:.2f} TB/s; `python -m bench.roofline`): t at peak = "
             "max(FLOPs / peak, HBM bytes / bandwidth), FLOPs with the backward's recompute; "
             f"goal: t ≤ t at peak / {GOAL}.", "",
             "| workload | N | D | FLOPs | t at peak | measured | of peak | goal ≤ | status |",
             "|" + "---|" * 9]
    for r in measured:
        b = 4 if "32" in str(r["dtype"]) else 2
        c = counts(r["workload"], int(r["n"]), int(r["d"]), int(r["v"]), b=b)
        e = expected(c, g)
        t = r["time_median_s"]
        lines.append(f"| {r['workload']} | {int(r['n']):,} | {int(r['d'])} | "
                     f"{_si(c['flops'], 'FLOP')} | {e['t_roof'] * 1e3:.2f} ms | "
                     f"{t * 1e3:.2f} ms | {e['t_roof'] / t:.0%} | {e['t_goal'] * 1e3:.2f} ms | "
                     f"{'met' if t <= e['t_goal'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--gpu", default="H200", choices=[g.name for g in GPUS])
    args = p.parse_args(argv)
    sys.stdout.write(markdown(gpu=args.gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
