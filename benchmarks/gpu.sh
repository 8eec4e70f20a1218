#!/usr/bin/env bash
# One script for a lent GPU machine (Python 3.12, its own CUDA torch, timm, triton; no internet).
#
#   bash benchmarks/gpu.sh            # everything, < 8 minutes on one H200
#   bash benchmarks/gpu.sh --dry-run  # the same python steps on the CPU at tiny sizes (no GPU needed)
#
# Steps (each under its own `timeout`, so the whole run stays inside 8 minutes even if one step hangs):
#   1. put the wheels in ./.whl (our pinned timm, fla-core and einops: `make gpu-wheels` here, where PyPI
#      is reachable; the device call must carry .whl) on the path with `pip install --target`, leaving the
#      machine's own torch and triton alone, and the project's src/ likewise.
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
RESULTS=benchmarks/results  # not OUT: the device tool passes its return folder as $OUT
mkdir -p "$RESULTS"
TOUCH=$(mktemp)  # results newer than this are the run's own
PY=${PYTHON:-python3}  # the device image's python3 holds its CUDA torch
START=$(date +%s)
STATUS=0
log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( 470 - ($(date +%s) - START) )); }  # seconds left of the 8-minute window (10 s margin)

if [[ $DRY -eq 0 ]]; then
  # src/ first, then the carried wheels: no pip install -e, whose build backend would need the network.
  SITE=/tmp/vitlinearizer-site
  if compgen -G ".whl/*.whl" > /dev/null; then
    log "installing the carried wheels into $SITE: $(ls .whl | tr '\n' ' ')"
    timeout 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || log "warning: the wheels in .whl did not install; using the machine's own timm, without fla"
  else
    log "warning: no .whl/ carried (make gpu-wheels); using the machine's own timm, without fla"
  fi
  export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  $PY - <<'EOF'
import torch
import timm, vitlinearizer
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("timm", timm.__version__, "from", timm.__file__, "; vitlinearizer from", vitlinearizer.__file__)
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
timeout $(( $(left) < 120 ? $(left) : 120 )) $PY benchmarks/gpu_check.py "${DEVICE_ARGS[@]}" \
  --output-dir "$RESULTS$([[ $DRY -eq 1 ]] && echo /tmp)" || STATUS=1

log "step 3: kernel timings"
if [[ $DRY -eq 0 ]]; then
  timeout $(( $(left) < 120 ? $(left) : 120 )) $PY benchmarks/ops.py --device cuda --threads 0 --repeats 10 \
    --lengths 197 1025 4097 16385 --chunk-sizes 32 64 128 --output-dir "$RESULTS" || log "warning: ops.py did not finish"
else
  timeout 120 $PY benchmarks/ops.py --quick --output-dir "$RESULTS/tmp" || STATUS=1
fi

log "step 4: student vs teacher table"
if [[ $DRY -eq 0 ]]; then
  BUDGET=$(( $(left) - 30 ))
  # SIGINT, not timeout's default SIGTERM: bench writes the rows it measured when interrupted (then KILL).
  timeout -s INT -k 10 $(( BUDGET + 20 )) $PY -m vitlinearizer bench --device cuda --dtypes bf16 float32 --pairs small384 small base demo \
    --batch 32 --repeats 10 --time-budget 60 --max-minutes "$(awk "BEGIN {print $BUDGET / 60}")" \
    --output-dir "$RESULTS" || log "warning: bench did not finish"
else
  timeout 200 $PY -m vitlinearizer bench --quick --device cpu --output-dir "$RESULTS/tmp" || STATUS=1
fi

log "done (status $STATUS); results:"
NEW=$(find "$RESULTS" -maxdepth 1 -type f -newer "$TOUCH")
[[ -n "$NEW" ]] && ls -l $NEW
# On the device tool's machine only what lies in $OUT comes back: copy this run's result files there.
if [[ $DRY -eq 0 && -n "$NEW" && -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp $NEW "$OUT"/ && log "copied to \$OUT: $(echo $NEW | tr '\n' ' ')"
fi
exit $STATUS
