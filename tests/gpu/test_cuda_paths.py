"""The paths only a CUDA machine takes: Liger's fused linear cross-entropy and flash-attention's varlen kernel.

Skipped without a CUDA device (the CPU suite); ``bash scripts/gpu_checks.sh`` runs them with the GPU
benchmark rows. Oracles: the model's own loss and gradients (Liger) and the samples run one by one
(flash-attention on a flattened row must keep them apart, as ``position_ids`` row 0 says).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from qwenvl.data.data_qwen import (
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
)
from qwenvl.train.loss import compute_lm_loss
from tests.conftest import FOUR_DEMO_KINDS, demo_items

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: run `bash scripts/gpu_checks.sh` on a GPU machine")


@pytest.fixture(scope="module")
def items(tokenizer, image_processor):
    """Four demo samples: one image, text only, two images, grounding."""
    return demo_items(tokenizer, image_processor, FOUR_DEMO_KINDS)


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load(model_dir, attention: str, dtype: torch.dtype) -> transformers.Qwen2_5_VLForConditionalGeneration:
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation=attention, dtype=dtype).cuda()
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model.eval()


def loss_and_grads(model, batch: dict, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    count = torch.tensor(int((batch["labels"][..., 1:] != -100).sum()), device="cuda")
    if impl == "model":
        loss = model(**batch, num_items_in_batch=count).loss
    else:
        loss, _ = compute_lm_loss(model, batch, count, impl=impl)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("collator", ["padded", "flattened"])
def test_liger_loss_equals_the_model_loss_and_gradients(tiny_model_dir, tokenizer, items, collator):
    pytest.importorskip("liger_kernel")
    model = load(tiny_model_dir, "sdpa", torch.float32)
    make = DataCollatorForSupervisedDataset(tokenizer.pad_token_id) if collator == "padded" else \
        FlattenedDataCollatorForSupervisedDataset()
    batch = on_cuda(make(items))
    ref_loss, ref_grads = loss_and_grads(model, batch, "model")
    loss, grads = loss_and_grads(model, batch, "liger")
    assert torch.isfinite(ref_loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=0)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_flash_attention_keeps_the_samples_of_a_flattened_row_apart(tiny_model_dir, items):
    """The varlen kernel runs: each sample of the row gives the logits it gives alone, and a row whose text
    positions do not restart (one long sequence to the kernel) does not."""
    pytest.importorskip("flash_attn")
    model = load(tiny_model_dir, "flash_attention_2", torch.bfloat16)
    collate = FlattenedDataCollatorForSupervisedDataset()
    with torch.no_grad():
        alone = torch.cat([model(**on_cuda(collate([item]))).logits[0] for item in items]).float()
        row = on_cuda(collate(items))
        packed = model(**row).logits[0].float()
        joined_batch = dict(row, position_ids=row["position_ids"].clone())
        joined_batch["position_ids"][0, 0] = torch.arange(row["input_ids"].shape[1], device="cuda")
        joined = model(**joined_batch).logits[0].float()
    apart, leaked = (packed - alone).abs().max().item(), (joined - alone).abs().max().item()
    assert leaked > 0 and apart < 0.1 * leaked, (apart, leaked)
