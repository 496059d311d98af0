#!/usr/bin/env bash
# Full fine-tuning of Qwen3-VL-8B on one node (8 GPUs), DeepSpeed ZeRO-3: scripts/sft.sh with Qwen3-VL defaults.
# MODEL=Qwen/Qwen3-VL-4B-Instruct for the 4B model (same settings). Qwen3-VL writes one LLM token per 32x32
# pixels (patch 16, merge 2), so the pixel limits are multiples of 32*32.
set -euo pipefail
export MODEL=${MODEL:-Qwen/Qwen3-VL-8B-Instruct}
export BATCH=${BATCH:-2} ACCUM=${ACCUM:-8} RUN_NAME=${RUN_NAME:-qwen3vl_8b_sft}
export LR=${LR:-1e-5} MAX_PIXELS=${MAX_PIXELS:-$((576*32*32))} MIN_PIXELS=${MIN_PIXELS:-$((16*32*32))}
exec bash "$(dirname "$0")/sft.sh" "$@"
