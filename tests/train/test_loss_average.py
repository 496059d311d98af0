"""``--loss_average``: how one optimizer step weighs the tokens of its micro-batches (QwenVLTrainer).

The oracle is computed by hand from the model's full logits (``F.cross_entropy`` of the shifted labels,
summed per micro-batch), never by the code under test:

- ``token`` (the default): the step's gradient is the gradient of one big batch of every learned token,
  ``sum of all token losses / number of learned tokens``, whatever the accumulation or the micro-batch lengths;
- ``micro_batch`` (the original's): the mean of the micro-batches' token means.

Each run is one real ``QwenVLTrainer`` step (SGD, learning rate 1, no clipping, no decay) of the tiny
Qwen2.5-VL in float32, so the change of every parameter is minus the step's gradient. The 2-rank runs
(DDP, ZeRO-2, ZeRO-3 against the same one-big-batch oracle) are in tests/train/test_rank_sync.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments, TrainingArguments
from qwenvl.train.trainer import QwenVLTrainer
from tests.train.rank_sync_driver import Fixed, step_loss

# Answers of very different lengths: micro-batches of very different learned-token counts.
ANSWERS = ["Yes.", "A small red circle drawn on a plain white background, slightly left of the centre.",
           "Two.", "The triangle is green and points upwards, next to a blue square."]
ATOL = 2e-6  # float32: the same sums in another order; the two weightings differ by > 1e-3 (asserted)


@pytest.fixture(scope="module")
def items(tmp_path_factory, tokenizer, image_processor) -> list[dict]:
    folder = tmp_path_factory.mktemp("loss_average")
    records = [{"conversations": [{"from": "human", "value": f"Question {i}: describe it."},
                                  {"from": "gpt", "value": answer}]} for i, answer in enumerate(ANSWERS)]
    (folder / "answers.json").write_text(json.dumps(records))
    vision = VisionConfig.from_image_processor(image_processor, 16 * 28 * 28, 64 * 28 * 28)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=str(folder / "answers.json")), vision,
                                    model_max_length=512)
    return [dataset[i] for i in range(len(dataset))]


def learned(item: dict) -> int:
    return int((item["labels"][1:] != -100).sum())


def load_model(model_dir) -> transformers.PreTrainedModel:
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                                            dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model


def oracle_step(model_dir, items: list[dict], pad_token_id: int, average: str) -> dict[str, torch.Tensor]:
    """Minus the gradient of the step's loss (what one SGD step at learning rate 1 adds to each weight)."""
    model = load_model(model_dir).train()
    collate = DataCollatorForSupervisedDataset(pad_token_id)
    step_loss(model, [collate([item]) for item in items], average).backward()
    return {name: -p.grad for name, p in model.named_parameters() if p.grad is not None}


def trainer_step(model_dir, out_dir, items: list[dict], pad_token_id: int, average: str, batch: int, accumulation: int,
                 loss_impl: str = "auto") -> dict[str, torch.Tensor]:
    """One QwenVLTrainer step over ``items``; returns every parameter's change."""
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
        dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
        loss_average=average, loss_impl=loss_impl,
    )
    model = load_model(model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = QwenVLTrainer(model=model, args=args, train_dataset=Fixed(items),
                            data_collator=DataCollatorForSupervisedDataset(pad_token_id))
    trainer.train()
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def assert_equal_steps(got: dict, expected: dict, what: str) -> None:
    assert expected.keys() <= got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}")


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in b)


@pytest.fixture(scope="module")
def oracles(tiny_model_dir, tokenizer, items) -> dict[str, dict[str, torch.Tensor]]:
    return {average: oracle_step(tiny_model_dir, items, tokenizer.pad_token_id, average)
            for average in ("token", "micro_batch")}


def test_the_micro_batches_differ_in_learned_tokens(items):
    counts = [learned(item) for item in items]
    assert min(counts) * 4 <= max(counts), counts  # what makes the two weightings differ


@pytest.mark.parametrize("loss_impl", ["chunked", "model"])
def test_accumulated_step_is_the_token_mean_of_one_big_batch(tiny_model_dir, tmp_path, tokenizer, items, oracles,
                                                             loss_impl):
    """Accumulation 4 x batch 1 (the issue's measurement) equals one batch of all learned tokens; the original
    weighting (``micro_batch``) equals the mean of the four micro-batch means, and the two differ."""
    pad = tokenizer.pad_token_id
    token, micro = oracles["token"], oracles["micro_batch"]
    assert max_difference(token, micro) > 1e-3
    got = trainer_step(tiny_model_dir, tmp_path / "token", items, pad, "token", batch=1, accumulation=4,
                       loss_impl=loss_impl)
    assert_equal_steps(got, token, f"token/{loss_impl}")
    if loss_impl == "chunked":  # with the model's own loss, micro_batch is the Trainer's own path, unchanged
        got = trainer_step(tiny_model_dir, tmp_path / "micro", items, pad, "micro_batch", batch=1, accumulation=4,
                           loss_impl=loss_impl)
        assert_equal_steps(got, micro, f"micro_batch/{loss_impl}")


def test_token_mean_makes_accumulation_and_batching_agree(tiny_model_dir, tmp_path, tokenizer, items, oracles):
    """Batch 2 x accumulation 2 and batch 4 x accumulation 1 give the same step with the token mean (with the
    micro-batch mean they do not)."""
    pad = tokenizer.pad_token_id
    big = trainer_step(tiny_model_dir, tmp_path / "big", items, pad, "token", batch=4, accumulation=1)
    assert_equal_steps(big, oracles["token"], "batch 4")
    accumulated = trainer_step(tiny_model_dir, tmp_path / "acc", items, pad, "token", batch=2, accumulation=2)
    assert_equal_steps(accumulated, big, "batch 2 x accumulation 2")
    old = trainer_step(tiny_model_dir, tmp_path / "old", items, pad, "micro_batch", batch=2, accumulation=2)
    assert max_difference(old, big) > 1e-4


def test_loss_average_is_checked_with_the_choices():
    with pytest.raises(ValueError, match=r"--loss_average should be one of token or micro_batch but found 'tokens'"):
        TrainingArguments(output_dir="/tmp/unused", loss_average="tokens", use_cpu=True, report_to=[])


def test_the_start_up_summary_says_how_a_step_weighs_its_tokens():
    from qwenvl.train.tracking import loss_line

    args = TrainingArguments(output_dir="/tmp/unused", gradient_accumulation_steps=4, use_cpu=True, report_to=[])
    assert loss_line(args, 1) == "loss: token mean over the 4 accumulated micro-batches (--loss_average token)"
    args.ddp_find_unused_parameters, args.loss_average = False, "micro_batch"
    assert loss_line(args, 2) == ("loss: mean of the token means of the 4 accumulated micro-batches, then averaged "
                                  "over 2 processes (--loss_average micro_batch); DDP find_unused_parameters False")
