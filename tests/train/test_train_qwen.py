"""qwenvl/train/train_qwen.py in-process: flags, model class by model_type, freezing, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qwenvl.train.argument import DataArguments, PixelCount, TrainingArguments
from qwenvl.train.train_qwen import find_resume_checkpoint, model_class_for, train


@pytest.mark.parametrize("text,value", [("576*28*28", 451584), ("576\\*28\\*28", 451584), ("3136", 3136),
                                        (" 16 * 28 * 28 ", 12544)])
def test_pixel_flags_accept_products(text, value):
    parser = transformers.HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(["--max_pixels", text, "--video_max_frame_pixels", text,
                                                      "--min_pixels", "28*28", "--video_min_frame_pixels", "784"])
    assert args.max_pixels == value and args.video_max_frame_pixels == value


@pytest.mark.parametrize("text", ["576x28", "28*", "-5", "0"])
def test_bad_pixel_flags_are_rejected(text):
    with pytest.raises(ValueError, match="expected an integer or a product like 576\\*28\\*28|must be positive"):
        PixelCount(text)


def test_min_above_max_is_an_error():
    with pytest.raises(ValueError, match="min_pixels \\(1000\\) is larger than max_pixels \\(100\\)"):
        DataArguments(min_pixels=1000, max_pixels=100)


def test_warmup_ratio_of_the_original_scripts_still_works(tmp_path):
    parser = transformers.HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--warmup_ratio", "0.03",
                                                      "--use_cpu", "True"])
    assert args.get_warmup_steps(1000) == 30
    with pytest.raises(ValueError, match="warmup_ratio must be in \\[0, 1\\), got 1.5"):
        TrainingArguments(output_dir=str(tmp_path), warmup_ratio=1.5, use_cpu=True)
    with pytest.raises(ValueError, match="give --warmup_ratio or --warmup_steps, not both"):
        TrainingArguments(output_dir=str(tmp_path), warmup_ratio=0.1, warmup_steps=5, use_cpu=True)


def test_model_class_comes_from_model_type_not_path(tiny_qwen2_model_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_qwen2_model_dir)
    assert model_class_for(config) is transformers.Qwen2VLForConditionalGeneration
    config.model_type = "llama"
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        model_class_for(config)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_model_dir"])
def test_only_the_merger_trains_with_gradient_checkpointing(request, fixture, tmp_path):
    """tune_mm_mlp only, gradient checkpointing, frozen embeddings: the merger moves, nothing else does."""
    model_dir = request.getfixturevalue(fixture)
    output = tmp_path / "out"
    train([
        "--model_name_or_path", str(model_dir), "--dataset_use", "demo_single_image%50,demo_text_only%25",
        "--tune_mm_mlp", "True", "--tune_mm_llm", "False", "--tune_mm_vision", "False",
        "--gradient_checkpointing", "True", "--output_dir", str(output), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--max_pixels", "32*28*28",
        "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--attn_implementation", "sdpa",
        "--logging_steps", "1",
    ])
    before, after = load_file(model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    merger = {name for name in before if ".visual.merger." in f".{name}"}
    assert changed and changed <= merger, sorted(changed - merger)[:5]
    assert "lm_head.weight" not in changed
    assert find_resume_checkpoint(str(output)) is None


def test_text_only_batches_train_when_only_the_merger_does(tiny_model_dir, tmp_path):
    """No image in the batch and only the merger trainable: the step runs (dummy vision pass) and changes nothing."""
    output = tmp_path / "out"
    train([
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_text_only",
        "--tune_mm_mlp", "True", "--tune_mm_llm", "False", "--tune_mm_vision", "False",
        "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--optim", "sgd", "--learning_rate", "1e-2", "--weight_decay", "0", "--use_cpu", "True",
        "--report_to", "none", "--save_strategy", "no", "--attn_implementation", "sdpa",
    ])
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json
    (tmp_path / "checkpoint-x").mkdir()
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")
