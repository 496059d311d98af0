"""End to end: scripts/sft_demo.sh (torchrun, 2 CPU processes) trains, checkpoints, resumes and saves a loadable model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, free_port, kill_tree, python_env

pytestmark = pytest.mark.slow

DATASETS = "demo_single_image,demo_multi_image,demo_grounding,demo_text_only"


def demo_command(model_dir: Path, output_dir: Path, port: int) -> tuple[list[str], dict]:
    env = python_env() | {
        "PY": os.environ.get("PYTHON_FOR_TESTS", __import__("sys").executable),
        "MODEL": str(model_dir),
        "OUTPUT": str(output_dir),
        "MAX_STEPS": "12",
        "SAVE_STEPS": "6",
        "DATASETS": DATASETS,
        "MASTER_PORT": str(port),
    }
    return ["bash", "scripts/sft_demo.sh"], env


def wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before writing {path}")
        if time.time() > deadline:
            raise AssertionError(f"{path} not written within {timeout}s")
        time.sleep(0.5)


def test_demo_trains_checkpoints_resumes_and_saves(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    command, env = demo_command(tiny_model_dir, output, free_port())

    # 1) start, wait for the first complete checkpoint, then kill the whole torchrun group
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(output / "checkpoint-6" / "trainer_state.json", first, timeout=600)
    finally:
        kill_tree(first)
    assert not (output / "model.safetensors").exists(), "the first run should have been killed before the end"

    # 2) the same command again resumes from checkpoint-6 and finishes
    second_log = tmp_path / "second.log"
    with second_log.open("w") as sink:
        second = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            returncode = second.wait(timeout=900)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            kill_tree(second)
    log = second_log.read_text()
    assert returncode == 0, log[-4000:]
    assert f"resuming from {output / 'checkpoint-6'}" in log
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 13)), "log history should hold steps 1-6 from the checkpoint and 7-12 after"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert (output / "checkpoint-12").is_dir()

    # 3) the output folder loads for inference: model, tokenizer, image processor
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from qwenvl.train.train_qwen import load_image_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    processor = load_image_processor(str(output))
    assert processor.size["longest_edge"] == 64 * 28 * 28
    assert model.config.text_config.use_cache
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What shape?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_qwen3_moe_demo_trains_ten_steps_on_two_processes(tiny_qwen3_moe_model_dir, tmp_path):
    """scripts/sft_demo.sh on a tiny Qwen3-VL-MoE: 2 ranks, images + videos + text packed online into rows of
    512 tokens, 10 steps, aux loss logged; both ranks computed the same bins (else construction fails)."""
    output = tmp_path / "moe"
    env = python_env() | {
        "PY": __import__("sys").executable, "MODEL_TYPE": "qwen3_vl_moe", "MODEL": str(tiny_qwen3_moe_model_dir),
        "OUTPUT": str(output), "MAX_STEPS": "10", "SAVE_STEPS": "100", "MASTER_PORT": str(free_port()),
        "DATASETS": "demo_single_image,demo_video,demo_text_only",
    }
    log = tmp_path / "moe.log"
    with log.open("w") as sink:
        process = subprocess.Popen(["bash", "scripts/sft_demo.sh", "--router_aux_loss_coef", "0.01",
                                    "--data_packing", "True", "--pack_length", "512"], cwd=REPO_ROOT,
                                   env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=900)
        finally:
            kill_tree(process)
    text = log.read_text()
    assert code == 0, text[-3000:]
    logged = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 11))
    assert all(entry["aux_loss"] > 0 for entry in logged)  # the router loss, next to the loss
    assert "MoE: router aux loss on, coefficient 0.01" in text
    # find_unused_parameters decided False (every trainable weight takes part, the dummy vision passes included):
    # no DDP warning about a wasted graph walk, and no "got no gradient" stop.
    assert "find_unused_parameters=True" not in text
    packing = re.search(r"packing: (\d+) samples in (\d+) rows of 512 tokens, fill ([\d.]+)%", text)
    assert packing, text[-3000:]
    samples, rows = int(packing[1]), int(packing[2])
    assert rows < samples and float(packing[3]) > 50
    assert "the online packing bins are the same on all 2 ranks" in text
    assert "online packing: bins of epoch 1" in text  # 10 steps of 4 rows: several epochs, each its own bins
    assert (output / "model.safetensors").exists()
