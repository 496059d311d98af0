#!/usr/bin/env bash
# Full fine-tuning of Qwen2.5-VL on GPU nodes with DeepSpeed (default: 3B, one node, ZeRO-3).
# sft_7b.sh and sft_32b.sh call this with their own defaults. Every setting below can be
# overridden from the environment; extra flags are appended (the last value of a flag wins):
#   DATASETS=my_ds%50 MODEL=/models/Qwen2.5-VL-3B-Instruct bash scripts/sft.sh --max_pixels "576*28*28"
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's venv (scripts/install.sh) when it exists, else the python on PATH; PY=... overrides.
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(shuf -i 20001-29999 -n 1)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MODEL=${MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}
DATASETS=${DATASETS:-demo_single_image%100}
DEEPSPEED=${DEEPSPEED:-scripts/zero3.json}
BATCH=${BATCH:-4}           # per device
ACCUM=${ACCUM:-4}           # gradient accumulation steps
RUN_NAME=${RUN_NAME:-qwen2_5vl_3b_sft}
MAX_PIXELS=${MAX_PIXELS:-50176}   # pixels per image (Qwen2.5-VL: 28x28 per LLM token; Qwen3-VL: 32x32)
MIN_PIXELS=${MIN_PIXELS:-784}
LR=${LR:-2e-7} MM_LR=${MM_LR:-1e-5} VISION_LR=${VISION_LR:-1e-6}
OUTPUT=${OUTPUT:-./checkpoints/$RUN_NAME}

"$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    qwenvl/train/train_qwen.py \
    --deepspeed "$DEEPSPEED" \
    --model_name_or_path "$MODEL" \
    --dataset_use "$DATASETS" \
    --data_flatten True \
    --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True \
    --bf16 \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
    --max_pixels "$MAX_PIXELS" --min_pixels "$MIN_PIXELS" \
    --learning_rate "$LR" --mm_projector_lr "$MM_LR" --vision_tower_lr "$VISION_LR" \
    --weight_decay 0 --warmup_ratio 0.03 --max_grad_norm 1 --lr_scheduler_type cosine \
    --model_max_length 8192 \
    --eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 \
    --logging_steps 1 --activation_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to wandb --run_name "$RUN_NAME" "$@"
