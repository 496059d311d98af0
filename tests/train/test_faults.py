"""Faults that lose work, done for real on the tiny model (qwenvl/train/runs.py).

One sequence shares a training subprocess and an in-process rerun:

1. A run is started; while it lives, a second run on the same ``--output_dir`` is refused (naming
   the first's pid and host), and another rank of the same run is not.
2. The first run is SIGKILLed in the middle of saving ``checkpoint-4`` (its ``trainer_state.json``
   half written, as when the kill lands during the Trainer's last write).
3. The same command again: the dead run's lock does not block, ``checkpoint-4`` is skipped with a
   warning naming the file, the run resumes from ``checkpoint-2``, steps 3 and 4 repeat the killed
   run's losses, and it finishes at step 6.
4. Damaged checkpoints of that finished run (a truncated ``model.safetensors``, a corrupt
   ``trainer_state.json``, a truncated ``optimizer.pt``): each is skipped for the previous complete
   one with a warning naming the file; with none left the run stops naming them, never a fresh start.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from qwenvl.train.argument import ConfigError
from qwenvl.train.runs import LOCK_FILE, checkpoint_problem, find_resume_checkpoint, hold_output_dir
from qwenvl.train.train_qwen import train
from tests.conftest import PYTHON, REPO_ROOT, kill_tree, python_env

pytestmark = pytest.mark.slow


def flags(model_dir: Path, output: Path, max_steps: int = 6) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output), "--dataset_use", "demo_text_only",
            "--tune_mm_llm", "True", "--max_steps", str(max_steps), "--save_steps", "2",
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--logging_steps", "1",
            "--model_max_length", "512", "--report_to", "none", "--attn_implementation", "sdpa",
            "--use_cpu", "True", "--dataloader_num_workers", "0", "--seed", "3"]


def printed_losses(log: str) -> dict[int, float]:
    """The loss of each step in the Trainer's printed log dicts, in order (steps 1, 2, ...)."""
    losses = [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"^(\{'loss'.*\})$", log, re.M)]
    return dict(enumerate(losses, start=1))


def lock_holder(output: Path) -> dict | None:
    """What the run holding ``output`` wrote into its lock file, or None before it wrote it."""
    try:
        return json.loads((output / LOCK_FILE).read_text()) or None
    except (FileNotFoundError, ValueError):
        return None


def test_refused_second_run_kill_while_saving_and_damaged_checkpoints(tiny_model_dir, tmp_path, capfd):
    output, go, log_path = tmp_path / "run", tmp_path / "go", tmp_path / "first.log"
    command = [PYTHON, "tests/train/fault_worker.py", str(go), "4", "trainer_state.json:0.5",
               *flags(tiny_model_dir, output)]
    with log_path.open("w") as log:
        first = subprocess.Popen(command, cwd=REPO_ROOT, env=python_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        # 1. The first run holds --output_dir from its start; it waits after step 1 until told to go on.
        deadline = time.time() + 300
        while (holder := lock_holder(output)) is None:
            assert first.poll() is None, log_path.read_text()[-5000:]
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as refused:
            train(flags(tiny_model_dir, output))
        assert str(refused.value).startswith(
            f"--output_dir {output} is in use by another run (pid {first.pid} on host {socket.gethostname()}, "
            f"started {holder['started']}; lock {output / LOCK_FILE})")
        with hold_output_dir(str(output), is_main=False) as taken:  # another rank of the same run
            assert taken is None

        # 2. Go on: the run is killed while it saves checkpoint-4.
        go.touch()
        assert first.wait(timeout=300) == -9, log_path.read_text()[-5000:]
    finally:
        if first.poll() is None:
            kill_tree(first)
    first_log = log_path.read_text()
    assert f"killing myself in the middle of saving {output / 'checkpoint-4'}" in first_log
    assert not (output / "model.safetensors").exists()
    killed_losses = printed_losses(first_log)
    assert sorted(killed_losses) == [1, 2, 3, 4]

    # 3. The same command: not blocked by the dead run's lock, resumes from checkpoint-2, finishes.
    capfd.readouterr()
    train(flags(tiny_model_dir, output))
    text = capfd.readouterr().err
    assert (f"skipping checkpoint {output / 'checkpoint-4'}: trainer_state.json: not valid JSON" in text), text[-3000:]
    assert f"resuming from {output / 'checkpoint-2'}" in text
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (output / "training_complete.json").exists()
    history = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3, 4):  # 1-2 from checkpoint-2's state; 3-4 trained again, on the same batches
        assert history[step] == pytest.approx(killed_losses[step], rel=1e-3), (step, history, killed_losses)
    assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()

    # 4. Damaged checkpoints: each falls back to the previous complete one, with a warning naming the file.
    for step in (2, 4, 6):
        assert checkpoint_problem(str(output / f"checkpoint-{step}")) is None
    weights = output / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    assert find_resume_checkpoint(str(output)) == str(output / "checkpoint-4")
    assert (f"skipping checkpoint {output / 'checkpoint-6'}: model.safetensors: {size - 100} bytes, expected {size} "
            "from its header (truncated)") in capfd.readouterr().err
    (output / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    assert find_resume_checkpoint(str(output)) == str(output / "checkpoint-2")
    assert f"skipping checkpoint {output / 'checkpoint-4'}: trainer_state.json: not valid JSON" in capfd.readouterr().err
    optimizer = output / "checkpoint-2" / "optimizer.pt"
    os.truncate(optimizer, optimizer.stat().st_size // 2)
    assert checkpoint_problem(str(output / "checkpoint-2")).startswith(
        "optimizer.pt: not a complete torch.save archive (")
    # None left: a run asked for more steps stops before the model loads, naming every damaged file.
    with pytest.raises(ConfigError) as stopped:
        train(flags(tiny_model_dir, output, max_steps=8))
    message = str(stopped.value)
    assert message.startswith(f"no complete checkpoint to resume from in {output}: ")
    for name in ("checkpoint-6/model.safetensors: ", "checkpoint-4/trainer_state.json: not valid JSON",
                 "checkpoint-2/optimizer.pt: not a complete torch.save archive"):
        assert name in message, (name, message)
    assert message.endswith("or --overwrite_output_dir to start from step 0")
    with pytest.raises(ConfigError, match=re.escape(
            f"--resume_from_checkpoint {output / 'checkpoint-6'}: not a complete checkpoint (model.safetensors: "
            f"{size - 100} bytes, expected {size} from its header (truncated))")):
        train([*flags(tiny_model_dir, output, max_steps=8), "--resume_from_checkpoint", str(output / "checkpoint-6")])
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6  # nothing trained


def test_interrupted_saves_only_start_from_step_0_with_a_warning(tmp_path, caplog):
    (tmp_path / "checkpoint-2").mkdir()  # a kill before trainer_state.json, the Trainer's last file
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert find_resume_checkpoint(str(tmp_path)) is None
    assert "skipping checkpoint %s: trainer_state.json: missing (the run stopped while saving)" % (
        tmp_path / "checkpoint-2") in caplog.text
    assert f"no complete checkpoint in {tmp_path} (every save was interrupted): starting from step 0" in caplog.text
