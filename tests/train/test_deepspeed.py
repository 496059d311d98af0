"""DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 offload under torchrun (2 CPU processes, gloo), and the config checks.

The slow test trains the tiny model with each shipped config in one torchrun
launch (tests/train/deepspeed_worker.py), on text-only and image samples mixed
(tests/train/test_rank_sync.py compares such runs with one process), and checks
that the runs finish, that the optimizer that steps is DeepSpeed's with the
per-module groups and LRs, that the LRs act (vision_tower_lr 0 leaves the
trainable tower bit-identical), and that the saved folders load with from_pretrained.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
import torch
import transformers

from qwenvl.train.distributed import OptimizerGroupsCallback, check_deepspeed_config
from qwenvl.train.train_qwen import train
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env

# Text-only and image samples mixed (ranks hold different media at most steps, as in nearly every real dataset),
# and 4 steps: ZeRO-3 records its module trace in step 1 and holds every rank to it from step 2 on.
DATASETS, STEPS = "demo_single_image,demo_text_only", 4
CONFIGS = {"zero2": "scripts/zero2.json", "zero3": "scripts/zero3.json", "offload": "scripts/zero3_offload.json"}
LR, PROJECTOR_LR, VISION_LR, WD = 1e-3, 2e-3, 0.0, 0.1
EXPECTED_GROUPS = [  # (name, lr, weight decay), in optimizer order
    ("llm/decay", LR, WD), ("llm/no_decay", LR, 0.0),
    ("vision_tower/decay", VISION_LR, WD), ("vision_tower/no_decay", VISION_LR, 0.0),
    ("projector/decay", PROJECTOR_LR, WD), ("projector/no_decay", PROJECTOR_LR, 0.0),
]


def read_config(path: str) -> dict:
    return json.loads((REPO_ROOT / path).read_text())


# -------------------------------------------------------------- config checks
@pytest.mark.parametrize("path", [*CONFIGS.values(), "zero3.json"])
def test_shipped_configs_keep_the_trainer_optimizer(path):
    config = read_config(path)
    assert "optimizer" not in config and "scheduler" not in config
    check_deepspeed_config(config, path, LR, VISION_LR, PROJECTOR_LR)  # no error


def test_top_level_zero3_is_the_scripts_copy():
    assert read_config("zero3.json") == read_config("scripts/zero3.json")


def test_offload_config_offloads_and_accepts_the_trainer_optimizer():
    zero = read_config("scripts/zero3_offload.json")
    assert zero["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero["zero_optimization"]["offload_param"]["device"] == "cpu"
    # without this DeepSpeed refuses a torch optimizer next to optimizer offload
    assert zero["zero_force_ds_cpu_optimizer"] is False


def test_optimizer_section_is_refused_with_the_reason():
    config = read_config("scripts/zero2.json") | {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError) as error:
        check_deepspeed_config(config, "my_zero2.json", LR)
    message = str(error.value)
    assert message.startswith('DeepSpeed config my_zero2.json has an "optimizer" section (AdamW): DeepSpeed would '
                              "then build its own optimizer over all parameters and drop the per-module groups")
    assert 'Remove the "optimizer" section' in message


def test_scheduler_section_is_refused_only_when_module_lrs_differ(caplog):
    config = read_config("scripts/zero2.json") | {"scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(ValueError, match=r'has a "scheduler" section \(WarmupLR\): DeepSpeed\'s schedulers set one '
                                         r"learning rate on every parameter group"):
        check_deepspeed_config(config, "s.json", LR, mm_projector_lr=PROJECTOR_LR)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.distributed"):
        check_deepspeed_config(config, "s.json", LR, vision_tower_lr=LR, mm_projector_lr=None)
    assert 'DeepSpeed config s.json has a "scheduler" section: it replaces --lr_scheduler_type' in caplog.text


def test_train_refuses_an_optimizer_section_before_loading_the_model(tiny_model_dir, tmp_path):
    path = tmp_path / "with_optimizer.json"
    path.write_text(json.dumps(read_config("scripts/zero2.json") | {"optimizer": {"type": "Adam", "params": {}}}))
    with pytest.raises(ValueError, match=f'DeepSpeed config {re.escape(str(path))} has an "optimizer" section'):
        train(["--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image", "--output_dir",
               str(tmp_path / "out"), "--deepspeed", str(path), "--use_cpu", "True", "--report_to", "none",
               "--tune_mm_llm", "True"])


def test_groups_callback_raises_when_the_groups_were_replaced():
    param = torch.nn.Parameter(torch.zeros(2))
    expected = [{"name": n, "lr": lr, "weight_decay": wd} for n, lr, wd in EXPECTED_GROUPS]
    callback = OptimizerGroupsCallback(expected)
    one_group = torch.optim.AdamW([param], lr=LR, weight_decay=WD)  # what a DeepSpeed "optimizer" section builds
    with pytest.raises(RuntimeError, match=r"the optimizer that steps \(AdamW\) does not have the per-module groups: "
                                           r"expected \[\('llm/decay', 0.001, 0.1\)"):
        callback.on_train_begin(None, None, None, optimizer=one_group)
    same = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], **g} for g in expected])
    callback.on_train_begin(None, None, None, optimizer=same)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in callback.seen] == EXPECTED_GROUPS


# ------------------------------------------------------------ torchrun, 2 procs
@pytest.fixture(scope="module")
def deepspeed_runs(tiny_model_dir, tmp_path_factory):
    """One torchrun launch (2 CPU processes): a 4-step full fine-tune on mixed media per DeepSpeed config."""
    root = tmp_path_factory.mktemp("deepspeed")
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "tests/train/deepspeed_worker.py", str(root), *(f"{name}={path}" for name, path in CONFIGS.items()), "--",
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", DATASETS,
        "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
        "--max_steps", str(STEPS), "--per_device_train_batch_size", "1", "--learning_rate", str(LR),
        "--mm_projector_lr", str(PROJECTOR_LR), "--vision_tower_lr", str(VISION_LR), "--weight_decay", str(WD),
        "--max_pixels", "64*28*28", "--min_pixels", "4*28*28", "--model_max_length", "1024",
        "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--attn_implementation", "sdpa",
        "--use_cpu", "True", "--ddp_backend", "gloo", "--dataloader_num_workers", "0", "--seed", "0",
    ]
    env = python_env() | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    (root / "torchrun.log").write_text(log)
    assert result.returncode == 0, log[-6000:]
    return root, log


def losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_stepping_optimizer_is_deepspeeds_with_the_module_groups(deepspeed_runs):
    _, log = deepspeed_runs
    chains = re.findall(r"stepping optimizer: (.+)", log)
    assert len(chains) == 3, chains  # rank 0 only, one per run
    assert re.search(r"> DeepSpeedZeroOptimizer > AdamW$", chains[0]), chains[0]
    assert all(re.search(r"> DeepSpeedZeroOptimizer_Stage3 > AdamW$", c) for c in chains[1:]), chains
    groups = re.findall(r"stepping optimizer group (\S+) +lr=(\S+) weight_decay=(\S+)", log)
    assert [(n, float(lr), float(wd)) for n, lr, wd in groups] == EXPECTED_GROUPS * 3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_runs_finish_and_save_models_that_load(deepspeed_runs, tiny_model_dir, name):
    root, _ = deepspeed_runs
    output = root / name
    assert (output / "checkpoint-2" / "global_step2").is_dir(), "DeepSpeed checkpoint state"
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        output, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    trained, base = model.state_dict(), transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32).state_dict()
    assert trained.keys() == base.keys()
    for key in base:
        changed = not torch.equal(trained[key], base[key])
        if ".visual." in key and ".merger." not in key:
            assert not changed, f"{key}: vision_tower_lr is 0, so the (trainable) tower must not move"
    assert any(not torch.equal(trained[k], base[k]) for k in base if ".visual.merger." in k)
    assert not torch.equal(trained["lm_head.weight"], base["lm_head.weight"])
    assert len(losses(output)) == STEPS


@pytest.mark.slow
def test_zero_stages_train_alike(deepspeed_runs):
    root, _ = deepspeed_runs
    reference = losses(root / "zero2")
    for name in ("zero3", "offload"):
        assert losses(root / name) == pytest.approx(reference, abs=1e-4), name
    z2 = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "zero2").state_dict()
    z3 = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "zero3").state_dict()
    assert max((z2[k] - z3[k]).abs().max().item() for k in z2) < 1e-4
