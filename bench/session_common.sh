# Sourced by bench/gpu_session.sh and bench/gpu_x2_session.sh: environment, install, and run_step.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/eplb_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

run_step() {  # name, timeout, command...: full output to $LOG, the last $TAIL lines to stdout
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local begin=$SECONDS
  timeout "$limit" "$@" >"$OUT/step.tmp" 2>&1
  local rc=$?
  cat "$OUT/step.tmp" >>"$LOG"
  tail -n "${TAIL:-12}" "$OUT/step.tmp"
  echo "--- $name rc=$rc in $((SECONDS - begin)) s" | tee -a "$LOG"
  rm -f "$OUT/step.tmp"
}
