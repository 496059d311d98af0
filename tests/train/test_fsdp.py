"""FSDP configuration plumbing (wrap classes, FSDP1 / FSDP2 keys) and the FSDP-on-CPU warning.

Sharding itself needs GPUs: scripts/sft_fsdp.sh is the check on a GPU machine.
On CPU accelerate runs FSDP requests as DDP; the test shows that training then
says so and still finishes.
"""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
import torch
import transformers
from accelerate.utils import DistributedType

from qwenvl.train.argument import TrainingArguments
from qwenvl.train.distributed import configure_fsdp, fsdp_fallback_reason, fsdp_wrap_classes
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env

SEED_000_FSDP1_KEYS = {"backward_prefetch": "backward_pre", "limit_all_gathers": True, "sync_module_states": True,
                       "use_orig_params": True}


@pytest.fixture(autouse=True)
def _restore_fsdp_env(monkeypatch):
    # TrainingArguments(fsdp=...) exports FSDP_CPU_RAM_EFFICIENT_LOADING; keep it out of other tests.
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)


def fsdp_args(tmp_path, config) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard auto_wrap", fsdp_config=config,
                             use_cpu=True, report_to=[])


def block_classes(model) -> list[str]:
    """Hand reference: the class of the first LLM decoder layer and of the first vision block."""
    return [type(model.model.language_model.layers[0]).__name__, type(model.model.visual.blocks[0]).__name__]


@pytest.mark.parametrize("fixture,expected", [("tiny_model_dir", ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]),
                                              ("tiny_qwen2_model_dir", ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"])])
def test_wrap_classes_are_the_decoder_layer_and_vision_block(request, tmp_path, fixture, expected):
    path = request.getfixturevalue(fixture)
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path)
    assert block_classes(model) == expected
    assert fsdp_wrap_classes(model) == expected

    args = fsdp_args(tmp_path, str(REPO_ROOT / "scripts" / "fsdp_config.json"))
    plugin = configure_fsdp(args, model)
    assert plugin["transformer_cls_names_to_wrap"] == ",".join(expected)
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == expected
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True  # full_shard
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"


def test_seed_000_fsdp1_keys_reach_the_plugin(tiny_model_dir, tmp_path, caplog):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.distributed"):
        plugin = configure_fsdp(fsdp_args(tmp_path, {"version": 1, **SEED_000_FSDP1_KEYS}), model)
    assert plugin["fsdp_version"] == 1
    assert plugin["backward_prefetch"] == "BACKWARD_PRE"
    assert plugin["limit_all_gathers"] is True
    assert plugin["sync_module_states"] is True and plugin["use_orig_params"] is True
    assert plugin["reshard_after_forward"] == "full_shard"
    assert "only FSDP1 reads" not in caplog.text


def test_fsdp1_keys_under_fsdp2_are_named_as_ignored(tiny_model_dir, tmp_path, caplog):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.distributed"):
        plugin = configure_fsdp(fsdp_args(tmp_path, dict(SEED_000_FSDP1_KEYS)), model)
    assert plugin["fsdp_version"] == 2 and "backward_prefetch" not in plugin
    assert ("fsdp_config sets backward_prefetch, limit_all_gathers, sync_module_states, use_orig_params, which only "
            "FSDP1 reads; FSDP2 (fsdp_config version 2, the default) ignores them") in caplog.text


def test_a_wrap_class_the_model_lacks_is_an_error(tiny_model_dir, tmp_path):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    args = fsdp_args(tmp_path, {"transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer"]})
    with pytest.raises(ValueError, match=r"fsdp_config transformer_layer_cls_to_wrap names \['Qwen2VLDecoderLayer'\], "
                                         r"which Qwen2_5_VLForConditionalGeneration does not have; its block classes "
                                         r"are \['Qwen2_5_VLDecoderLayer', 'Qwen2_5_VLVisionBlock'\]"):
        configure_fsdp(args, model)


def test_no_fsdp_no_plumbing(tiny_model_dir, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert configure_fsdp(args, torch.nn.Linear(1, 1)) is None
    assert fsdp_fallback_reason(args) is None


def test_fallback_reason_on_cpu(tmp_path):
    args = fsdp_args(tmp_path, None)
    assert fsdp_fallback_reason(args).startswith("--fsdp was requested on CPU: accelerate builds FSDP only for "
                                                 "GPU-like devices and falls back to DDP (MULTI_CPU)")
    assert fsdp_fallback_reason(args, DistributedType.MULTI_CPU).startswith(
        "--fsdp was requested but accelerate runs MULTI_CPU, not FSDP: every rank holds the full model")
    assert fsdp_fallback_reason(args, DistributedType.FSDP) is None


@pytest.mark.slow
def test_sft_fsdp_script_on_cpu_warns_and_trains_as_ddp(tiny_model_dir, tmp_path):
    """scripts/sft_fsdp.sh as shipped, 2 CPU processes (gloo), GPU-only flags overridden."""
    output = tmp_path / "fsdp"
    env = python_env() | {"PY": PYTHON, "NPROC_PER_NODE": "2", "MODEL": str(tiny_model_dir), "OUTPUT": str(output),
                          "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    overrides = ["--bf16", "False", "--use_cpu", "True", "--ddp_backend", "gloo", "--report_to", "none",
                 "--max_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                 "--save_strategy", "no", "--max_pixels", "64*28*28", "--min_pixels", "4*28*28",
                 "--model_max_length", "1024", "--dataloader_num_workers", "0", "--attn_implementation", "sdpa"]
    result = subprocess.run(["bash", "scripts/sft_fsdp.sh", *overrides], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    warning = ("--fsdp was requested but accelerate runs MULTI_CPU, not FSDP: every rank holds the full model and "
               "optimizer state (no sharding). FSDP needs CUDA (or another accelerator) devices.")
    assert log.count(warning) == 1, "warned once, on rank 0"
    assert "FSDP2 wraps ['Qwen2_5_VLDecoderLayer', 'Qwen2_5_VLVisionBlock']" in log
    state = json.loads((output / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info.values()), info
