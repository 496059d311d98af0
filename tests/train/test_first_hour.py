"""What a new user runs in the first hour, started with plain ``python`` (no torchrun), issue 18.

Two real training runs share the assertions (each costs ~15 s on 2 cores):

- a packed file from ``tools/pack_data.py`` given by its path, with ``--data_packing True``,
  ``--ddp_backend gloo --fsdp ...``, LoRA, bf16 and activation checkpointing, 2 epochs of 2 rows at 4
  rows per device: trains (the 1-process environment of qwenvl/train/launch.py), the summary counts
  2 epochs (not 4), says bf16 and activation checkpointing, the optimizer groups are logged once and
  the LoRA code raises no FutureWarning;
- ``--deepspeed zero3.json``: trains on 1 process instead of asking for mpi4py, and DeepSpeed's
  "Setting accelerator to CPU" appears once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import subprocess

import pytest

from qwenvl.train import launch
from qwenvl.train.tracking import OncePerRunFilter
from tests.conftest import PYTHON, REPO_ROOT, python_env
from tools.pack_data import main as pack_main

LAUNCH_VARIABLES = (*launch.LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def plain_python(model, output, *extra: str) -> subprocess.CompletedProcess:
    """``python qwenvl/train/train_qwen.py ...`` in an environment without launcher variables."""
    env = {k: v for k, v in python_env().items() if k not in LAUNCH_VARIABLES}
    command = [PYTHON, "qwenvl/train/train_qwen.py", "--model_name_or_path", str(model), "--tune_mm_llm", "True",
               "--output_dir", str(output), "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1",
               "--save_strategy", "no", "--dataloader_num_workers", "0", "--attn_implementation", "sdpa_packed",
               *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def packed_file(tiny_model_dir, tmp_path_factory):
    """demo/single_image.json with its images copied to a folder, packed there by tools/pack_data.py."""
    folder = tmp_path_factory.mktemp("first_hour_data")
    shutil.copy(REPO_ROOT / "demo" / "single_image.json", folder / "single_image.json")
    shutil.copytree(REPO_ROOT / "demo" / "images", folder / "images")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        (result,) = pack_main([str(folder / "single_image.json"), "--data_path", str(folder), "--model_name_or_path",
                               str(tiny_model_dir), "--pack_length", "400", "--model_max_length", "400",
                               "--max_pixels", "16*28*28", "--min_pixels", "4*28*28"])
    return result, printed.getvalue()


@pytest.fixture(scope="module")
def packed_run(tiny_model_dir, packed_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("first_hour_packed")
    done = plain_python(tiny_model_dir, output, "--dataset_use", str(packed_file[0].output), "--data_packing", "True",
                        "--ddp_backend", "gloo", "--fsdp", "full_shard auto_wrap", "--lora_enable", "True",
                        "--activation_checkpointing", "True", "--bf16", "True", "--num_train_epochs", "2",
                        "--per_device_train_batch_size", "4", "--max_pixels", "16*28*28", "--min_pixels", "4*28*28",
                        "--model_max_length", "400")
    return output, done.returncode, done.stdout + done.stderr


def test_pack_data_says_the_file_path_trains_when_the_media_are_beside_it(packed_file):
    result, printed = packed_file
    assert result.output.name == "single_image_pack.json"
    assert (result.num_packed, result.num_bins) == (12, 2), result
    assert f"  or, without a registry entry: --data_packing True --dataset_use {result.output}\n" in printed


def test_packed_file_by_path_with_gloo_and_fsdp_trains_on_one_process(packed_run):
    output, returncode, log = packed_run
    assert returncode == 0, log[-6000:]
    assert "Default process group has not been initialized" not in log
    assert "fsdp only works in distributed training" not in log
    assert ("launch: --fsdp full_shard auto_wrap, --ddp_backend gloo without torchrun: running as 1 process "
            "(RANK=0 WORLD_SIZE=1 MASTER_PORT=") in log
    state = json.loads((output / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"]) == (2, 2.0)
    assert (output / "adapter_model.safetensors").is_file()


def test_summary_counts_epochs_from_the_batches_and_says_precision(packed_run):
    _, returncode, log = packed_run
    assert returncode == 0, log[-6000:]
    # 2 rows, 4 per device: one (padded) batch per epoch, so 2 steps are 2 epochs (the rows/items formula said 4)
    assert "steps: 2 optimizer steps = 2.00 epoch(s) of 2 items (--num_train_epochs 2), 1 step(s) per epoch" in log
    assert "precision: bf16 (weights bfloat16); activation checkpointing on" in log
    assert "batch: 4 per device x 1 process(es) x 1 accumulation = 4 packed rows per optimizer step" in log


def test_optimizer_groups_are_logged_once_and_lora_raises_no_future_warning(packed_run):
    _, returncode, log = packed_run
    assert returncode == 0, log[-6000:]
    groups = re.findall(r"optimizer group (\S+) ", log)
    assert groups == ["llm/decay"], groups  # LoRA matrices: one group, one line (the stepping optimizer's)
    assert "stepping optimizer group llm/decay              lr=5e-05 weight_decay=0 (28 tensors)" in log
    assert "is_gradient_checkpointing" not in log
    assert not re.search(r"qwenvl/train/lora\.py:\d+: FutureWarning", log)


def test_deepspeed_zero3_without_torchrun_trains_on_one_process(tiny_model_dir, tmp_path):
    done = plain_python(tiny_model_dir, tmp_path / "out", "--dataset_use", "demo_text_only", "--deepspeed",
                        "zero3.json", "--max_steps", "1", "--per_device_train_batch_size", "2")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "mpi4py" not in log
    assert "distributed: DEEPSPEED, 1 process(es), " in log
    assert "launch: --deepspeed " in log and "zero3.json without torchrun: running as 1 process" in log
    assert log.count("Setting accelerator to CPU") == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARIABLES:  # set, then deleted: monkeypatch removes them again at teardown
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    yield monkeypatch
    launch.allow_single_process(False)


def test_single_process_env_only_for_the_command_line_and_without_a_launcher(no_launcher):
    import os
    from types import SimpleNamespace

    args = SimpleNamespace(deepspeed="zero3.json", fsdp="", ddp_backend=None)
    assert launch.single_process_env(args) is None and "RANK" not in os.environ  # a library caller: untouched
    launch.allow_single_process()
    assert launch.single_process_env(SimpleNamespace(deepspeed=None, fsdp="", ddp_backend=None)) is None
    note = launch.single_process_env(args)
    assert note.startswith("--deepspeed zero3.json without torchrun: running as 1 process (RANK=0 WORLD_SIZE=1 ")
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert int(os.environ["MASTER_PORT"]) > 0
    assert launch.single_process_env(args) is None  # now launched: a torchrun worker is never rewritten


def test_once_per_run_filter_lets_one_line_through_on_rank_0(monkeypatch):
    keep = OncePerRunFilter(("Setting accelerator to CPU",))

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)

    monkeypatch.setenv("RANK", "1")
    assert not keep.filter(record("Setting accelerator to CPU. If you have GPU ..."))
    assert keep.filter(record("something else"))
    monkeypatch.setenv("RANK", "0")
    assert keep.filter(record("Setting accelerator to CPU. If you have GPU ..."))
    assert not keep.filter(record("Setting accelerator to CPU. If you have GPU ..."))
