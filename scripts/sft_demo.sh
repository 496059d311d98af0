#!/usr/bin/env bash
# Demo: full fine-tuning of a tiny random Qwen-VL on demo/ with 2 CPU processes (gloo).
# Builds the tiny model locally (no downloads). Usage: bash scripts/sft_demo.sh [extra flags]
# MODEL_TYPE picks the family: qwen2_5_vl (default), qwen2_vl, qwen3_vl or qwen3_vl_moe, e.g.
#   MODEL_TYPE=qwen3_vl MAX_STEPS=4 bash scripts/sft_demo.sh
# Pixel flags are pixels for every family (Qwen3-VL: one token per 32x32, Qwen2/2.5-VL: 28x28);
# --video_*_frame_pixels size Qwen2/2.5-VL frames, --video_*_pixels the whole Qwen3-VL clip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL_TYPE=${MODEL_TYPE:-qwen2_5_vl}
MODEL=${MODEL:-tiny_model/$MODEL_TYPE}
if [ "$MODEL_TYPE" = qwen2_5_vl ]; then OUTPUT=${OUTPUT:-output/demo}; else OUTPUT=${OUTPUT:-output/demo_$MODEL_TYPE}; fi
NPROC=${NPROC:-2}
[ -f "$MODEL/config.json" ] || "$PY" tools/build_tiny_model.py --output_dir "$MODEL" --model_type "$MODEL_TYPE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
"$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29517}" \
    qwenvl/train/train_qwen.py \
    --model_name_or_path "$MODEL" \
    --dataset_use "${DATASETS:-demo_single_image,demo_multi_image,demo_grounding,demo_text_only,demo_video}" \
    --data_flatten True \
    --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision True \
    --output_dir "$OUTPUT" \
    --max_steps "${MAX_STEPS:-40}" \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-3 --mm_projector_lr 2e-3 --vision_tower_lr 1e-3 \
    --weight_decay 0.0 --warmup_steps 2 --lr_scheduler_type cosine \
    --max_pixels "64*28*28" --min_pixels "4*28*28" \
    --video_max_frame_pixels "16*28*28" --video_min_frame_pixels "4*28*28" \
    --video_max_pixels "64*32*32" --video_min_pixels "8*32*32" \
    --model_max_length 2048 \
    --logging_steps 1 --save_steps "${SAVE_STEPS:-20}" --save_total_limit 2 \
    --dataloader_num_workers 0 --report_to none --seed 42 \
    --attn_implementation sdpa_packed --use_cpu True --ddp_backend gloo \
    "$@"
