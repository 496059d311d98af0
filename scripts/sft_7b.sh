#!/usr/bin/env bash
# Full fine-tuning of Qwen2.5-VL-7B on one node (8 GPUs), DeepSpeed ZeRO-3.
set -euo pipefail
cd "$(dirname "$0")/.."
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(shuf -i 20001-29999 -n 1)}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
DATASETS=${DATASETS:-demo_single_image%100}
OUTPUT=${OUTPUT:-./checkpoints/qwen2_5vl_7b}

torchrun --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    qwenvl/train/train_qwen.py \
    --deepspeed scripts/zero3.json \
    --model_name_or_path "$MODEL" \
    --dataset_use "$DATASETS" \
    --data_flatten True \
    --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True \
    --bf16 \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --max_pixels 50176 --min_pixels 784 \
    --learning_rate 2e-7 --mm_projector_lr 1e-5 --vision_tower_lr 1e-6 \
    --weight_decay 0 --warmup_ratio 0.03 --max_grad_norm 1 --lr_scheduler_type cosine \
    --model_max_length 8192 \
    --eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 \
    --logging_steps 1 --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to wandb --run_name qwen2_5vl_7b_sft "$@"
