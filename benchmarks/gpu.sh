#!/usr/bin/env bash
# One script for a lent GPU machine (Python 3.12, its own CUDA torch, timm, triton; no internet).
#
#   bash benchmarks/gpu.sh            # everything, < 8 minutes on one H200
#   bash benchmarks/gpu.sh --dry-run  # the same python steps on the CPU at tiny sizes (no GPU needed)
#
# Steps (each under its own `timeout`, so the whole run stays inside 8 minutes even if one step hangs):
#   1. install the project with `pip install --no-deps -e .` and optional wheels from ./.wheels (--no-deps;
#      e.g. fla-core: `pip download --no-deps fla-core -d .wheels` on a machine with internet). torch is
#      never reinstalled.
#   2. benchmarks/gpu_check.py: impl='fla' and impl='chunked' on CUDA vs the naive loop, outputs and
#      gradients, per-head and per-channel decay, fp32 and bf16 inputs (exit status 1 on a failed check).
#   3. benchmarks/ops.py --device cuda: naive/chunked/fla/torch.compile timings over L and chunk size.
#   4. vitlinearizer bench --device cuda --dtypes bf16 float32: the student/teacher table (latency,
#      throughput, CUDA peak memory, FLOPs) for the small384, small, base and demo pairs.
# Results land in benchmarks/results/ with the GPU name in the file names; a summary is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=benchmarks/results
mkdir -p "$OUT"
PY=${PYTHON:-python}
START=$(date +%s)
STATUS=0
log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( 470 - ($(date +%s) - START) )); }  # seconds left of the 8-minute window (10 s margin)

if [[ $DRY -eq 0 ]]; then
  log "installing the project (no deps) and optional wheels"
  timeout 90 $PY -m pip install --no-deps --no-build-isolation -q -e . || timeout 90 $PY -m pip install --no-deps -q -e . \
    || { log "pip install -e . failed; using PYTHONPATH=src"; export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; }
  if compgen -G ".wheels/*.whl" > /dev/null; then
    timeout 60 $PY -m pip install --no-deps -q .wheels/*.whl || log "warning: some wheels in .wheels did not install"
  fi
  $PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import fla, triton
    print("fla", getattr(fla, "__version__", "?"), "triton", triton.__version__)
except Exception as exc:
    print("fla not importable:", type(exc).__name__, exc)
EOF
  DEVICE_ARGS=(--device cuda)
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE_ARGS=(--dry-run)
fi

log "step 2: GPU path correctness (fla, chunked vs naive)"
timeout $(( $(left) < 120 ? $(left) : 120 )) $PY benchmarks/gpu_check.py "${DEVICE_ARGS[@]}" --output-dir "$OUT" || STATUS=1

log "step 3: kernel timings"
if [[ $DRY -eq 0 ]]; then
  timeout $(( $(left) < 120 ? $(left) : 120 )) $PY benchmarks/ops.py --device cuda --threads 0 --repeats 10 \
    --lengths 197 1025 4097 16385 --chunk-sizes 32 64 128 --output-dir "$OUT" || log "warning: ops.py did not finish"
else
  timeout 120 $PY benchmarks/ops.py --quick --output-dir "$OUT/tmp" || STATUS=1
fi

log "step 4: student vs teacher table"
if [[ $DRY -eq 0 ]]; then
  BUDGET=$(( $(left) - 30 ))
  # SIGINT, not timeout's default SIGTERM: bench writes the rows it measured when interrupted (then KILL).
  timeout -s INT -k 10 $(( BUDGET + 20 )) $PY -m vitlinearizer bench --device cuda --dtypes bf16 float32 --pairs small384 small base demo \
    --batch 32 --repeats 10 --time-budget 60 --max-minutes "$(awk "BEGIN {print $BUDGET / 60}")" \
    --output-dir "$OUT" || log "warning: bench did not finish"
else
  timeout 200 $PY -m vitlinearizer bench --quick --device cpu --output-dir "$OUT/tmp" || STATUS=1
fi

log "done (status $STATUS); results:"
ls -l "$OUT" | tail -n +2
exit $STATUS
