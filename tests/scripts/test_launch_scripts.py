"""The GPU launch scripts: every flag they pass exists in train_qwen.py's parser and parses.

The scripts cannot run here (no GPUs), so ``PY`` is replaced by a recorder that
writes the command line; the training flags after ``qwenvl/train/train_qwen.py``
then go through the real ``HfArgumentParser``. A flag transformers dropped (as
5.x dropped ``--warmup_ratio``) or a typo fails here instead of on the cluster.
"""

from __future__ import annotations

import argparse
import subprocess

import pytest
import transformers

from qwenvl.train.argument import DataArguments, ModelArguments, TrainingArguments
from tests.conftest import REPO_ROOT, python_env

ENTRY = "qwenvl/train/train_qwen.py"


def launch(script: str, tmp_path, **env: str) -> list[str]:
    """Run ``scripts/<script>`` with a recording PY; the argv it would give python."""
    record = tmp_path / "argv.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    variables = python_env() | {"PY": str(fake), "NPROC_PER_NODE": "8", "MASTER_PORT": "29999"} | env
    done = subprocess.run(["bash", f"scripts/{script}", "--seed", "7"], cwd=REPO_ROOT, env=variables,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


def training_flags(argv: list[str]) -> argparse.Namespace:
    """Parse the flags after the entry point with train_qwen.py's parser; unknown flags fail."""
    flags = argv[argv.index(ENTRY) + 1:]
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), allow_abbrev=False)
    namespace, unknown = argparse.ArgumentParser.parse_known_args(parser, flags)
    assert unknown == [], f"flags train_qwen.py does not know: {unknown}"
    return namespace


@pytest.mark.parametrize("script,model,deepspeed,batch,accum", [
    ("sft.sh", "Qwen/Qwen2.5-VL-3B-Instruct", "scripts/zero3.json", 4, 4),
    ("sft_7b.sh", "Qwen/Qwen2.5-VL-7B-Instruct", "scripts/zero3.json", 2, 8),
    ("sft_32b.sh", "Qwen/Qwen2.5-VL-32B-Instruct", "scripts/zero3_offload.json", 1, 16),
])
def test_full_fine_tuning_scripts(script, model, deepspeed, batch, accum, tmp_path):
    argv = launch(script, tmp_path, NNODES="2", NODE_RANK="1")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=8"} <= set(argv[:argv.index(ENTRY)])
    args = training_flags(argv)
    assert (args.model_name_or_path, args.deepspeed) == (model, deepspeed)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, accum)
    assert (REPO_ROOT / args.deepspeed).is_file()
    assert args.warmup_ratio == 0.03 and args.seed == 7  # extra flags are appended


@pytest.mark.parametrize("script,model,deepspeed,pixels,extra", [
    ("sft_qwen3_8b.sh", "Qwen/Qwen3-VL-8B-Instruct", "scripts/zero3.json", 576 * 32 * 32, None),
    ("sft_qwen3_30b_a3b.sh", "Qwen/Qwen3-VL-30B-A3B-Instruct", "scripts/zero2.json", 576 * 32 * 32, 0.001),
])
def test_qwen3_scripts(script, model, deepspeed, pixels, extra, tmp_path):
    args = training_flags(launch(script, tmp_path))
    assert (args.model_name_or_path, args.deepspeed, args.max_pixels) == (model, deepspeed, pixels)
    assert args.min_pixels == 16 * 32 * 32 and args.learning_rate == 1e-5 and args.seed == 7
    assert args.router_aux_loss_coef == extra


@pytest.mark.parametrize("script", ["sft_lora.sh", "sft_fsdp.sh"])
def test_other_gpu_scripts_use_known_flags(script, tmp_path):
    args = training_flags(launch(script, tmp_path))
    assert args.seed == 7
    for path in (args.deepspeed, args.fsdp_config):
        if path:
            assert (REPO_ROOT / path).is_file(), path


def test_environment_overrides_the_defaults(tmp_path):
    args = training_flags(launch("sft_32b.sh", tmp_path, MODEL="/models/mine", BATCH="3", DATASETS="a%10,b"))
    assert (args.model_name_or_path, args.per_device_train_batch_size, args.dataset_use) == ("/models/mine", 3, "a%10,b")
    assert args.output_dir == "./checkpoints/qwen2_5vl_32b_sft"


def test_gpu_checks_script_refuses_to_start_without_a_gpu_and_names_real_shapes():
    """scripts/gpu_checks.sh is the one prepared run for a lent GPU: here it stops at its first line, and the
    shapes it benchmarks are the bench's own."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself")
    done = subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=REPO_ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr, done.stderr[-2000:]
    from bench.train_step import SHAPES

    script = (REPO_ROOT / "scripts" / "gpu_checks.sh").read_text()
    shapes = script.split('SHAPES:-')[1].split("}")[0].split(",")
    assert shapes and all(shape in SHAPES for shape in shapes)
