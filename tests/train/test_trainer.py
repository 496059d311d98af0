"""qwenvl/train/trainer.py: per-module optimizer groups and freezing (SPEC 10, 11)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import transformers

from qwenvl.train.argument import ModelArguments, TrainingArguments
from qwenvl.train.train_qwen import set_trainable
from qwenvl.train.trainer import QwenVLTrainer, describe_trainable

LR, VISION_LR, PROJECTOR_LR, WD = 1e-4, 3e-6, 2e-5, 0.1


def expected_module(name: str) -> str:
    if ".visual.merger." in f".{name}":
        return "projector"
    if ".visual." in f".{name}":
        return "vision"
    return "llm"


def expected_decay(name: str) -> bool:
    """Hand rule for the tiny Qwen2.5-VL: biases and the norm weights (norm1/2, ln_q, *layernorm, norm) don't decay."""
    return not (name.endswith(".bias") or re.search(r"(^|\.)(norm\d?|ln_q|input_layernorm|post_attention_layernorm)"
                                                    r"\.weight$", name))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)


FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("llm,mlp,vision", FLAGS)
@pytest.mark.parametrize("vision_lr,projector_lr", [(None, None), (VISION_LR, None), (None, PROJECTOR_LR),
                                                    (VISION_LR, PROJECTOR_LR)])
def test_every_parameter_in_one_group_with_its_lr(model, tmp_path, llm, mlp, vision, vision_lr, projector_lr):
    set_trainable(model, ModelArguments(tune_mm_llm=llm, tune_mm_mlp=mlp, tune_mm_vision=vision))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=LR, weight_decay=WD, report_to=[],
                             vision_tower_lr=vision_lr, mm_projector_lr=projector_lr, use_cpu=True)
    trainer = QwenVLTrainer(model=model, args=args)
    if not (llm or mlp or vision):
        with pytest.raises(ValueError, match="no parameter requires grad"):
            trainer.create_optimizer()
        return
    optimizer = trainer.create_optimizer()
    where = {}
    for group in optimizer.param_groups:
        assert group["params"], f"empty group {group['name']}"
        for p in group["params"]:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = group
    wanted = {"llm": llm, "projector": mlp, "vision": vision}
    lrs = {"llm": LR, "vision": vision_lr or LR, "projector": projector_lr or LR}
    for name, param in model.named_parameters():
        module = expected_module(name)
        assert param.requires_grad == wanted[module], name
        if not param.requires_grad:
            assert id(param) not in where, f"frozen {name} in the optimizer"
            continue
        group = where[id(param)]
        assert group["lr"] == lrs[module], name
        assert group["weight_decay"] == (WD if expected_decay(name) else 0.0), name


def test_lm_head_and_embeddings_follow_the_llm_flag(model):
    set_trainable(model, ModelArguments(tune_mm_llm=False, tune_mm_mlp=True, tune_mm_vision=True))
    assert not model.lm_head.weight.requires_grad
    assert not model.model.language_model.embed_tokens.weight.requires_grad
    report = describe_trainable(model)
    assert "lm_head frozen" in report and "projector (merger): trainable" in report
    assert "llm (language_model): layers trainable [] frozen [0, 1]" in report
    assert "vision tower (visual): blocks trainable [0, 1] frozen []" in report


def test_group_by_length_builds_no_item_to_measure_lengths(tiny_model_dir, tmp_path, monkeypatch):
    """--group_by_length takes lengths from the records: only the items trained on are built."""
    from qwenvl.data.data_qwen import LazySupervisedDataset
    from qwenvl.train.train_qwen import train

    built: list[int] = []
    original = LazySupervisedDataset.__getitem__

    def counting(self, i):
        built.append(i)
        return original(self, i)

    monkeypatch.setattr(LazySupervisedDataset, "__getitem__", counting)
    train(["--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image,demo_text_only",
           "--tune_mm_llm", "True", "--output_dir", str(tmp_path), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--group_by_length", "--use_cpu", "True", "--report_to", "none",
           "--save_strategy", "no", "--max_pixels", "64*28*28", "--min_pixels", "4*28*28"])
    # 2 steps x 2 samples, plus at most the batch the dataloader fetches ahead; transformers' own path
    # would build all 20 first.
    assert 4 <= len(built) <= 6
