#!/usr/bin/env bash
# Full GPU comparison on one CUDA GPU, in under 8 minutes on an H200, after the AOT compile
# check of the kernels for this GPU's architecture (python -m bench.aot, results in OUT_DIR/aot).
#
#   bash bench/gpu.sh OUT_DIR                 # install what is missing, run, write OUT_DIR/
#   bash bench/gpu.sh OUT_DIR --wheels DIR    # offline: install from wheels in DIR (pip --no-index)
#   bash bench/gpu.sh OUT_DIR --dry-run       # check the environment, print the plan, run nothing
#   bash bench/gpu.sh OUT_DIR --gpu-tests     # also run the tests marked gpu (vLLM sleep/wake, bf16,
#                                             # Qwen3-VL rollouts; they skip where vllm is missing)
#
# On a machine without internet, bring the pure-python wheels along (1.9 MB):
#   pip download --no-deps -d runs/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0
#   bash bench/gpu.sh "$OUT/gpu" --wheels runs/wheels
#
# Uses $PYTHON (default python3) with its CUDA torch as is: a constraints file pins the installed
# torch and triton so pip never replaces them. Packages that cannot be installed are reported and
# the benchmark lists their implementations as not run, with the reason. Results: results.csv,
# results.md, memory_vs_n.png, time_vs_n.png, meta.json and gpu_sh.log in OUT_DIR; copy them to
# bench/results/cuda-<gpu>/ to publish them (python -m bench.report OUT_DIR regenerates the table).
set -uo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
OUT="" DRY=0 GPU_TESTS=0 WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --gpu-tests) GPU_TESTS=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "gpu.sh: unknown option $1" >&2; usage 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "gpu.sh: give an output folder" >&2; usage 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET_MIN=6.5   # the benchmark's own limit; install + startup must fit in the remaining 1.5 min
START=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_sh.log"
[ "$DRY" = 1 ] && LOG=/dev/null
log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
run() { log "+ $*"; [ "$DRY" = 1 ] || "$@" 2>&1 | tee -a "$LOG"; }

# 1. The environment: python, CUDA torch, GPU
if ! "$PY" -c "import torch" 2>/dev/null; then
  log "no torch in $PY; install a CUDA build of torch first"; exit 2
fi
TORCH_INFO=$("$PY" - <<'EOF'
import torch
try:
    import triton; tv = triton.__version__
except Exception:
    tv = "none"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {tv}, GPU: {gpu}")
EOF
)
log "$TORCH_INFO"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" != 1 ]; then
  if [ "$DRY" = 1 ]; then log "dry run: no CUDA here, so the plan below cannot be executed here"
  else log "torch.cuda.is_available() is False: run this on a GPU machine"; exit 2; fi
fi

# 2. Install what is missing, never touching torch/triton
CONS="$OUT/.constraints.txt"
if [ "$DRY" = 1 ]; then CONS=/dev/null; else
  "$PY" - > "$CONS" <<'EOF'
import importlib.metadata as md
for p in ("torch", "triton", "pytorch-triton"):
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        pass
EOF
fi
PIP=("$PY" -m pip install -q -c "$CONS")
[ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
need() {  # need MODULE PIP_SPEC [--no-deps]
  if "$PY" -c "import $1" 2>/dev/null; then log "have $2"; return; fi
  run "${PIP[@]}" "${@:3}" "$2" || log "could not install $2 (its implementations will be listed as not run)"
}
need transformers "transformers>=4.56"
need trl "trl>=1.16,<2" --no-deps          # only trl.kernels is used: skip datasets, pandas, ...
need liger_kernel "liger-kernel>=0.8" --no-deps
need cut_cross_entropy "cut-cross-entropy>=25.1" --no-deps
need matplotlib "matplotlib>=3.7"
[ "$GPU_TESTS" = 1 ] && need pytest "pytest>=8"

# 3. AOT compile check for this GPU's architecture (bench/aot.py; ~30 s on 16 cores): every
#    kernel config compiles without spills; results in OUT/aot/. Reported, never fatal here.
cd "$REPO" || exit 2
CC=$("$PY" -c "import torch; c = torch.cuda.is_available(); \
p = torch.cuda.get_device_capability(0) if c else (9, 0); print(10 * p[0] + p[1])")
if [ "$DRY" = 1 ]; then log "+ $PY -m bench.aot --arch $CC --out $OUT/aot"
else
  run timeout 120 "$PY" -m bench.aot --arch "$CC" --out "$OUT/aot" --jobs "$(nproc)"
  log "AOT check for sm_$CC: status $? (0 = every config compiles without spills)"
fi

# 4. The comparison (bench/run.py PRESETS["cuda", "full"]), then the optional GPU-marked tests
ARGS=(-m bench --full --device cuda --out "$OUT" --max-minutes "$BUDGET_MIN")
if [ "$DRY" = 1 ]; then
  log "+ $PY ${ARGS[*]}"
  "$PY" "${ARGS[@]}" --dry-run
  STATUS=$?
else
  run timeout $(( ${BUDGET_MIN%.*} * 60 + 90 )) "$PY" "${ARGS[@]}"
  STATUS=$?
  [ "$GPU_TESTS" = 1 ] && run "$PY" -m pytest -q -m gpu tests/ \
      --junitxml "$OUT/gpu_tests.xml"
fi
log "done (status $STATUS) in $(( $(date +%s) - START )) s; results in $OUT"
exit "$STATUS"
