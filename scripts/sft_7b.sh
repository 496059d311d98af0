#!/usr/bin/env bash
# Full fine-tuning of Qwen2.5-VL-7B on one node (8 GPUs), DeepSpeed ZeRO-3: scripts/sft.sh with 7B defaults.
set -euo pipefail
export MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
export BATCH=${BATCH:-2} ACCUM=${ACCUM:-8} RUN_NAME=${RUN_NAME:-qwen2_5vl_7b_sft}
exec bash "$(dirname "$0")/sft.sh" "$@"
