"""``sdpa_packed`` (qwenvl/train/attention.py): flattened rows train like padded ones, with no T x T mask.

The oracle is transformers' own ``sdpa`` on the padded batch of the same samples.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from qwenvl.data.data_qwen import (
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
)
from qwenvl.train.attention import SDPA_PACKED, sample_bounds
from tests.conftest import demo_items


def test_sample_bounds():
    assert sample_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [(0, 3), (3, 5), (5, 9)]
    assert sample_bounds(torch.tensor([[5, 6, 7]])) == [(0, 3)]
    assert sample_bounds(torch.tensor([0, 0, 0])) == [(0, 1), (1, 2), (2, 3)]


@pytest.fixture(scope="module")
def items(tokenizer, image_processor):
    return demo_items(tokenizer, image_processor, ("demo_single_image", "demo_text_only", "demo_multi_image",
                                                   "demo_video"))


def load(model_dir, attn):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.eval()  # no dropout; gradients still flow
    return model


def loss_grads_and_masks(model, batch):
    """Loss, every gradient, and the attention mask the first decoder layer received."""
    masks = []
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")),
                                             with_kwargs=True)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    handle.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, masks


def test_flattened_row_equals_padded_batch_without_a_dense_mask(tiny_model_dir, tokenizer, items):
    reference = load(tiny_model_dir, "sdpa")
    packed = load(tiny_model_dir, SDPA_PACKED)
    padded_batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    flat_batch = FlattenedDataCollatorForSupervisedDataset()(items)
    loss_ref, grads_ref, _ = loss_grads_and_masks(reference, padded_batch)
    loss_flat, grads_flat, masks_flat = loss_grads_and_masks(packed, flat_batch)
    _, _, masks_dense = loss_grads_and_masks(reference, flat_batch)
    length = flat_batch["input_ids"].shape[1]
    assert masks_dense[0].shape[-2:] == (length, length)  # what sdpa builds for the same row
    assert masks_flat == [None]  # sdpa_packed builds none
    torch.testing.assert_close(loss_flat, loss_ref, atol=1e-5, rtol=0)
    assert grads_flat.keys() == grads_ref.keys() and "lm_head.weight" in grads_flat
    assert any(".visual." in f".{n}" for n in grads_flat)
    for name in grads_ref:
        torch.testing.assert_close(grads_flat[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batches_are_unchanged(tiny_model_dir, tokenizer, items):
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    loss_ref, grads_ref, _ = loss_grads_and_masks(load(tiny_model_dir, "sdpa"), batch)
    loss, grads, masks = loss_grads_and_masks(load(tiny_model_dir, SDPA_PACKED), batch)
    assert masks[0] is not None and masks[0].dim() == 4  # padding still needs transformers' mask
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_saved_config_does_not_name_the_custom_attention(tiny_model_dir, tmp_path):
    load(tiny_model_dir, SDPA_PACKED).save_pretrained(tmp_path)
    assert SDPA_PACKED not in (tmp_path / "config.json").read_text()
