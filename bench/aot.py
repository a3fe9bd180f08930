"""Ahead-of-time compile check of every Triton kernel for real GPU targets, without a GPU.

``python -m bench.aot`` compiles the forward, finalize and backward kernels at every launch
configuration ``forward_config`` / ``backward_config`` can return, for each input dtype, flag
combination and target (sm_80 A100, sm_90 H100/H200, sm_100 B200 when the wheel's ptxas knows
it), and reads registers, stack, spills (``ptxas -v``), shared memory, blocks per SM and the
tensor-core instructions in the SASS (``cuobjdump``, shipped in the triton wheel). It exits 1 on
a compile failure, a register spill or shared memory over the target's limit, and writes
``aot.csv`` + ``aot.md`` to ``bench/results/<machine>/aot/``. ``--quick`` compiles the CI subset
(sm_80 + sm_90, bf16 and fp32, every flag on: the most registers). Metrics are cached per
(kernel source, triton, case) in ``$CEPO_CACHE_DIR/aot``; ``--jobs`` compiles in parallel.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = ["forward.py", "finalize.py", "backward.py", "tl_utils.py"]


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a target (CUDA occupancy tables); shared memory in bytes."""
    cc: int
    gpus: str
    smem_per_sm: int
    smem_per_block: int        # opt-in maximum of one block
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    smem_reserved: int = 1024  # per block, taken by the runtime


