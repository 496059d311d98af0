"""Qwen3-VL (dense and MoE): flattened and packed batches train exactly like padded ones (SPEC 9, 13).

The padded batch is the oracle: same samples (images, text, several images, a video with its
timestamped blocks), same model; loss and every parameter gradient must agree to 1e-5 in
float32 for sdpa, eager and the project's default ``sdpa_packed``.
"""

from __future__ import annotations

import pytest
import torch

import qwenvl.train.attention  # noqa: F401 - registers sdpa_packed
from qwenvl.data.data_qwen import (
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    PackedDataCollatorForSupervisedDataset,
)
from qwenvl.data.vision import VisionConfig
from qwenvl.models import family_for
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments

QWEN3 = ["qwen3_vl", "qwen3_vl_moe"]
_ITEMS: dict = {}


def items_for(tiny_dirs, model_type):
    """One image, one text-only, one multi-image and one video sample of the demo data."""
    if model_type not in _ITEMS:
        from transformers import AutoTokenizer

        folder = tiny_dirs[model_type]
        cfg = VisionConfig.from_image_processor(load_image_processor(str(folder)), 16 * 32 * 32, 64 * 32 * 32)
        dataset = LazySupervisedDataset(
            AutoTokenizer.from_pretrained(folder),
            DataArguments(dataset_use="demo_single_image,demo_multi_image,demo_text_only,demo_video"), cfg,
            model_max_length=4096, family=family_for(model_type))
        first = {r.dataset: i for i, r in reversed(list(enumerate(dataset.refs)))}
        picks = [first["demo_single_image"], first["demo_text_only"], first["demo_multi_image"], first["demo_video"]]
        _ITEMS[model_type] = ([dataset[i] for i in picks], dataset.encoder.tokenizer.pad_token_id)
    return _ITEMS[model_type]


def load(tiny_dirs, model_type, attn):
    torch.manual_seed(0)
    model = family_for(model_type).model_class().from_pretrained(tiny_dirs[model_type], attn_implementation=attn,
                                                                 dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model.eval()  # no dropout; gradients still flow


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected):
    (loss, grads), (loss_ref, grads_ref) = got, expected
    assert torch.isfinite(loss_ref)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_packed"])
@pytest.mark.parametrize("model_type", QWEN3)
def test_flattened_and_packed_equal_padded(tiny_dirs, model_type, attn):
    items, pad_id = items_for(tiny_dirs, model_type)
    assert "pixel_values_videos" in items[3] and "second_per_grid_ts" not in items[3]
    model = load(tiny_dirs, model_type, attn)
    padded = loss_and_grads(model, DataCollatorForSupervisedDataset(pad_id)(items))
    grads = padded[1]
    assert any("deepstack_merger_list" in n for n in grads) and any(".visual.blocks." in n for n in grads)
    if model_type == "qwen3_vl_moe":
        assert any(".experts." in n for n in grads)
    assert_same(loss_and_grads(model, FlattenedDataCollatorForSupervisedDataset()(items)), padded)
    # A packed step: the groups of a packed file, flattened into one row by the packed collator.
    packed = PackedDataCollatorForSupervisedDataset()([[items[0], items[1]], [items[2], items[3]]])
    assert_same(loss_and_grads(model, packed), padded)


def test_flattening_without_row_zero_would_leak(tiny_dirs):
    """Guard the guard: 3-row ids on a flattened row give another loss (attention leaks across samples)."""
    items, pad_id = items_for(tiny_dirs, "qwen3_vl")
    model = load(tiny_dirs, "qwen3_vl", "sdpa")
    flat = FlattenedDataCollatorForSupervisedDataset()(items)
    with torch.no_grad():
        reference = model(**DataCollatorForSupervisedDataset(pad_id)(items)).loss
        leaky = model(**(flat | {"position_ids": flat["position_ids"][1:]})).loss
    assert abs(leaky.item() - reference.item()) > 1e-4
