"""Merge a LoRA output folder into its base model: a full checkpoint that loads with ``from_pretrained``.

The adapter (and the merger / vision modules trained fully next to it) is
folded into the base weights; the tokenizer, chat template and image processor
(with the training pixel limits) are copied from the LoRA folder.

Usage:
    python tools/merge_lora.py --lora output/lora_demo --output_dir output/lora_demo_merged
    python tools/merge_lora.py --lora output/lora_demo/checkpoint-20 --base_model Qwen/Qwen2.5-VL-3B-Instruct \\
        --output_dir merged --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/merge_lora.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> Path:
    from qwenvl.train.lora import merge_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--lora", required=True, help="folder with adapter_config.json (--lora_enable output)")
    parser.add_argument("--output_dir", required=True, help="where to write the merged checkpoint")
    parser.add_argument("--base_model", default=None, help="base checkpoint (default: the one the adapter names)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merged weights")
    args = parser.parse_args(argv)
    path = merge_lora(args.lora, args.output_dir, base_model=args.base_model, dtype=DTYPES[args.dtype])
    print(f"merged {args.lora} -> {path}")
    return path


if __name__ == "__main__":
    main()
