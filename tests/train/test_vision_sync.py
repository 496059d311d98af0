"""Mixed batches under DDP and ZeRO-3: every rank runs the vision tower alike, and the step equals one process's.

One torchrun launch (2 CPU processes, gloo; see vision_sync_driver.py) trains
the tiny model for one SGD step with everything trainable:

- DDP, rank 0 text-only, rank 1 an image and a video. Without the dummy vision
  pass in ``QwenVLTrainer.compute_loss`` this hangs (find_unused_parameters
  off: rank 1 waits for vision-tower gradients rank 0 never makes).
- ZeRO-3, rank 0 an image only, rank 1 an image and a video. Without a dummy
  pass per missing modality the ranks gather different weights and gloo
  aborts ("Received data size doesn't match expected size").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, python_env

DRIVER = REPO_ROOT / "tests" / "train" / "vision_sync_driver.py"


def reference_params(model_dir, items) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SGD step on the same global batch in one process: the mean of the two micro-batch losses.

    That is what DDP computes (each rank's mean loss, gradients averaged) and
    what one process with gradient accumulation over the two micro-batches
    computes: Qwen2.5-VL sets ``accepts_loss_kwargs = False``, so the Trainer
    does not re-weight micro-batches by their token counts.

    Returns:
        the parameters before and after the step.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset
    from tests.train.vision_sync_driver import LEARNING_RATE

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    collate = DataCollatorForSupervisedDataset(pad_token_id=0)
    loss = sum(model(**collate([item])).loss for item in items) / len(items)
    loss.backward()
    with torch.no_grad():
        before = {name: p.clone() for name, p in model.named_parameters()}
        return before, {name: p - LEARNING_RATE * p.grad for name, p in model.named_parameters()}


@pytest.mark.slow
def test_ranks_with_different_media_match_single_process(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(DRIVER), str(tiny_model_dir), str(tmp_path)]
    try:
        run = subprocess.run(command, env=python_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung (over {exc.timeout} s): ranks out of step on the vision tower")
    assert run.returncode == 0, run.stderr[-4000:]

    from tests.train.vision_sync_driver import RUNS, global_batch

    references = {}
    for name, (samples, overrides) in RUNS.items():
        if name == "zero3" and importlib.util.find_spec("deepspeed") is None:
            continue
        if samples not in references:
            references[samples] = reference_params(str(tiny_model_dir), global_batch(str(tiny_model_dir), samples))
        before, expected = references[samples]
        ranks = json.loads((tmp_path / f"{name}.json").read_text())
        keys = [set(r["keys"][0]) for r in ranks]
        # The scenario: rank 1 has an image and a video, rank 0 lacks videos (and, under DDP, images too).
        assert {"pixel_values", "pixel_values_videos", "second_per_grid_ts"} <= keys[1]
        assert "pixel_values_videos" not in keys[0]
        assert ("pixel_values" in keys[0]) == (name == "zero3")
        assert [r["vision_calls"] for r in ranks] == [2, 2], name  # the tower ran alike on both ranks
        assert all(r["partitioned"] for r in ranks) == (name == "zero3")

        params = torch.load(tmp_path / f"{name}.pt")
        assert params.keys() == expected.keys()
        for param, value in params.items():
            torch.testing.assert_close(value, expected[param], rtol=0, atol=1e-6,
                                       msg=lambda m, p=param: f"{name} {p}: {m}")
        # The step did train the vision tower.
        qkv = "model.visual.blocks.0.attn.qkv.weight"
        assert (params[qkv] - before[qkv]).abs().max() > 1e-5, name
