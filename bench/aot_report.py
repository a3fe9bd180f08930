"""Tables of ``python -m bench.aot`` results: CSV, markdown and the README's generated block.

``python -m bench.aot_report [DIR] --readme README.md`` rewrites the README's AOT section (between
the ``aot:begin`` / ``aot:end`` markers) from DIR's committed ``aot.csv`` and ``aot_meta.json``,
with the analytic model of ``bench.roofline`` beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench import roofline
from bench.aot import ARCHS, REPO, Result

COLUMNS = ["kernel", "arch", "dtype", "precision", "flags", "config", "regs", "stack",
           "spill_stores", "spill_loads", "smem", "smem_limit", "blocks_per_sm", "limiter",
           "tensor_core", "status", "problems", "compile_s"]


def rows(results: list[Result]) -> list[dict]:
    out = []
    for r in results:
        flags, cfg = r.case.label()
        out.append(dict(kernel=r.case.kernel, arch=f"sm_{r.case.arch}", dtype=r.case.dtype,
                        precision=r.case.precision, flags=flags, config=cfg, regs=r.regs,
                        stack=r.stack, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                        smem=r.smem, smem_limit=ARCHS[r.case.arch].smem_per_block,
                        blocks_per_sm=r.blocks_per_sm, limiter=r.limiter,
                        tensor_core=r.tensor_core, status=r.status,
                        problems="; ".join(r.problems + ([r.error] if r.error else [])),
                        compile_s=r.compile_s))
    return out


def table(rs: list[dict], cols=None) -> str:
    cols = cols or [c for c in COLUMNS if c not in ("smem_limit", "problems", "compile_s")]
    head = {"spill_stores": "spill st", "spill_loads": "spill ld", "blocks_per_sm": "blk/SM",
            "tensor_core": "tensor-core SASS", "smem": "smem B"}
    lines = ["| " + " | ".join(head.get(c, c) for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rs]
    return "\n".join(lines)


def summary(rs: list[dict]) -> list[dict]:
    """One row per (kernel, arch, dtype/precision, config): the worst case over the flags."""
    groups: dict = {}
    for r in rs:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"], r["precision"], r["config"]),
                          []).append(r)
    out = []
    for (kernel, arch, dtype, prec, cfg), g in groups.items():
        ok = all(x["status"] == "ok" for x in g)
        out.append(dict(kernel=kernel, arch=arch,
                        dtype=dtype + (f" ({prec})" if prec not in ("ieee", "-") else ""),
                        config=cfg, cases=len(g), regs=max(x["regs"] for x in g),
                        stack=max(x["stack"] for x in g),
                        spill_stores=max(x["spill_stores"] for x in g),
                        spill_loads=max(x["spill_loads"] for x in g),
                        smem=max(x["smem"] for x in g),
                        blocks_per_sm=min(x["blocks_per_sm"] for x in g),
                        tensor_core=g[0]["tensor_core"].split(" ")[0],
                        status="ok" if ok else "FAIL"))
    return out


SUMMARY_COLS = ["kernel", "arch", "dtype", "config", "cases", "regs", "stack", "spill_stores",
                "spill_loads", "smem", "blocks_per_sm", "tensor_core", "status"]


def markdown(rs: list[dict], meta: dict) -> str:
    bad = [r for r in rs if r["status"] != "ok"]
    v = meta["versions"]
    lines = [
        "## AOT compile check of the Triton kernels", "",
        f"`{meta['command']}`: {len(rs)} compiles, {len(bad)} with a problem; "
        f"triton {v['triton']}, ptxas {v['ptxas']} (sm_80) / {v.get('ptxas_sm90+')} (sm_90+); "
        f"kernel sources {meta['source_hash']}.", "",
        "Worst case over the flag combinations (bias, entropy, dW; finalize: streams S, "
        "entropy, contrastive, Â) of each kernel, target, input dtype and launch config: "
        "registers per thread, stack frame and spill bytes (`ptxas -v`), dynamic shared memory "
        "(bytes), resident blocks per SM (registers, warps and shared memory), tensor-core "
        "instructions in the SASS (HGMMA = sm_90 wgmma, HMMA = mma.sync). Config: blocks "
        "R/N × V × D, warps, pipeline stages.", "",
        table(summary(rs), SUMMARY_COLS)]
    if bad:
        lines += ["", "### Problems", "", table(bad)]
    return "\n".join(lines) + "\n"


def write(rs: list[dict], meta: dict, out: Path) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "aot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rs)
    (out / "aot_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "aot.md").write_text(markdown(rs, meta) + "\n### Every case\n\n" + table(rs) + "\n")


def read(out: Path) -> tuple[list[dict], dict]:
    """Rows of ``aot.csv`` (numbers as ints) and ``aot_meta.json`` from a results folder."""
    with open(out / "aot.csv", newline="") as f:
        rs = list(csv.DictReader(f))
    for r in rs:
        for k in ("regs", "stack", "spill_stores", "spill_loads", "smem", "smem_limit",
                  "blocks_per_sm"):
            r[k] = int(r[k])
    return rs, json.loads((out / "aot_meta.json").read_text())


def default_dir() -> Path:
    from bench.report import machine_name

    return REPO / "bench" / "results" / machine_name("cpu") / "aot"


README_BEGIN = "<!-- aot:begin (python -m bench.aot_report --readme README.md) -->"
README_END = "<!-- aot:end -->"


def readme_block(out: Path) -> str:
    """The README's AOT section: the summary table of ``out`` and the analytic model at the
    paper's largest N."""
    rs, meta = read(out)
    text = markdown(rs, meta).replace("## AOT compile check of the Triton kernels\n\n", "")
    model = [r for r in roofline.rows() if r["n"] == 32768]
    return (f"{text}\nFull table: `{out.relative_to(REPO)}/aot.md`.\n\n"
            + roofline.markdown(model))


def main(argv=None) -> int:
    from bench.report import write_readme_section

    p = argparse.ArgumentParser(prog="python -m bench.aot_report")
    p.add_argument("dir", type=Path, nargs="?", default=None,
                   help="results folder (default bench/results/<machine>/aot)")
    p.add_argument("--readme", type=Path, default=None,
                   help="write into this README between the aot markers instead of stdout")
    args = p.parse_args(argv)
    out = (args.dir or default_dir()).resolve()
    text = readme_block(out)
    if args.readme is None:
        sys.stdout.write(text)
    else:
        write_readme_section(args.readme, text, README_BEGIN, README_END, demote=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
