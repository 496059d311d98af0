"""Re-runs in the same --output_dir (qwenvl/train/runs.py) and what a short run's log shows, on real training runs.

One sequence of single-process runs of the tiny model shares the cost:
finished run -> re-run (nothing trains) -> record lost after the last checkpoint (no step past
--max_steps) -> --resume_from_checkpoint an older checkpoint -> --overwrite_output_dir.
"""

from __future__ import annotations

import hashlib
import json

from qwenvl.train.runs import FINISHED_FILE
from qwenvl.train.train_qwen import train


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(folder) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def logged_steps(folder) -> list[int]:
    return [entry["step"] for entry in state(folder)["log_history"] if "loss" in entry]


def test_rerun_resume_and_overwrite(tiny_model_dir, tmp_path, capfd):
    output = tmp_path / "run"
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image,demo_text_only",
              "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--output_dir", str(output),
              "--per_device_train_batch_size", "2", "--save_steps", "2", "--use_cpu", "True", "--report_to", "none",
              "--max_pixels", "64*28*28", "--min_pixels", "4*28*28", "--attn_implementation", "sdpa"]

    # 1. A short run with the default logging: summary once, the loss shows, no model config dump.
    train([*common, "--max_steps", "4"])
    log = capfd.readouterr()
    text = log.out + log.err
    assert text.count("start-up summary") == 1
    for line in ("model: %s (qwen2_5_vl, Qwen2_5_VLForConditionalGeneration), attention sdpa" % tiny_model_dir,
                 "data: demo_single_image 12, demo_text_only 8; batches padded",
                 "batch: 2 per device x 1 process(es) x 1 accumulation = 2 samples per optimizer step",
                 "steps: 4 optimizer steps = 0.40 epoch(s) of 20 items (--max_steps 4)",
                 "projector (merger): trainable"):
        assert line in text, line
    assert "'loss':" in text  # step 1 (--logging_first_step), although --logging_steps is 10
    assert '"vision_config"' not in text and "Qwen2_5_VLConfig" not in text  # no config dump
    assert "bad samples: none of 20 training samples skipped" in text and "after epoch" not in text
    final = sha256(output / "model.safetensors")
    assert json.loads((output / FINISHED_FILE).read_text())["global_step"] == 4

    # 2. The same command again: recognised, nothing trains, the final model is untouched.
    train([*common, "--max_steps", "4"])
    assert "already holds a finished run (step 4 of --max_steps 4" in capfd.readouterr().err
    assert sha256(output / "model.safetensors") == final and state(output)["global_step"] == 4
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # 3. Killed after checkpoint-4 but before the final save: no fifth step, checkpoint-4 becomes the model.
    (output / FINISHED_FILE).unlink()
    (output / "model.safetensors").unlink()
    train([*common, "--max_steps", "4"])
    assert "checkpoint-4 is at --max_steps 4: saved it as the final model without training" in capfd.readouterr().err
    assert not (output / "checkpoint-5").exists()
    assert sha256(output / "model.safetensors") == sha256(output / "checkpoint-4" / "model.safetensors")
    assert json.loads((output / "config.json").read_text())["use_cache"] is True

    # 4. --resume_from_checkpoint names an older checkpoint: that one is used, the newest is never read
    #    (its state is broken here, so reading it would fail).
    (output / "checkpoint-4" / "trainer_state.json").write_text("{broken")
    train([*common, "--max_steps", "6", "--resume_from_checkpoint", str(output / "checkpoint-2")])
    assert f"resuming from {output / 'checkpoint-2'}" in capfd.readouterr().err
    assert state(output)["global_step"] == 6
    assert state(output / "checkpoint-4")["global_step"] == 4  # steps 3 and 4 trained (and saved) again

    # 5. --overwrite_output_dir: earlier checkpoints and the record go, training starts at step 0.
    train([*common, "--max_steps", "2", "--logging_steps", "1", "--overwrite_output_dir"])
    assert "--overwrite_output_dir: deleted" in capfd.readouterr().err
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert logged_steps(output) == [1, 2] and state(output)["global_step"] == 2
