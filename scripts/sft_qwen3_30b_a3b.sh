#!/usr/bin/env bash
# Full fine-tuning of the MoE Qwen3-VL-30B-A3B (8 GPUs per node; NNODES/NODE_RANK/MASTER_ADDR for several):
# scripts/sft.sh with MoE defaults, router load-balancing loss on (--router_aux_loss_coef, logged with the loss).
#
# DeepSpeed ZeRO-2, not ZeRO-3, as upstream qwen-vl-finetune documents: transformers stores each layer's
# experts as one fused tensor, so ZeRO-3 would all-gather every expert of a layer for every micro-batch
# (all 30B parameters per step, whichever 3B the router picks). ZeRO-2 keeps the weights whole on each GPU and shards the optimizer states and
# gradients, which is where most of the memory goes; about 4 nodes of 8 x 80 GB.
set -euo pipefail
export MODEL=${MODEL:-Qwen/Qwen3-VL-30B-A3B-Instruct} DEEPSPEED=${DEEPSPEED:-scripts/zero2.json}
export BATCH=${BATCH:-1} ACCUM=${ACCUM:-4} RUN_NAME=${RUN_NAME:-qwen3vl_30b_a3b_sft}
export LR=${LR:-1e-5} MAX_PIXELS=${MAX_PIXELS:-$((576*32*32))} MIN_PIXELS=${MIN_PIXELS:-$((16*32*32))}
exec bash "$(dirname "$0")/sft.sh" --router_aux_loss_coef 0.001 "$@"
