#!/usr/bin/env bash
# Full fine-tuning of Qwen2.5-VL-7B on one node (GPUs) with FSDP2 instead of DeepSpeed.
# scripts/fsdp_config.json: FSDP2, full shard, transformer-based wrap; the wrap classes (the LLM decoder layer and
# the vision block, e.g. Qwen2_5_VLDecoderLayer + Qwen2_5_VLVisionBlock) are read from the model when the config
# does not list them (qwenvl/train/distributed.py). FSDP1 recipes (backward_prefetch, limit_all_gathers,
# sync_module_states, use_orig_params) need "version": 1 in the config; FSDP2 ignores those keys (a warning says so).
#
# FSDP shards only on GPUs: on CPU accelerate silently runs DDP, and the run logs
# "--fsdp was requested but accelerate runs MULTI_CPU, not FSDP ...".
# Check on a GPU machine (2+ GPUs), a few steps of the tiny model:
#   python tools/build_tiny_model.py --output_dir tiny_model/qwen2_5_vl
#   NPROC_PER_NODE=2 MODEL=tiny_model/qwen2_5_vl OUTPUT=output/fsdp_check bash scripts/sft_fsdp.sh \
#       --max_steps 5 --report_to none --attn_implementation sdpa 2>&1 | tee output/fsdp_check.log
#   grep -c "not FSDP" output/fsdp_check.log   # must print 0; "FSDP2 wraps [...]" must be there
#   python -c "import transformers as t; t.AutoModelForImageTextToText.from_pretrained('output/fsdp_check')"
# Extra flags are appended (the last value of a flag wins).
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
OUTPUT=${OUTPUT:-./checkpoints/qwen2_5vl_7b_fsdp}

"$PY" -m torch.distributed.run --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    qwenvl/train/train_qwen.py \
    --fsdp "full_shard auto_wrap" --fsdp_config scripts/fsdp_config.json \
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
    --weight_decay 0 --warmup_steps 0.03 --max_grad_norm 1 --lr_scheduler_type cosine \
    --model_max_length 8192 \
    --eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 \
    --logging_steps 1 \
    --dataloader_num_workers 4 \
    --report_to wandb --run_name qwen2_5vl_7b_fsdp "$@"
