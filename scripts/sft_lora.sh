#!/usr/bin/env bash
# LoRA fine-tuning of Qwen2.5-VL-7B on one node (GPUs), DeepSpeed ZeRO-2.
# Adapters on the LLM's attention and MLP projections; the merger trains fully next to them (--tune_mm_mlp,
# at --mm_projector_lr). Variants: --use_dora True, --use_rslora True, --lora_target_modules all-linear.
# QLoRA: add --load_in_4bit True and drop the DeepSpeed config (needs CUDA + bitsandbytes).
# The output folder holds the adapter + processor; tools/infer.py answers with it directly, and
#   python tools/merge_lora.py --lora "$OUTPUT" --output_dir "$OUTPUT-merged"
# writes a full checkpoint. Extra flags are appended (the last value of a flag wins), e.g. on CPU:
#   NPROC_PER_NODE=2 MODEL=tiny_model/qwen2_5_vl bash scripts/sft_lora.sh --bf16 False --use_cpu True --ddp_backend gloo
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's venv (scripts/install.sh) when it exists, else the python on PATH; PY=... overrides.
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(shuf -i 20001-29999 -n 1)}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
DATASETS=${DATASETS:-demo_single_image%100}
OUTPUT=${OUTPUT:-./checkpoints/qwen2_5vl_7b_lora}

"$PY" -m torch.distributed.run --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    qwenvl/train/train_qwen.py \
    --deepspeed scripts/zero2.json \
    --model_name_or_path "$MODEL" \
    --dataset_use "$DATASETS" \
    --data_flatten True \
    --lora_enable True --lora_r 64 --lora_alpha 128 --lora_dropout 0.05 \
    --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
    --tune_mm_vision False --tune_mm_mlp True \
    --bf16 \
    --output_dir "$OUTPUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
    --max_pixels 50176 --min_pixels 784 \
    --learning_rate 1e-4 --mm_projector_lr 1e-5 \
    --weight_decay 0 --warmup_steps 0.03 --max_grad_norm 1 --lr_scheduler_type cosine \
    --model_max_length 8192 \
    --eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 \
    --logging_steps 1 --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --report_to wandb --run_name qwen2_5vl_7b_lora "$@"