ARCHS = {
    80: Arch(80, "A100", 167936, 166912),
    90: Arch(90, "H100/H200", 233472, 232448),
    100: Arch(100, "B200", 233472, 232448),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# representative shapes the configs are asked about: small and large N, the paper's V and D
SHAPES = [(n, v, d) for n in (1, 100, 4096, 98304) for v in (1000, 151936)
          for d in (64, 2048, 2560)]
FINALIZE_BLOCKS = (16, 32, 64, 128, 256)   # _launch_finalize: _pow2(N, 16, 256) on GPU


@dataclass
class Case:
    kernel: str                 # forward | finalize | backward
    arch: int
    dtype: str                  # bf16 | fp16 | fp32 (fp32 for finalize: its inputs are fp32)
    precision: str              # ieee | tf32 (fp32 dots), "-" without dots
    flags: dict
    config: dict                # block sizes (constexprs) + num_warps, num_stages

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def label(self) -> tuple[str, str]:
        flags = ",".join(k for k, v in self.flags.items() if v is True) or "-"
        flags += "".join(f",{k}={v}" for k, v in self.flags.items() if not isinstance(v, bool))
        cfg = " ".join(f"{k.split('_')[-1]}{v}" for k, v in self.config.items()
                       if k.startswith("BLOCK"))
        return flags.lstrip(","), f"{cfg} w{self.config['num_warps']} s{self.config['num_stages']}"


@dataclass
class Result:
    case: Case
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    blocks_per_sm: int = 0
    limiter: str = ""
    tensor_core: str = "-"
    status: str = "ok"
    error: str = ""
    compile_s: float = 0.0
    problems: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The matrix of cases


def _configs(kind: str, arch: int, dtype, precision: str) -> list[dict]:
    """Distinct configurations forward_config / backward_config return for this arch + dtype."""
    import torch

    from cepo_kernels.ops import triton_launch as tlm

    seen = []
    for n, v, d in SHAPES:
        if kind == "forward":
            cfg = tlm.forward_config(n, v, d, dtype, torch.device("cpu"), arch=arch,
                                     precision=precision)
            cfg = {k: cfg[k] for k in ("BLOCK_R", "BLOCK_V", "BLOCK_D", "num_warps",
                                       "num_stages")}
        else:
            cfg = tlm.backward_config(n, v, d, dtype, arch=arch, precision=precision)
        if cfg not in seen:
            seen.append(cfg)
    return seen


def cases(archs, quick: bool = False) -> list[Case]:
    import torch

    out = []
    for arch in archs:
        for dt in (("bf16", "fp32") if quick else DTYPES):
            precs = ("ieee", "tf32") if dt == "fp32" else ("ieee",)
            precs = ("tf32",) if quick and dt == "fp32" else precs
            tdt = getattr(torch, DTYPES[dt])
            for prec in precs:
                for cfg in _configs("forward", arch, tdt, prec):
                    for bias, ent, one in itertools.product((True, False), repeat=3):
                        if not quick or (bias and ent and not one):
                            out.append(Case("forward", arch, dt, prec,
                                            dict(bias=bias, entropy=ent, S1=one), cfg))
                for cfg in _configs("backward", arch, tdt, prec):
                    for bias, ent, dw in itertools.product((True, False), repeat=3):
                        if not quick or (bias and ent and dw):
                            out.append(Case("backward", arch, dt, prec,
                                            dict(bias=bias, entropy=ent, dw=dw), cfg))
        # finalize (fp32 statistics): stats (S = 1, 3) with/without entropy; contrastive S = 3, 6
        fin = [dict(entropy=e, contrastive=False, adv=False, S=s) for s in (1, 3)
               for e in (True, False)]
        fin += [dict(entropy=False, contrastive=True, adv=a, S=s) for s in (3, 6)
                for a in (True, False)]
        if quick:
            fin = [f for f in fin if (f["S"], f["entropy"]) == (1, True) or f["adv"]][:2]
        for f in fin:
            for bn in ((256,) if quick else FINALIZE_BLOCKS):
                out.append(Case("finalize", arch, "fp32", "-", f,
                                dict(BLOCK_N=bn, num_warps=4, num_stages=3)))
    return out


# --------------------------------------------------------------------------------------------
# Compiling one case


def _kernel(name: str):
    from cepo_kernels.kernels import backward, finalize, forward

    return {"forward": forward.logit_stats_fwd_kernel, "finalize": finalize.finalize_kernel,
            "backward": backward.logit_grad_bwd_kernel}[name]


def _source(case: Case):
    """(signature, constexprs, divisible-by-16 args) as the JIT specialises a contiguous call
    with D a multiple of 16: unit strides become constexpr 1, aligned pointers and multiples
    of 16 get ``tt.divisibility``."""
    f, t = case.flags, "*" + case.dtype
    if case.kernel == "forward":
        ptr = dict(H=t, W=t, B=t, Y="*i32", M_OUT="*fp32", DENOM_OUT="*fp32", T_OUT="*fp32",
                   E_OUT="*fp32")
        const = dict(INV_TEMP=1 / 0.7, HAS_BIAS=f["bias"], WITH_ENTROPY=f["entropy"],
                     UPCAST=False, DOT_PRECISION=case.precision, stride_hd=1, stride_wd=1)
        if f["S1"]:   # one stream (the update's forward): the JIT makes S == 1 a constant
            const["S"] = 1
        div = ["DIM", "V_PER_SPLIT", "stride_hs", "stride_hn", "stride_wv"]
    elif case.kernel == "backward":
        ptr = dict(H=t, W=t, B=t, Y="*i32", LSE="*fp32", G="*fp32", GE="*fp32", ENT="*fp32",
                   DH="*fp32", DW="*fp32", DB="*fp32")
        const = dict(INV_TEMP=1 / 0.7, HAS_BIAS=f["bias"], WITH_ENTROPY=f["entropy"],
                     COMPUTE_DW=f["dw"], UPCAST=False, DOT_PRECISION=case.precision,
                     stride_hd=1, stride_wd=1)
        div = ["DIM", "stride_hn", "stride_wv"]
    else:
        ptr = dict(M="*fp32", DENOM="*fp32", T="*fp32", E="*fp32", Y="*i32", ADV="*fp32",
                   VALID="*i8" if f["adv"] else "*i32", HPARAMS="*fp32", TGT_OUT="*fp32",
                   LSE_OUT="*fp32", ENT_OUT="*fp32", LP_OUT="*fp32", DELTA_OUT="*fp32",
                   W_OUT="*fp32", AHAT_OUT="*fp32")
        const = dict(S=f["S"], WITH_ENTROPY=f["entropy"], CONTRASTIVE=f["contrastive"],
                     WITH_ADV=f["adv"])
        div = []
    const.update({k: v for k, v in case.config.items() if k.startswith("BLOCK")})
    fn = _kernel(case.kernel)
    sig = {n: "constexpr" if n in const else ptr.get(n, "i32") for n in fn.arg_names}
    return fn, sig, const, list(ptr) + div


def _tool(name: str, arch: int) -> str:
    """ptxas / cuobjdump of the triton wheel (ptxas-blackwell for sm_90+ where triton uses it)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        if name == "ptxas":
            return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):   # older triton: no per-arch ptxas
        pass
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log."""
    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return dict(regs=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"))


def tensor_core_ops(sass: str) -> str:
    """Tensor-core instructions in a SASS listing, e.g. ``HGMMA 24`` (sm_90 wgmma), ``HMMA 64``
    (mma.sync), ``UTCHMMA 8`` (sm_100 tcgen05); ``-`` when there are none."""
    ops = re.findall(r"\b(HGMMA|HMMA|UTC[A-Z]*MMA|IMMA|DMMA)\b", sass)
    if not ops:
        return "-"
    return ", ".join(f"{op} {ops.count(op)}" for op in sorted(set(ops)))


def blocks_per_sm(arch: Arch, regs: int, num_warps: int, smem: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them (registers are allocated per warp in units
    of 256, shared memory with ``smem_reserved`` bytes per block)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {"regs": (arch.regs_per_sm // per_warp) // num_warps,
              "warps": arch.max_warps // num_warps, "blocks": arch.max_blocks}
    if smem:
        limits["smem"] = arch.smem_per_sm // (smem + arch.smem_reserved)
    lim = min(limits, key=lambda k: limits[k])     # ties: the first listed
    return limits[lim], lim


def compile_case(case: Case) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(case)
    t0 = time.perf_counter()
    try:
        fn, sig, const, div = _source(case)
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        opts = dict(num_warps=case.config["num_warps"], num_stages=case.config["num_stages"])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):   # TRITON_DUMP_PTXAS_LOG: triton's `ptxas -v`
            ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                target=GPUTarget("cuda", case.arch, 32), options=opts)
        log = log.getvalue()
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
            ptx.write_text(ck.asm["ptx"])
            cubin.write_bytes(ck.asm["cubin"])
            if "registers" not in log:   # a triton without the log knob: run ptxas -v again
                gpu_name = f"sm_{case.arch}" + ("a" if case.arch >= 90 else "")
                log = subprocess.run([_tool("ptxas", case.arch), "-lineinfo", "-v",
                                      "--regAllocOptLevel=2", f"--gpu-name={gpu_name}",
                                      str(ptx), "-o", str(Path(tmp, "v.cubin"))],
                                     capture_output=True, text=True, check=True).stderr
            sass = subprocess.run([_tool("cuobjdump", case.arch), "-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        for k, v in parse_ptxas(log).items():
            setattr(res, k, v)
        res.smem = int(ck.metadata.shared)
        res.tensor_core = tensor_core_ops(sass)
        res.blocks_per_sm, res.limiter = blocks_per_sm(ARCHS[case.arch], res.regs,
                                                       case.config["num_warps"], res.smem)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
        res.status, res.error = "FAIL", f"{type(exc).__name__}: {str(exc)[-400:]}"
        res.problems.append("compile failed")
    res.compile_s = round(time.perf_counter() - t0, 2)
    arch = ARCHS[case.arch]
    if res.status == "ok":
        if res.spill_stores or res.spill_loads:
            res.problems.append(f"spills {res.spill_stores} B stores / {res.spill_loads} B loads")
        if res.smem > arch.smem_per_block:
            res.problems.append(f"shared memory {res.smem} B > {arch.smem_per_block} B")
        if res.blocks_per_sm < 1:
            res.problems.append("does not fit on one SM")
        if res.problems:
            res.status = "SPILL" if "spills" in res.problems[0] else "LIMIT"
    return res


# --------------------------------------------------------------------------------------------
# Cache, versions, running the matrix


def _code_only(source: str) -> bytes:
    """The tokens of `source` without comments and blank lines: rewording a comment does not
    change the compiled code, so it does not make the committed table stale."""
    import textwrap
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
    kept = (f"{t.type}:{t.string}" for t in tokens if t.type not in (tokenize.COMMENT,
                                                                      tokenize.NL))
    return "\n".join(kept).encode()


def source_hash() -> str:
    """Hash of what the compiled code depends on in this repository: the kernels and the
    two config functions (the committed table is stale when it changes)."""
    from cepo_kernels.ops import triton_launch as tlm

    h = hashlib.sha256()
    for name in KERNEL_FILES:
        h.update(_code_only((REPO / "cepo_kernels" / "kernels" / name).read_text()))
    for fn in (tlm.forward_config, tlm.backward_config):
        h.update(_code_only(inspect.getsource(fn)))
    h.update(repr((tlm._FORWARD, tlm._BACKWARD)).encode())
    return h.hexdigest()[:16]


def versions() -> dict:
    import triton

    out = {"triton": triton.__version__}
    for arch, key in ((80, "ptxas"), (100, "ptxas_sm90+")):
        try:
            txt = subprocess.run([_tool("ptxas", arch), "--version"], capture_output=True,
                                 text=True).stdout
            out[key] = re.search(r"release ([\d.]+)", txt).group(1)
        except (OSError, AttributeError):
            out[key] = None
    return out


METRICS_VERSION = "1"   # bump when what compile_case measures changes
KERNEL_SOURCES = {"forward": ["forward.py", "tl_utils.py"], "finalize": ["finalize.py"],
                  "backward": ["backward.py", "tl_utils.py"]}


def _cache_file(cache: Path, case: Case, salt: str) -> Path:
    """One JSON per case, keyed by the case, its kernel's source files and the tool versions."""
    h = hashlib.sha256((salt + case.key()).encode())
    for name in KERNEL_SOURCES[case.kernel]:
        h.update((REPO / "cepo_kernels" / "kernels" / name).read_bytes())
    return cache / (h.hexdigest()[:24] + ".json")


def run_cases(todo: list[Case], jobs: int, cache: Path | None) -> list[Result]:
    salt = json.dumps(versions(), sort_keys=True) + METRICS_VERSION
    results: dict[int, Result] = {}
    missing = []
    for i, case in enumerate(todo):
        path = _cache_file(cache, case, salt) if cache else None
        if path and path.exists():
            d = json.loads(path.read_text())
            results[i] = Result(case, **{k: v for k, v in d.items() if k != "case"})
        else:
            missing.append(i)
    if missing:
        print(f"bench.aot: compiling {len(missing)} of {len(todo)} cases "
              f"({len(todo) - len(missing)} cached), {jobs} job(s)", file=sys.stderr)
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, res in zip(missing, pool.map(compile_case, [todo[i] for i in missing])):
            results[i] = res
            if cache and res.status != "FAIL":
                cache.mkdir(parents=True, exist_ok=True)
                d = asdict(res)
                d.pop("case")
                _cache_file(cache, todo[i], salt).write_text(json.dumps(d))
    return [results[i] for i in range(len(todo))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=None,
                   help="compute capabilities (default: 80 90, and 100 when ptxas supports it "
                   "and not --quick)")
    p.add_argument("--quick", action="store_true", help="the CI subset (about 12 compiles)")
    p.add_argument("--kernel", nargs="+", choices=["forward", "finalize", "backward"])
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<machine>/aot; none with --quick)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    from bench.aot_report import SUMMARY_COLS, rows, summary, table, write

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.aot: triton was imported in interpreter mode; run it in a fresh "
                         "process without TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # what the kernels run with
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"    # so that ptxas runs and its log is printed
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    archs = args.arch or [80, 90] + ([100] if _supports(100) and not args.quick else [])
    todo = [c for c in cases(archs, args.quick) if not args.kernel or c.kernel in args.kernel]
    cache = None if args.no_cache else Path(
        os.environ.get("CEPO_CACHE_DIR", "~/.cache/cepo")).expanduser() / "aot"
    t0 = time.perf_counter()
    rs = rows(run_cases(todo, max(1, args.jobs), cache))
    meta = dict(command="python -m bench.aot" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
                source_hash=source_hash(), versions=versions(), archs=archs,
                elapsed_s=round(time.perf_counter() - t0, 1))
    print(table(summary(rs), SUMMARY_COLS))
    bad = [r for r in rs if r["status"] != "ok"]
    if bad:
        print(f"\n{len(bad)} of {len(rs)} cases FAILED the check:\n" + table(bad))
    out = args.out
    if out is None and not args.quick:
        from bench.report import machine_name

        out = REPO / "bench" / "results" / machine_name("cpu") / "aot"
    if out is not None:
        write(rs, meta, out)
        print(f"\nwrote {out}/aot.csv, aot.md")
    return 1 if bad else 0


def _supports(arch: int) -> bool:
    """Whether the wheel's ptxas can assemble for this target."""
    try:
        txt = subprocess.run([_tool("ptxas", arch), "--help"], capture_output=True,
                             text=True).stdout
    except OSError:
        return False
    return f"sm_{arch}" in txt


if __name__ == "__main__":
    sys.exit(main())
