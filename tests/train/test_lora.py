"""qwenvl/train/lora.py and tools/merge_lora.py: LoRA / DoRA / rsLoRA train what they should and merge exactly."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import torch
import transformers

from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments, ModelArguments, TrainingArguments
from qwenvl.train.lora import (
    apply_lora,
    llm_linear_layers,
    lora_target_regex,
    merge_lora,
    modules_to_save,
    quantization_config,
)
from qwenvl.train.train_qwen import train
from qwenvl.train.trainer import QwenVLTrainer
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env
from tools.merge_lora import main as merge_main

R, ALPHA = 8, 16
LR, PROJECTOR_LR, VISION_LR = 1e-4, 3e-3, 2e-5


def load(path) -> transformers.Qwen2_5_VLForConditionalGeneration:
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def lora_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), lora_enable=True, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                  learning_rate=LR, mm_projector_lr=PROJECTOR_LR, vision_tower_lr=VISION_LR, weight_decay=0.1,
                  use_cpu=True, report_to=[])
    values.update(overrides)
    return TrainingArguments(**values)


def expected_lora_params(config, targets: list[str]) -> int:
    """r * (in + out) for every targeted LLM projection, from the config's dimensions (the hand rule)."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    shapes = {  # (in, out)
        "q_proj": (text.hidden_size, text.num_attention_heads * head_dim),
        "k_proj": (text.hidden_size, text.num_key_value_heads * head_dim),
        "v_proj": (text.hidden_size, text.num_key_value_heads * head_dim),
        "o_proj": (text.num_attention_heads * head_dim, text.hidden_size),
        "gate_proj": (text.hidden_size, text.intermediate_size),
        "up_proj": (text.hidden_size, text.intermediate_size),
        "down_proj": (text.intermediate_size, text.hidden_size),
    }
    return text.num_hidden_layers * sum(R * sum(shapes[t]) for t in targets)


def trainable_by_module(model) -> dict[str, int]:
    counts = {"llm": 0, "vision": 0, "merger": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "merger" if ".visual.merger." in name else "vision" if ".visual." in name else "llm"
        counts[key] += param.numel()
    return counts


# ------------------------------------------------------------------- targets
def test_default_targets_are_the_llm_projections_not_the_vision_mlp(tiny_model_dir):
    model = load(tiny_model_dir)
    regex = lora_target_regex(model)
    hits = sorted(name for name, _ in model.named_modules() if re.fullmatch(regex, name))
    assert len(hits) == 2 * 7
    assert all(name.startswith("model.language_model.layers.") for name in hits), hits
    # the vision MLP has gate_proj/up_proj/down_proj too; they must not match
    assert not re.fullmatch(regex, "model.visual.blocks.0.mlp.gate_proj")
    # all-linear: every linear layer of the LLM but lm_head, which here are the same 7 projections per layer
    all_linear = lora_target_regex(model, "all-linear")
    assert sorted(name for name, _ in model.named_modules() if re.fullmatch(all_linear, name)) == hits
    assert hits == sorted(llm_linear_layers(model))


def test_unknown_target_is_an_error_listing_what_exists(tiny_model_dir):
    model = load(tiny_model_dir)
    with pytest.raises(ValueError, match=r"--lora_target_modules 'q_proj,qkv': \['qkv'\] matches no linear layer "
                                         r"of the language model; it has down_proj,gate_proj,k_proj,o_proj,q_proj,"
                                         r"up_proj,v_proj \(or pass all-linear\)"):
        lora_target_regex(model, "q_proj,qkv")


def test_modules_to_save_follow_the_tune_flags(tiny_model_dir):
    model = load(tiny_model_dir)
    assert modules_to_save(model, False, False) == []
    assert modules_to_save(model, True, False) == ["model.visual.merger"]
    assert modules_to_save(model, False, True) == ["model.visual.patch_embed", "model.visual.blocks.0",
                                                   "model.visual.blocks.1"]


# ------------------------------------------------------- what trains, at what LR
@pytest.mark.parametrize("mlp,vision", [(False, False), (True, False), (True, True), (False, True)])
def test_lora_trains_adapters_and_the_flagged_vision_modules_only(tiny_model_dir, tmp_path, mlp, vision):
    base = load(tiny_model_dir)
    merger_numel = sum(p.numel() for p in base.model.visual.merger.parameters())
    vision_numel = sum(p.numel() for p in base.model.visual.parameters()) - merger_numel
    model = apply_lora(base, ModelArguments(tune_mm_mlp=mlp, tune_mm_vision=vision), lora_args(tmp_path))

    counts = trainable_by_module(model)
    assert counts["llm"] == expected_lora_params(model.config, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    assert counts["merger"] == (merger_numel if mlp else 0)
    assert counts["vision"] == (vision_numel if vision else 0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable), trainable
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)

    optimizer = QwenVLTrainer(model=model, args=lora_args(tmp_path)).create_optimizer()
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(where) == len(trainable), "every trainable tensor in exactly one group"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in where, name
            continue
        group = where[id(param)]
        lr = PROJECTOR_LR if ".visual.merger." in name else VISION_LR if ".visual." in name else LR
        assert group["lr"] == lr, name
        no_decay = name.endswith(".bias") or "norm" in name.split(".modules_to_save.default.")[-1] \
            or ".ln_q." in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name


# ------------------------------------------------------------ variants + merge
def batch_of(tokenizer, image_processor, n: int = 2) -> dict:
    cfg = VisionConfig.from_image_processor(image_processor, 4 * 28 * 28, 64 * 28 * 28)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="demo_single_image"), cfg,
                                    model_max_length=1024)
    return DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([dataset[i] for i in range(n)])


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_saved_adapter_merges_to_the_same_outputs(tiny_model_dir, tokenizer, image_processor, tmp_path, variant):
    args = lora_args(tmp_path / "run", use_dora=variant == "dora", use_rslora=variant == "rslora")
    model = apply_lora(load(tiny_model_dir), ModelArguments(tune_mm_mlp=True), args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: nonzero adapters, a changed merger
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(ALPHA / math.sqrt(R) if variant == "rslora" else ALPHA / R)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters()) == (variant == "dora")

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    image_processor.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"]) == (variant == "dora", variant == "rslora")
    assert config["base_model_name_or_path"] == str(tiny_model_dir)

    batch = batch_of(tokenizer, image_processor)
    expected = logits(model.eval(), batch)
    merged_dir = merge_lora(adapter_dir, tmp_path / "merged")
    merged, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        merged_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = logits(merged.eval(), batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - logits(load(tiny_model_dir), batch)).abs().max() > 1e-3, "the adapter should change the outputs"


