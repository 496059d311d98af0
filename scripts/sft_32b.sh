#!/usr/bin/env bash
# Full fine-tuning of Qwen2.5-VL-32B (8 GPUs per node; set NNODES/NODE_RANK/MASTER_ADDR for several),
# DeepSpeed ZeRO-3 with CPU offload: scripts/sft.sh with 32B defaults.
set -euo pipefail
export MODEL=${MODEL:-Qwen/Qwen2.5-VL-32B-Instruct} DEEPSPEED=${DEEPSPEED:-scripts/zero3_offload.json}
export BATCH=${BATCH:-1} ACCUM=${ACCUM:-16} RUN_NAME=${RUN_NAME:-qwen2_5vl_32b_sft}
exec bash "$(dirname "$0")/sft.sh" "$@"
