#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2): install, the GPU tests (2-GPU ones included),
# the link-speed benchmark (issue 12) and optionally the whole suite / multi_gpu.py; the p2p
# transport (issue 17): STEPS="p2p linkp2p" TAIL=40.
#   STEPS="tests link" bash bench/gpu_x2_session.sh        (logs and JSON under $OUT)
source "$(dirname "$0")/session_common.sh"
nvidia-smi topo -m 2>&1 | head -5 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$LOG"

link_ab() {  # tag, NAME=VALUE: the blocking call at 48/16/4 layers, default budget and 8 layers, and under NAME=VALUE
  local tag=$1 variant=$2 spec layers repeats
  for spec in "48 5 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets" \
              "16 5 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b" "4 7 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets"; do
    set -- $spec; layers=$1; repeats=$2; shift 2
    run_step "link-$layers-layers-$tag" 200 python3 bench/link_speed.py --layers $layers --repeats $repeats --configs "$@" \
      --methods floor per-expert blocking --budgets 8 --variants "$variant" \
      --json "$OUT/link_speed-${layers}layers-$tag.json" --markdown "$OUT/link_speed-${layers}layers-$tag.md"
  done
}

link_p2p() {  # tag, NAME=VALUE, then "LAYERS REPEATS [link_speed options]" per run: NCCL and p2p rows, and under NAME=VALUE
  local tag=$1 variant=$2 spec layers repeats
  shift 2
  for spec in "$@"; do  # (expanded once: the set below does not change the list)
    set -- $spec; layers=$1; repeats=$2; shift 2
    run_step "link-$layers-layers-$tag" 200 python3 bench/link_speed.py --layers $layers --repeats $repeats \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --transport nccl p2p --variants "$variant" "$@" \
      --json "$OUT/link_speed-${layers}layers-$tag.json" --markdown "$OUT/link_speed-${layers}layers-$tag.md"
  done
}

