"""Flattened batches (4-row position ids, no mask) train exactly like padded ones (SPEC 9).

The padded batch is the oracle: same samples, same model, loss and every
parameter gradient must agree to 1e-5 in float32, for sdpa and eager.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from qwenvl.data.data_qwen import (
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
)
from tests.conftest import FOUR_DEMO_KINDS, demo_items


@pytest.fixture(scope="module")
def items(tokenizer, image_processor):
    return demo_items(tokenizer, image_processor, FOUR_DEMO_KINDS)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_flattened_equals_padded(tiny_model_dir, tokenizer, items, attn):
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.eval()  # no dropout; gradients still flow
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    flat = FlattenedDataCollatorForSupervisedDataset()(items)
    loss_padded, grads_padded = loss_and_grads(model, padded)
    loss_flat, grads_flat = loss_and_grads(model, flat)
    assert torch.isfinite(loss_padded)
    torch.testing.assert_close(loss_flat, loss_padded, atol=1e-5, rtol=0)
    assert grads_flat.keys() == grads_padded.keys()
    assert any("visual" in n for n in grads_flat) and "lm_head.weight" in grads_flat
    for name in grads_padded:
        torch.testing.assert_close(grads_flat[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flattening_without_row_zero_would_leak(tiny_model_dir, tokenizer, items):
    """Guard the guard: 3-row ids on a flattened row give a different loss (attention leaks across samples)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.eval()
    flat = FlattenedDataCollatorForSupervisedDataset()(items)
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        good = model(**flat).loss
        leaky = model(**(flat | {"position_ids": flat["position_ids"][1:]})).loss
        reference = model(**padded).loss
    torch.testing.assert_close(good, reference, atol=1e-5, rtol=0)
    assert abs(leaky.item() - reference.item()) > 1e-4
