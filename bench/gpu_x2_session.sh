#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2): install, the GPU tests (2-GPU ones included),
# the link-speed benchmark (issue 12) and optionally the whole suite / multi_gpu.py.
#   STEPS="tests link" bash bench/gpu_x2_session.sh        (logs and JSON under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/eplb_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
nvidia-smi topo -m 2>&1 | head -5 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$LOG"

run_step() {  # name, timeout, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local begin=$SECONDS
  timeout "$limit" "$@" >"$OUT/step.tmp" 2>&1
  local rc=$?
  cat "$OUT/step.tmp" >>"$LOG"
  tail -n "${TAIL:-15}" "$OUT/step.tmp"
  echo "--- $name rc=$rc in $((SECONDS - begin)) s" | tee -a "$LOG"
  rm -f "$OUT/step.tmp"
}

for step in ${STEPS:-tests link}; do
  case $step in
    tests) run_step gpu-tests 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rf ;;
    tests1) run_step gpu-tests-one-gpu 240 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rf ;;
    suite) run_step whole-suite ${SUITE_LIMIT:-420} python3 -m pytest -q tests -p no:cacheprovider -rf ;;
    link) run_step link-speed 420 python3 bench/link_speed.py --json "$OUT/link_speed.json" \
      --plot "$OUT/link_speed.png" --markdown "$OUT/link_speed.md" ${LINK_ARGS:-} ;;
    link16) run_step link-speed-16-layers 300 python3 bench/link_speed.py --layers 16 --repeats 5 \
      --configs qwen3-30b-a3b-bf16 tiny-bf16 --presets qwen3-30b-a3b --json "$OUT/link_speed-16layers.json" ;;
    worker) run_step worker-swap 200 python3 bench/gpu_worker.py --json "$OUT/gpu_worker.json" ;;
    timeline) run_step timeline 120 python3 bench/layer_timeline.py ;;
    multigpu) run_step multi-gpu 300 python3 bench/multi_gpu.py --backend nccl --timeout 280 \
      --json "$OUT/multi_gpu-nccl-w2.json" ;;
    *) echo "unknown step $step" ;;
  esac
done