for step in ${STEPS:-tests link}; do
  case $step in
    tests) run_step gpu-tests ${TESTS_LIMIT:-560} python3 -m pytest -q -m gpu tests -p no:cacheprovider -rf ;;
    # the same in two device calls (session 6: the whole suite took ~540 s, near a call's 600 s)
    testsfaults) run_step gpu-tests-faults 330 python3 -m pytest -q -m gpu tests/test_faults_gpu.py -p no:cacheprovider -rf ;;
    testsrest) run_step gpu-tests-rest 330 python3 -m pytest -q -m gpu tests --ignore=tests/test_faults_gpu.py -p no:cacheprovider -rf ;;
    tests1) run_step gpu-tests-one-gpu 240 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rf ;;
    # the CPU suite on this machine's torch/triton: no GPU visible, so conftest turns the interpreter on
    suite) run_step whole-suite ${SUITE_LIMIT:-420} env CUDA_VISIBLE_DEVICES= python3 -m pytest -q tests -p no:cacheprovider -rf ;;
    link) run_step link-speed 420 python3 bench/link_speed.py --json "$OUT/link_speed.json" \
      --plot "$OUT/link_speed.png" --markdown "$OUT/link_speed.md" ${LINK_ARGS:-} ;;
    link16) run_step link-speed-16-layers 300 python3 bench/link_speed.py --layers 16 --repeats 5 \
      --configs qwen3-30b-a3b-bf16 tiny-bf16 --presets qwen3-30b-a3b --json "$OUT/link_speed-16layers.json" ;;
    # two staging slots (layers overlap): a budget of 2 layers next to the default one (issue 12)
    overlap) run_step link-16-overlap 300 python3 bench/link_speed.py --layers 16 --repeats 5 --budgets 2 \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor per-expert blocking \
      --json "$OUT/link_speed-overlap-16layers.json" --markdown "$OUT/link_speed-overlap-16layers.md"
      run_step timeline-overlap 120 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16 --budget-layers 2 ;;
    # session 5: 4/16/48 layers at the default budget and at 2 layers (two staging slots), the
    # flight recorder off (host time of a NCCL post), and the kernel timelines of the overlap
    overlap5) run_step link-4-layers 200 python3 bench/link_speed.py --layers 4 --repeats 7 --budgets 2 \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor per-expert blocking worker \
      --json "$OUT/link_speed-4layers.json" --markdown "$OUT/link_speed-4layers.md"
      run_step link-16-layers 200 python3 bench/link_speed.py --layers 16 --repeats 5 --budgets 2 \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor per-expert blocking worker \
      --json "$OUT/link_speed-16layers.json" --markdown "$OUT/link_speed-16layers.md"
      run_step link-48-layers 200 python3 bench/link_speed.py --layers 48 --repeats 3 --budgets 2 \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor per-expert blocking \
      --json "$OUT/link_speed-48layers.json" --markdown "$OUT/link_speed-48layers.md"
      run_step link-48-layers-fr-off 120 env TORCH_FR_BUFFER_SIZE=0 TORCH_NCCL_TRACE_BUFFER_SIZE=0 python3 bench/link_speed.py \
      --layers 48 --repeats 3 --budgets 2 --configs qwen3-30b-a3b-bf16 tiny-bf16 --presets --methods floor blocking
      for config in qwen3-30b-a3b-bf16 deepseek-v3-fp8; do
        run_step "trace-$config" 90 python3 bench/overlap_trace.py --config $config --layers 16 --budget-layers 2; done ;;
    # how much of each SM the pack/unpack kernels take while a NCCL kernel runs beside them
    # (overlapped layers): the grid cap per SM, 16 (default) / 8 / 4
    ppsm) for programs in ${PPSM_VALUES:-16 8 4}; do
        run_step "link-16-layers-ppsm$programs" 90 env EPLB_TRITON_PROGRAMS_PER_SM=$programs python3 bench/link_speed.py \
          --layers 16 --repeats 5 --budgets 2 --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 --presets --methods floor blocking \
          --json "$OUT/link_speed-ppsm$programs.json"; done
      for programs in ${PPSM_TRACES:-8}; do
        run_step trace-deepseek-ppsm$programs 90 env EPLB_TRITON_PROGRAMS_PER_SM=$programs python3 bench/overlap_trace.py \
          --config deepseek-v3-fp8 --layers 16 --budget-layers 2; done ;;
    # session 6: stacked layers (several layers per exchange) at budgets of 2 / 4 / 8 / 16 layers
    stack) run_step stacked-gpu-tests 120 python3 -m pytest -q -m gpu tests/test_stacked.py tests/test_launch_counts.py -p no:cacheprovider -rf
      for layers in ${STACK_LAYERS:-48 16 4}; do
        run_step "link-$layers-layers-stacked" 150 python3 bench/link_speed.py --layers $layers --repeats ${STACK_REPEATS:-5} \
          --budgets ${STACK_BUDGETS:-2 4 8 16/8} --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets \
          --methods floor per-expert blocking --json "$OUT/link_speed-${layers}layers-stacked.json" \
          --markdown "$OUT/link_speed-${layers}layers-stacked.md"; done
      for config in ${TRACE_CONFIGS:-qwen3-30b-a3b-bf16 deepseek-v3-fp8}; do
        run_step "trace-$config-stacked" 90 python3 bench/overlap_trace.py --config $config --layers 16 --budget-layers 8; done
      run_step timeline-stacked 120 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16 --budget-layers 8 ;;
    # session 7: p2p pulls on a side stream, two slots of the symmetric buffer
    p2pslots) run_step p2p-gpu-tests ${P2P_TESTS_LIMIT:-280} python3 -m pytest -q -m gpu tests/test_p2p_gpu.py \
        tests/test_faults_gpu.py -k "p2p" -p no:cacheprovider -rf
      for layers in ${P2P_LAYERS:-48 16}; do
        run_step "link-$layers-layers-p2p-slots" 150 python3 bench/link_speed.py --layers $layers --repeats ${P2P_REPEATS:-7} \
          --budgets 2 8 --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking \
          --transport nccl p2p --json "$OUT/link_speed-${layers}layers-p2p-slots.json" \
          --markdown "$OUT/link_speed-${layers}layers-p2p-slots.md"; done ;;
    # the GPU tests runs 27 and 29 did not cover (session 7's last call)
    testsother) run_step gpu-tests-other ${TESTS_LIMIT:-300} python3 -m pytest -q -m gpu tests --ignore=tests/test_faults_gpu.py \
        --ignore=tests/test_p2p_gpu.py --ignore=tests/test_transfer_gpu.py --ignore=tests/test_stacked.py \
        --ignore=tests/test_launch_counts.py -p no:cacheprovider -rf ;;
    # session 7: the worker with more staging buffers (TransferWorker(layers_ahead=N))
    ahead) for layers in ${AHEAD_LAYERS:-16 48}; do
        run_step "link-$layers-layers-worker-ahead" 150 python3 bench/link_speed.py --layers $layers --repeats 5 \
          --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker \
          --worker-ahead ${AHEAD_VALUES:-4 16} --json "$OUT/link_speed-${layers}layers-worker-ahead.json" \
          --markdown "$OUT/link_speed-${layers}layers-worker-ahead.md"; done ;;
    # session 8, first call: the GPU tests of session 7's last mends (never run on GPUs), then 'ahead'
    tests8) run_step gpu-tests-session8 ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_stacked.py \
        tests/test_launch_counts.py tests/test_transfer_gpu.py tests/test_worker.py -p no:cacheprovider -rf ;;
    # session 8: the worker thread queues layers ahead of their publication (as many as its buffers)
    worker8) run_step gpu-tests-worker ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_worker.py tests/test_pacing.py \
        tests/test_faults_gpu.py -k "worker or Worker or pac" -p no:cacheprovider -rf
      for layers in ${AHEAD_LAYERS:-48 16}; do
        run_step "link-$layers-layers-worker-queued" 150 python3 bench/link_speed.py --layers $layers --repeats 5 \
          --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker \
          --worker-ahead ${AHEAD_VALUES:-4 16} --transport nccl p2p --json "$OUT/link_speed-${layers}layers-worker-queued.json" \
          --markdown "$OUT/link_speed-${layers}layers-worker-queued.md"; done
      for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16}; do
        run_step "worker-phases-$config" 90 python3 bench/worker_steps.py --config "$config" --layers 16 --layers-ahead 16 \
          --phases --json "$OUT/worker-phases-$config.json"; done ;;
    # session 8: pacing over p2p hung in run 33 (stacks printed after 60 s), and the worker alone / with wait()
    diag8) run_step pacing-p2p-stacks 140 env EPLB_TRITON_DUMP_STACKS_S=${DUMP_S:-60} python3 bench/pacing.py --transport p2p \
        --timeout 110 --out "$OUT" ${PACING_ARGS:-}
      for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16}; do
        for ahead in ${DIAG_AHEAD:-16 2}; do
          run_step "worker-phases-$config-ahead$ahead" 90 python3 bench/worker_steps.py --config "$config" --layers 16 \
            --layers-ahead $ahead --phases --json "$OUT/worker-phases-$config-ahead$ahead.json"; done; done ;;
    # session 8: pacing over p2p three times (run 33 hung once; stacks after DUMP_S), then the worker's numbers
    hang8) for attempt in 1 2 3; do
        run_step pacing-p2p-attempt$attempt 100 env EPLB_TRITON_DUMP_STACKS_S=${DUMP_S:-50} python3 bench/pacing.py \
          --transport p2p --timeout 80 ${PACING_ARGS:-}; done ;;
    # session 8, last call: kernels loaded at submit (the run-35 deadlock), GPU tests, pacing twice over p2p, once over NCCL
    final8) run_step gpu-tests-final8 ${TESTS_LIMIT:-150} python3 -m pytest -q -m gpu tests/test_worker.py tests/test_p2p_gpu.py \
        tests/test_pacing.py -p no:cacheprovider -rf
      for attempt in 1 2; do
        run_step pacing-p2p-final$attempt 100 env EPLB_TRITON_DUMP_STACKS_S=${DUMP_S:-50} python3 bench/pacing.py \
          --transport p2p --timeout 80 --out "$OUT"; done
      run_step pacing-final 100 env EPLB_TRITON_DUMP_STACKS_S=${DUMP_S:-50} python3 bench/pacing.py --timeout 80 --out "$OUT"
      run_step link-48-layers-worker-final 120 python3 bench/link_speed.py --layers 48 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker --worker-ahead 16 \
        --json "$OUT/link_speed-48layers-worker-final.json" --markdown "$OUT/link_speed-48layers-worker-final.md" ;;
    # session 9, first call: the GPU tests of session 8's last commits (warm-up exchange, never
    # run on GPUs), then 48-layer timelines of the blocking path (how much of a call the prefix is)
    tests9) run_step gpu-tests-session9 ${TESTS_LIMIT:-240} python3 -m pytest -q -m gpu tests/test_worker.py tests/test_p2p_gpu.py \
        tests/test_pacing.py tests/test_faults_gpu.py -k "worker or Worker or pac or p2p" -p no:cacheprovider -rf ;;
    timeline48) for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16 deepseek-v3-fp8}; do
        for budget in ${TIMELINE_BUDGETS:-0 8}; do
          run_step "timeline48-$config-b$budget" 90 python3 bench/layer_timeline.py --config "$config" --layers ${PROF_LAYERS:-48} \
            $([ "$budget" = 0 ] || echo --budget-layers $budget); done; done ;;
    # session 9: the worker's stacks (several layers per exchange from layers_ahead 4 on), next to
    # the same worker with one layer per exchange, over NCCL and p2p
    stack9) run_step gpu-tests-stack9 ${TESTS_LIMIT:-220} python3 -m pytest -q -m gpu tests/test_worker.py tests/test_p2p_gpu.py \
        tests/test_pacing.py -p no:cacheprovider -rf --durations=8
      for layers in ${AHEAD_LAYERS:-48 16}; do
        run_step "link-$layers-layers-worker-stacked" 170 python3 bench/link_speed.py --layers $layers --repeats 5 \
          --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker \
          --worker-ahead ${AHEAD_VALUES:-8 16} --worker-unstacked --transport nccl p2p \
          --json "$OUT/link_speed-${layers}layers-worker-stacked.json" --markdown "$OUT/link_speed-${layers}layers-worker-stacked.md"; done ;;
    # session 9, last call: the blocking path builds its layers in runs (the next while the one
    # before is on the wire), next to the same path with every layer built first (PLAN_AHEAD=0)
    final9) run_step gpu-tests-final9 ${TESTS_LIMIT:-250} python3 -m pytest -q -m gpu tests/test_transfer_gpu.py tests/test_stacked.py \
        tests/test_faults_gpu.py -k "not gloo and not p2p and (blocking or Blocking or transfer or stack)" -p no:cacheprovider -rf --durations=5
      for layers in ${FINAL_LAYERS:-48 16}; do
        run_step "link-$layers-layers-runs" 170 python3 bench/link_speed.py --layers $layers --repeats 5 \
          --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor per-expert blocking worker \
          --worker-ahead 16 --budgets 8 --variants EPLB_TRITON_PLAN_AHEAD=0 \
          --json "$OUT/link_speed-${layers}layers-runs.json" --markdown "$OUT/link_speed-${layers}layers-runs.md"; done ;;
    # session 9, final numbers: every row of the README's tables (both transports), 48/16/4 layers,
    # and where the stacked worker's time goes (48 layers, 16 buffers)
    numbers9) run_step gpu-tests-numbers9 ${TESTS_LIMIT:-150} python3 -m pytest -q -m gpu tests/test_transfer_gpu.py tests/test_stacked.py \
        -p no:cacheprovider -rf
      for spec in "48 5 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets" "16 5 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b" \
                  "4 7 qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets"; do
        set -- $spec; layers=$1; repeats=$2; shift 2
        run_step "link-$layers-layers-final9" 200 python3 bench/link_speed.py --layers $layers --repeats $repeats --configs "$@" \
          --methods floor per-expert blocking worker --worker-ahead 16 --budgets 8 --transport nccl p2p \
          --json "$OUT/link_speed-${layers}layers-final9.json" --markdown "$OUT/link_speed-${layers}layers-final9.md"; done
      run_step worker-phases-stacked 120 python3 bench/worker_steps.py --config qwen3-30b-a3b-bf16 --layers 48 --layers-ahead 16 \
        --phases --json "$OUT/worker-phases-stacked.json" ;;
    # session 9, last: the stacking worker schedules a pass within two layers' rows (balancer
    # placements in one pass), the presets and the reference configs
    onepass9) run_step gpu-tests-onepass9 ${TESTS_LIMIT:-120} python3 -m pytest -q -m gpu tests/test_worker.py -p no:cacheprovider -rf
      run_step link-16-layers-onepass9 200 python3 bench/link_speed.py --layers 16 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor blocking worker \
        --worker-ahead 8 16 --worker-unstacked --json "$OUT/link_speed-16layers-onepass9.json" \
        --markdown "$OUT/link_speed-16layers-onepass9.md" ;;
    # session 9: a peer killed or stalled while the worker moves stacks (NCCL and p2p)
    faults9) run_step gpu-faults-worker-stacked ${TESTS_LIMIT:-300} python3 -m pytest -q -m gpu tests/test_faults_gpu.py \
        -k "worker-stacked and not gloo" -p no:cacheprovider -rf --durations=4 ;;
    # session 9, last call: the default worker (2 buffers) with two layers' rows per pass, next to one
    pass9) run_step gpu-tests-pass9 ${TESTS_LIMIT:-120} python3 -m pytest -q -m gpu tests/test_worker.py -p no:cacheprovider -rf
      run_step link-16-layers-pass9 200 python3 bench/link_speed.py --layers 16 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor per-expert blocking worker \
        --worker-variants EPLB_TRITON_WORKER_PASS_LAYERS=1 --json "$OUT/link_speed-16layers-pass9.json" \
        --markdown "$OUT/link_speed-16layers-pass9.md" ;;
    # session 10: the blocking call plans each layer once and, over NCCL without timeout_s or
    # verify, returns without waiting for the device (no final confirmation); the confirmation
    # forced back (EPLB_TRITON_CONFIRM=1) in the same run, 48/16/4 layers, and 4-layer timelines
    s10) run_step gpu-tests-s10 ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_nonblocking_gpu.py \
        tests/test_transfer_gpu.py tests/test_stacked.py -p no:cacheprovider -rf
      link_ab s10 EPLB_TRITON_CONFIRM=1
      for config in qwen3-30b-a3b-bf16 deepseek-v3-fp8; do
        run_step "timeline-$config-4" 90 python3 bench/layer_timeline.py --config $config --layers 4; done
      run_step worker-phases-s10 120 python3 bench/worker_steps.py --config qwen3-30b-a3b-bf16 --layers 48 --layers-ahead 16 \
        --phases --repeats 3 --json "$OUT/worker-phases-s10.json" ;;
    # session 10: messages sent straight from the weights (runs of rows), two slots of receives
    # at the default budget; packed messages (EPLB_TRITON_DIRECT_SENDS=0) in the same run
    direct10) run_step gpu-tests-direct10 ${TESTS_LIMIT:-240} python3 -m pytest -q -m gpu tests/test_executor.py \
        tests/test_nonblocking_gpu.py tests/test_transfer_gpu.py tests/test_stacked.py tests/test_p2p_gpu.py -k "not stalled" -p no:cacheprovider -rf
      run_step gpu-faults-direct10 ${TESTS_LIMIT:-150} python3 -m pytest -q -m gpu tests/test_faults_gpu.py \
        -k "blocking-overlapped and nccl and not p2p" -p no:cacheprovider -rf
      link_ab direct10 EPLB_TRITON_DIRECT_SENDS=0  # (run 49: direct sends were the default then)
      run_step timeline-direct10 90 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16 ;;
    # session 10, last call: every GPU test but the fault tests, then the blocking fault cases over NCCL
    final10) run_step gpu-tests-rest-final10 ${TESTS_LIMIT:-330} python3 -m pytest -q -m gpu tests --ignore=tests/test_faults_gpu.py \
        -p no:cacheprovider -rf --durations=5
      run_step gpu-faults-blocking-final10 180 python3 -m pytest -q -m gpu tests/test_faults_gpu.py -k "blocking and nccl and not p2p" \
        -p no:cacheprovider -rf ;;
    # session 10: issue 17's numbers on today's code: p2p next to NCCL at 48 layers (blocking,
    # worker with 16 buffers), and the serving loop's slowdown during a worker transfer, both transports
    p2p10) run_step link-48-layers-p2p10 200 python3 bench/link_speed.py --layers 48 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker --worker-ahead 16 \
        --budgets 8 --transport nccl p2p --json "$OUT/link_speed-48layers-p2p10.json" --markdown "$OUT/link_speed-48layers-p2p10.md"
      run_step pacing-nccl10 120 python3 bench/pacing.py --timeout 100 --out "$OUT/nccl"
      run_step pacing-p2p10 120 python3 bench/pacing.py --transport p2p --timeout 100 --out "$OUT/p2p" ;;
    # session 11 (run 57): p2p copies straight from the weights (EPLB_TRITON_DIRECT_SENDS=1) next to
    # the packed p2p and NCCL rows, at 48/16/4 layers (that code was removed: over p2p the setting
    # no longer changes anything; the pushed passes replaced it)
    push11) run_step gpu-tests-push11 ${TESTS_LIMIT:-150} python3 -m pytest -q -m gpu tests/test_p2p_gpu.py \
        -k "direct or equals or one_by_one" -p no:cacheprovider -rf
      link_p2p push11 EPLB_TRITON_DIRECT_SENDS=1 "48 5 --presets --methods floor blocking" \
        "16 5 --presets --methods floor blocking" "4 7 --presets --methods floor blocking" ;;
    # session 11: p2p passes packed straight into the receivers' slots (EPLB_TRITON_P2P_PUSH=1, the
    # default) next to pulled ones (=0), NCCL and the floors; the p2p GPU and fault tests first
    pushed11) run_step gpu-tests-pushed11 ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_p2p_gpu.py \
        -p no:cacheprovider -rf
      run_step gpu-faults-p2p11 ${TESTS_LIMIT:-150} python3 -m pytest -q -m gpu tests/test_faults_gpu.py -k "p2p and blocking" \
        -p no:cacheprovider -rf
      rows="--presets qwen3-30b-a3b --methods floor per-expert blocking"
      link_p2p pushed11 EPLB_TRITON_P2P_PUSH=0 "48 5 $rows --budgets 8" "16 5 $rows" "4 7 $rows" ;;
    # session 11, after dropping copy-engine sends over p2p: the p2p and p2p fault GPU tests
    # (blocking-pushed included), 48 layers NCCL / p2p, and the timeline of 16 pushed qwen3 layers
    pushed11b) run_step gpu-tests-pushed11b ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_p2p_gpu.py \
        -p no:cacheprovider -rf
      run_step gpu-faults-p2p11b ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu tests/test_faults_gpu.py -k "p2p and blocking" \
        -p no:cacheprovider -rf
      run_step link-48-layers-pushed11b 150 python3 bench/link_speed.py --layers 48 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor blocking --transport nccl p2p \
        --json "$OUT/link_speed-48layers-pushed11b.json" --markdown "$OUT/link_speed-48layers-pushed11b.md"
      run_step timeline-pushed11b 60 env EPLB_TRITON_TRANSPORT=p2p python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16 ;;
    # session 11, last call: the GPU tests but the fault and p2p ones (those ran in pushed11b)
    final11) run_step gpu-tests-final11 ${TESTS_LIMIT:-240} python3 -m pytest -q -m gpu tests --ignore=tests/test_faults_gpu.py \
        --ignore=tests/test_p2p_gpu.py -p no:cacheprovider -rf --durations=5 ;;
    # not run yet (session 11 ran out of device time): issue 17's other rows on today's code:
    # multi_gpu.py's correctness phase over p2p, the worker (pulls) next to NCCL at 48 layers, and
    # the serving loop's slowdown during a worker transfer, both transports
    # session 12, first call: session 11's review mends (p2p.py, passes.py) on GPUs
    mends12) run_step gpu-tests-p2p12 200 python3 -m pytest -q -m gpu tests/test_p2p_gpu.py -p no:cacheprovider -rf ;;
    # session 12: warm host costs of the loop's calls and launch variants; where the pushed loop's host time goes
    hostcost12) run_step host-costs12 120 python3 bench/host_costs.py
      for spec in "tiny-bf16 48" "qwen3-30b-a3b-bf16 4"; do set -- $spec
        run_step "host-profile-p2p-$1-$2" 120 env EPLB_TRITON_TRANSPORT=p2p python3 bench/host_profile.py --config $1 \
          --layers $2 --calls 10 --top 45 --out "$OUT"; done ;;
    # session 12: one launch for a pushed layer's unpack and the next layer's pack (move_rows_pair_kernel);
    # its tests, then the blocking call at 48/16/4 layers over NCCL, p2p and p2p with two launches, and multi_gpu.py both ways
    fused12) run_step gpu-tests-fused12 300 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_p2p_gpu.py \
        tests/test_faults_gpu.py -k "move_pair or p2p_gpu or pushed" -p no:cacheprovider -rf
      link_p2p fused12 EPLB_TRITON_PAIR_LAUNCH=0 "48 5 --presets --methods floor per-expert blocking" \
        "16 5 --presets qwen3-30b-a3b --methods floor per-expert blocking" "4 7 --presets --methods floor per-expert blocking"
      run_step multi-gpu-nccl12 200 python3 bench/multi_gpu.py --backend nccl --timeout 180 --json "$OUT/multi_gpu-nccl-w2.json"
      run_step multi-gpu-p2p12 200 env EPLB_TRITON_TRANSPORT=p2p python3 bench/multi_gpu.py --backend nccl --timeout 180 \
        --json "$OUT/multi_gpu-p2p-w2.json" ;;
    # the pair launch's GPU tests alone (fused12's log did not come back)
    fusedtests12) run_step gpu-tests-fused12 400 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_p2p_gpu.py \
        tests/test_faults_gpu.py tests/test_launch_counts.py -k "move_pair or p2p_gpu or pushed or launch_counts" -p no:cacheprovider -rA ;;
    # session 12, last call: every GPU test but the fault tests, the blocking fault tests over NCCL
    # (LayerWork.finish/wait and the launcher changed for every path), and 48 layers with the preset
    final12) run_step gpu-tests-final12 260 python3 -m pytest -q -m gpu tests --ignore=tests/test_faults_gpu.py \
        -p no:cacheprovider -rf --durations=5
      run_step gpu-faults-blocking12 230 python3 -m pytest -q -m gpu tests/test_faults_gpu.py -k "blocking and not p2p" \
        -p no:cacheprovider -rf
      link_p2p final12 EPLB_TRITON_PAIR_LAUNCH=0 "48 5 --presets qwen3-30b-a3b --methods floor per-expert blocking" ;;
    # with a deadline the pushed loop waits for each barrier before it queues the next launch: what that costs
    timeout12) run_step link-48-layers-timeout12 200 python3 bench/link_speed.py --layers 48 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking --transport nccl p2p \
        --timeouts 30 --json "$OUT/link_speed-48layers-timeout12.json" --markdown "$OUT/link_speed-48layers-timeout12.md"
      run_step link-4-layers-timeout12 120 python3 bench/link_speed.py --layers 4 --repeats 7 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking --transport nccl p2p \
        --timeouts 30 --json "$OUT/link_speed-4layers-timeout12.json" --markdown "$OUT/link_speed-4layers-timeout12.md" ;;
    # the deadline's poll spins first (comm.poll_pause): stalled-peer tests, then timeout12 again
    spin12) run_step gpu-stalled12 120 python3 -m pytest -q -m gpu tests/test_p2p_gpu.py tests/test_faults_gpu.py \
        -k "stalled and blocking" -p no:cacheprovider -rf ;;
    next12) run_step multi-gpu-p2p 300 env EPLB_TRITON_TRANSPORT=p2p python3 bench/multi_gpu.py --backend nccl --timeout 280 \
        --json "$OUT/multi_gpu-p2p-w2.json"
      run_step link-48-layers-worker12 200 python3 bench/link_speed.py --layers 48 --repeats 5 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor blocking worker --worker-ahead 16 \
        --transport nccl p2p --json "$OUT/link_speed-48layers-worker12.json" --markdown "$OUT/link_speed-48layers-worker12.md"
      run_step pacing-nccl12 120 python3 bench/pacing.py --timeout 100 --out "$OUT/nccl"
      run_step pacing-p2p12 120 python3 bench/pacing.py --transport p2p --timeout 100 --out "$OUT/p2p" ;;
    # session 13: the worker's GPU and fault tests (bound swap launches, the shared-memory step
    # board), then the worker at 48 layers over both transports, with the board and with gloo
    session13) run_step gpu-tests13 300 python3 -m pytest -q -m gpu tests/test_worker.py tests/test_kernels.py \
        tests/test_nonblocking_gpu.py tests/test_p2p_gpu.py -p no:cacheprovider -rf
      for board in 1 0; do
        run_step link-48-layers-worker13-board$board 200 env EPLB_TRITON_STEP_BOARD=$board python3 bench/link_speed.py \
          --layers 48 --repeats 5 --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --methods floor blocking worker \
          --worker-ahead 16 --transport nccl p2p --json "$OUT/link_speed-48layers-worker13-board$board.json" \
          --markdown "$OUT/link_speed-48layers-worker13-board$board.md"; done ;;
    hostcosts) run_step host-costs 120 python3 bench/host_costs.py ;;
    tests7) run_step gpu-tests-session7 ${TESTS_LIMIT:-540} python3 -m pytest -q -m gpu tests/test_p2p_gpu.py \
        tests/test_faults_gpu.py tests/test_transfer_gpu.py tests/test_stacked.py tests/test_launch_counts.py -p no:cacheprovider -rf ;;
    # session 6, last call: p2p with stacks, and the host with one OpenMP thread (as vLLM's workers run)
    final6) run_step link-48-layers-p2p 200 python3 bench/link_speed.py --layers 48 --repeats 5 --budgets 2 8 \
        --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor per-expert blocking \
        --transport nccl p2p --json "$OUT/link_speed-48layers-p2p.json" --markdown "$OUT/link_speed-48layers-p2p.md"
      run_step timeline-stacked-omp1 120 env OMP_NUM_THREADS=1 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 \
        --layers 16 --budget-layers 8
      run_step timeline-stacked 120 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16 --budget-layers 8 ;;
    link48) run_step link-48-layers 200 python3 bench/link_speed.py --layers 48 --repeats 3 --budgets 2 \
      --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets --methods floor per-expert blocking \
      --json "$OUT/link_speed-48layers-final.json" --markdown "$OUT/link_speed-48layers-final.md" ;;
    faults) run_step gpu-fault-tests 300 python3 -m pytest -q -m gpu tests/test_faults_gpu.py tests/test_transfer_gpu.py -p no:cacheprovider -rf ;;
    steps) for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16}; do
        run_step "worker-steps-$config" 150 python3 bench/worker_steps.py --config "$config"; done ;;
    pacing) run_step pacing 200 python3 bench/pacing.py --out "$OUT" ${PACING_ARGS:-} ;;
    # the same settings with the p2p transport (issues 17 and 19), right after the NCCL run
    pacingp2p) run_step pacing-p2p 200 python3 bench/pacing.py --transport p2p --out "$OUT" ${PACING_ARGS:-} ;;
    worker) run_step worker-swap 200 python3 bench/gpu_worker.py --json "$OUT/gpu_worker.json" ;;
    hostprof) for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16}; do
        run_step "host-profile-$config" 120 python3 bench/host_profile.py --config "$config" --layers ${PROF_LAYERS:-4} \
          --calls 10 --top 40 --out "$OUT"; done ;;
    timeline) for config in ${PROF_CONFIGS:-qwen3-30b-a3b-bf16 tiny-bf16}; do
        run_step "timeline-$config" 120 python3 bench/layer_timeline.py --config "$config" --layers ${PROF_LAYERS:-4}; done ;;
    # the p2p transport (issue 17): its building blocks first, the rest only if they work
    p2p) run_step p2p-smoke 90 python3 -m pytest -q -s tests/test_p2p_gpu.py -k layers_one_by_one -p no:cacheprovider -rA
      if grep -q "p2p-smoke rc=0" "$LOG"; then
        run_step p2p-tests 240 python3 -m pytest -q tests/test_p2p_gpu.py -k "not layers_one_by_one" -p no:cacheprovider -rA
      fi ;;
    linkp2p) grep -q "p2p-smoke rc=[1-9]" "$LOG" && { echo "p2p smoke failed: no link-speed-p2p"; continue; }
      run_step link-speed-p2p 200 python3 bench/link_speed.py --methods floor blocking worker --transport nccl p2p \
      --presets qwen3-30b-a3b --repeats 5 --json "$OUT/link_speed_p2p.json" --markdown "$OUT/link_speed_p2p.md" ;;
    multigpu) run_step multi-gpu 300 python3 bench/multi_gpu.py --backend nccl --timeout 280 \
      --json "$OUT/multi_gpu-nccl-w2.json" ;;
    *) echo "unknown step $step" ;;
  esac
done