# --------------------------------------------------------------------- QLoRA
def test_load_in_4bit_on_cpu_says_why(tmp_path):
    with pytest.raises(ValueError, match=r"--load_in_4bit \(QLoRA\) trains LoRA adapters on a frozen 4-bit model: "
                                         r"add --lora_enable True"):
        quantization_config(TrainingArguments(output_dir=str(tmp_path), load_in_4bit=True, use_cpu=True))
    with pytest.raises(RuntimeError, match=r"--load_in_4bit \(QLoRA\) needs a CUDA GPU: bitsandbytes' nf4 4-bit "
                                           r"matmuls run on CUDA only, and --use_cpu is set"):
        quantization_config(lora_args(tmp_path, load_in_4bit=True))
    assert quantization_config(lora_args(tmp_path)) is None


def test_train_refuses_4bit_on_cpu_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        train(["--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image",
               "--output_dir", str(tmp_path), "--lora_enable", "True", "--load_in_4bit", "True",
               "--use_cpu", "True", "--report_to", "none"])


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_lora_saves_an_adapter_that_reloads_and_merges(tiny_model_dir, tokenizer, image_processor, tmp_path):
    output = tmp_path / "lora"
    train([
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image",
        "--lora_enable", "True", "--lora_r", str(R), "--lora_alpha", str(ALPHA), "--tune_mm_mlp", "True",
        "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2", "--max_pixels", "64*28*28", "--min_pixels",
        "4*28*28", "--model_max_length", "1024", "--save_strategy", "no", "--report_to", "none",
        "--attn_implementation", "sdpa", "--use_cpu", "True", "--dataloader_num_workers", "0", "--seed", "0",
    ])
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.jinja"):
        assert (output / name).is_file(), name
    assert not (output / "model.safetensors").exists(), "LoRA saves the adapter, not the full model"
    saved_size = json.loads((output / "preprocessor_config.json").read_text())["size"]
    assert saved_size == {"longest_edge": 64 * 28 * 28, "shortest_edge": 4 * 28 * 28}

    from peft import PeftModel

    batch = batch_of(tokenizer, image_processor)
    reloaded = PeftModel.from_pretrained(load(tiny_model_dir), str(output)).eval()
    merged_dir = merge_main(["--lora", str(output), "--output_dir", str(tmp_path / "merged")])
    merged = load(merged_dir)
    base = load(tiny_model_dir)
    expected = logits(reloaded, batch)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
    assert (expected - logits(base, batch)).abs().max() > 1e-3

    # the merger trained fully, the vision tower and the embeddings did not move
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert any(not torch.equal(merged_state[k], base_state[k]) for k in base_state if ".visual.merger." in k)
    for key in base_state:
        if (".visual." in key and ".merger." not in key) or "embed_tokens" in key or key == "lm_head.weight":
            assert torch.equal(merged_state[key], base_state[key]), key


@pytest.mark.slow
def test_sft_lora_script_under_torchrun_with_zero2(tiny_model_dir, tmp_path):
    """scripts/sft_lora.sh as shipped (LoRA + merger, DeepSpeed ZeRO-2), 2 CPU processes, GPU flags overridden."""
    output = tmp_path / "script"
    env = python_env() | {"PY": PYTHON, "NPROC_PER_NODE": "2", "MODEL": str(tiny_model_dir), "OUTPUT": str(output),
                          "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MASTER_PORT": str(free_port())}
    overrides = ["--bf16", "False", "--use_cpu", "True", "--ddp_backend", "gloo", "--report_to", "none",
                 "--max_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                 "--lora_r", str(R), "--lora_alpha", str(ALPHA), "--warmup_steps", "0", "--learning_rate", "1e-2",
                 "--mm_projector_lr", str(PROJECTOR_LR), "--max_pixels", "64*28*28", "--min_pixels", "4*28*28",
                 "--model_max_length", "1024", "--dataloader_num_workers", "0", "--attn_implementation", "sdpa"]
    result = subprocess.run(["bash", "scripts/sft_lora.sh", *overrides], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "stepping optimizer: DeepSpeedOptimizerWrapper > DeepSpeedZeroOptimizer > AdamW" in log
    groups = re.findall(r"stepping optimizer group (\S+) +lr=(\S+) weight_decay", log)
    assert [(n, float(lr)) for n, lr in groups] == [("llm/decay", 1e-2), ("projector/decay", PROJECTOR_LR),
                                                    ("projector/no_decay", PROJECTOR_LR)]
    assert (output / "adapter_model.safetensors").is_file() and (output / "checkpoint-2" / "global_step2").is_dir()
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.visual.merger"] and config["r"] == R
    merged = load(merge_lora(output, tmp_path / "merged"))
    base = load(tiny_model_dir)
    ids = torch.arange(100, 120)[None]
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4
