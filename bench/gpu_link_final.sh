#!/usr/bin/env bash
# The link-speed tables of the README (issue 12) in one device call on two GPUs:
# 4 and 16 layers per call with both transports, 48 layers (a whole qwen3-30b-a3b model per call),
# the DeepSeek-V3 preset, and one 16-layer timeline.   OUT=... bash bench/gpu_link_final.sh
source "$(dirname "$0")/session_common.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$LOG"
run_step link-4-layers 200 python3 bench/link_speed.py --transport nccl p2p --presets qwen3-30b-a3b --repeats 7 \
  --json "$OUT/link_speed.json" --plot "$OUT/link_speed.png" --markdown "$OUT/link_speed.md"
run_step link-16-layers 200 python3 bench/link_speed.py --layers 16 --repeats 5 --transport nccl p2p \
  --configs qwen3-30b-a3b-bf16 deepseek-v3-fp8 tiny-bf16 --presets qwen3-30b-a3b --methods floor per-expert blocking worker \
  --json "$OUT/link_speed-16layers.json" --markdown "$OUT/link_speed-16layers.md"
run_step link-48-layers 200 python3 bench/link_speed.py --layers 48 --repeats 3 \
  --configs qwen3-30b-a3b-bf16 tiny-bf16 --presets --methods floor per-expert blocking worker \
  --json "$OUT/link_speed-48layers.json" --markdown "$OUT/link_speed-48layers.md"
run_step link-deepseek-preset 150 python3 bench/link_speed.py --configs --presets deepseek-v3 --repeats 5 \
  --json "$OUT/link_speed-deepseek-preset.json" --markdown "$OUT/link_speed-deepseek-preset.md"
run_step timeline 90 python3 bench/layer_timeline.py --config qwen3-30b-a3b-bf16 --layers 16
