"""Eval set + best-model selection, and resume-equals-uninterrupted (CPU, tiny model, fixed seed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments
from qwenvl.train.train_qwen import load_image_processor, train
from tests.conftest import PYTHON, REPO_ROOT, kill_tree, python_env

pytestmark = pytest.mark.slow


def log_history(output: Path) -> list[dict]:
    return json.loads((output / "trainer_state.json").read_text())["log_history"]


# ----------------------------------------------------------------------- eval
EVAL_FLAGS = ["--max_pixels", "16*28*28", "--min_pixels", "4*28*28", "--model_max_length", "1024"]


@torch.no_grad()
def reference_eval_loss(model_dir: Path, tokenizer, batch_size: int) -> float:
    """The Trainer's eval_loss by hand: per-batch mean token loss, weighted by batch size, over the eval set."""
    cfg = VisionConfig.from_image_processor(load_image_processor(str(model_dir)), 4 * 28 * 28, 16 * 28 * 28)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="demo_grounding"), cfg, model_max_length=1024)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        total += model(**collate(items)).loss.item() * len(items)
        count += len(items)
    return total / count


def test_eval_loss_and_best_model_selection(tiny_model_dir, tokenizer, tmp_path):
    output = tmp_path / "eval"
    # Train on text, evaluate on grounding with a high constant LR: the eval loss falls, then rises (overfit).
    train([
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_text_only",
        "--eval_dataset_use", "demo_grounding", "--tune_mm_llm", "True", "--output_dir", str(output),
        "--max_steps", "6", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "3e-2", "--lr_scheduler_type", "constant", *EVAL_FLAGS, "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "2",
        "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_loss", "--report_to", "none",
        "--attn_implementation", "sdpa", "--use_cpu", "True", "--dataloader_num_workers", "0", "--seed", "42",
    ])
    evals = {e["step"]: e["eval_loss"] for e in log_history(output) if "eval_loss" in e}
    assert sorted(evals) == [1, 2, 3, 4, 5, 6]
    best = min(evals, key=evals.get)
    assert best != 6, f"precondition: the best step should not be the last one ({evals})"
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(output / f"checkpoint-{best}")
    assert state["best_metric"] == pytest.approx(evals[best])

    final = load_file(output / "model.safetensors")
    best_weights = load_file(output / f"checkpoint-{best}" / "model.safetensors")
    last_weights = load_file(output / "checkpoint-6" / "model.safetensors")
    assert final.keys() == best_weights.keys()
    assert all(torch.equal(final[k], best_weights[k]) for k in final), "the saved model is the best checkpoint"
    assert any(not torch.equal(final[k], last_weights[k]) for k in final)
    # eval_loss is a real loss over the eval set: recompute it with the saved (best) model
    assert reference_eval_loss(output, tokenizer, batch_size=2) == pytest.approx(evals[best], abs=1e-4)


# --------------------------------------------------------------------- resume
RESUME_FLAGS = [
    "--dataset_use", "demo_single_image", "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
    "--max_steps", "8", "--save_steps", "4", "--per_device_train_batch_size", "2",
    "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "2", *EVAL_FLAGS,
    "--logging_steps", "1", "--include_num_input_tokens_seen", "True", "--report_to", "none",
    "--attn_implementation", "sdpa", "--use_cpu", "True", "--dataloader_num_workers", "0", "--seed", "7",
]


def start(model_dir: Path, output: Path, log: Path) -> subprocess.Popen:
    command = [PYTHON, "qwenvl/train/train_qwen.py", "--model_name_or_path", str(model_dir),
               "--output_dir", str(output), *RESUME_FLAGS]
    env = python_env() | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process: subprocess.Popen, log: Path) -> None:
    try:
        assert process.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if process.poll() is None:
            kill_tree(process)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    # 12 samples, batch 2: 6 steps per epoch. The checkpoint is mid-epoch and the resumed steps cross into
    # epoch 2 (reshuffled), so both the skipped batches and the next epoch's order must match.
    whole = tmp_path / "whole"
    finish(start(tiny_model_dir, whole, tmp_path / "whole.log"), tmp_path / "whole.log")

    broken = tmp_path / "broken"
    first = start(tiny_model_dir, broken, tmp_path / "first.log")
    try:
        deadline = time.time() + 600
        while not (broken / "checkpoint-4" / "trainer_state.json").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
    finally:
        kill_tree(first)  # killed right after its checkpoint
    # Should the kill land late (a busy machine), put the folder back to "killed after checkpoint-4".
    shutil.rmtree(broken / "checkpoint-8", ignore_errors=True)
    for name in ("model.safetensors", "trainer_state.json"):
        (broken / name).unlink(missing_ok=True)

    finish(start(tiny_model_dir, broken, tmp_path / "second.log"), tmp_path / "second.log")
    assert "resuming from " + str(broken / "checkpoint-4") in (tmp_path / "second.log").read_text()

    def steps(output: Path) -> dict[int, dict]:
        return {e["step"]: e for e in log_history(output) if "loss" in e}

    expected, resumed = steps(whole), steps(broken)
    assert sorted(resumed) == list(range(1, 9))  # steps 1-4 come from the checkpoint's state
    for step in range(5, 9):
        for key in ("num_input_tokens_seen", "learning_rate"):  # same data order, same schedule
            assert resumed[step][key] == expected[step][key], (step, key)
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    final_whole, final_resumed = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    for key in final_whole:
        torch.testing.assert_close(final_resumed[key], final_whole[key], rtol=1e-6, atol=1e-7)
