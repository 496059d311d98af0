#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (about 10 minutes on one H100/H200-class GPU):
#   1) tests/gpu: Liger's fused loss equals the model's loss and gradients; flash-attention's varlen
#      kernel keeps the samples of a flattened row apart (installs liger-kernel / flash-attn if missing);
#   2) bench/train_step.py at the published Qwen2.5-VL-3B/7B and Qwen3-VL-4B/8B shapes in bf16:
#      tokens/s, peak memory and MFU, padded vs flattened, model loss vs chunked vs Liger.
# Usage: bash scripts/gpu_checks.sh [extra bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
"$PY" -c "import liger_kernel" 2>/dev/null || "$PY" -m pip install -q liger-kernel || echo "liger-kernel not installed"
"$PY" -c "import flash_attn" 2>/dev/null || "$PY" -m pip install -q --no-build-isolation flash-attn \
    || echo "flash-attn not installed"
"$PY" -m pytest -q -rs tests/gpu
"$PY" bench/train_step.py --shapes "${SHAPES:-qwen2_5_vl_3b,qwen2_5_vl_7b,qwen3_vl_4b,qwen3_vl_8b}" \
    --tokens "${TOKENS:-4096,8192,16384}" --steps 8 --warmup 2 "$@"
