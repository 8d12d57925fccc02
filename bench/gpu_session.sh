#!/usr/bin/env bash
# One device call on a single GPU: install, GPU tests, demo and benchmarks.
# Full logs go to $OUT/session.log, JSON results to $OUT/*.json; a short tail is printed.
#   bash bench/gpu_session.sh     (STEPS="tests worker demo e2e" by default; also: kernels multigpu workerprof)
source "$(dirname "$0")/session_common.sh"

for step in ${STEPS:-tests worker demo e2e}; do
  case $step in
    tests) run_step gpu-tests 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
    worker) run_step worker-bench 200 python3 bench/gpu_worker.py --json "$OUT/gpu_worker.json" ;;
    workerprof) TAIL=8 run_step worker-profile 300 python3 bench/gpu_worker.py --profile --json "$OUT/gpu_worker.json" ;;
    demo) run_step demo 200 python3 -m eplb_triton demo --dist-backend nccl --world-size 1 --preset deepseek-v3 --layers 2 \
      --rebalances 2 --no-progress ;;
    e2e)
      run_step e2e-qwen3 200 python3 -m eplb_triton bench --dist-backend nccl --world-size 1 --preset qwen3-30b-a3b \
        --layers 8 --json "$OUT/e2e-qwen3-1gpu.json"
      run_step e2e-deepseek 200 python3 -m eplb_triton bench --dist-backend nccl --world-size 1 --preset deepseek-v3 \
        --layers 3 --json "$OUT/e2e-deepseek-1gpu.json"
      ;;
    kernels) run_step kernel-table 300 python3 bench/kernel_table.py ;;
    multigpu) run_step multi-gpu 240 python3 bench/multi_gpu.py --backend nccl --world-size 1 --timeout 220 \
      --json "$OUT/multi_gpu-nccl-w1.json" ;;
    *) echo "unknown step $step" ;;
  esac
done
