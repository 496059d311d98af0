"""qwenvl/train/loss.py: the chunked loss equals the model's own loss and every gradient.

Oracle: the model's own ``ForCausalLMLoss`` (``model(**batch).loss``, with
``num_items_in_batch`` when given) on the same batch of the real tiny model
(151,936-token vocabulary), float32, batches built by the real collators from
the demo data.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from qwenvl.data.data_qwen import (
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
    placeholder_batch,
)
from qwenvl.data.data_qwen_packed import PackedDataCollatorForSupervisedDataset
from qwenvl.train.loss import (
    compute_lm_loss,
    linear_cross_entropy,
    select_loss_impl,
    shift_and_select,
    unwrap_model,
)
from tests.conftest import FOUR_DEMO_KINDS, demo_items

CHUNK = 16  # the demo batches have 40 labelled positions: several slices each
ATOL = 1e-5


@pytest.fixture(scope="module")
def items(tokenizer, image_processor):
    """Four demo samples: one image, text only, two images, grounding."""
    return demo_items(tokenizer, image_processor, FOUR_DEMO_KINDS)


def load_model(model_dir) -> transformers.Qwen2_5_VLForConditionalGeneration:
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model.eval()  # no dropout; gradients still flow


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def batches(tokenizer, items) -> dict[str, dict]:
    return {
        "padded": DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items),
        "flattened": FlattenedDataCollatorForSupervisedDataset()(items),
        "packed": PackedDataCollatorForSupervisedDataset()([items[:2], items[2:]]),
    }


def labelled(batch: dict) -> int:
    """Positions that predict a label (what the Trainer counts into num_items_in_batch)."""
    return int((batch["labels"][..., 1:] != -100).sum())


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def model_loss(model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def chunked_loss(model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    loss, _ = compute_lm_loss(model, batch, num_items, impl="chunked", chunk_size=CHUNK)
    loss.backward()
    return loss.detach(), grads_of(model)


def assert_same(got: tuple, expected: tuple) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert torch.isfinite(ref_loss)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    assert "lm_head.weight" in grads and any(".visual." in n or n.startswith("model.visual") for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


# --------------------------------------------------------------- pure function
@pytest.mark.parametrize("num_items", [None, 40, torch.tensor(23)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_linear_cross_entropy_equals_for_causal_lm_loss(num_items, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[torch.rand(3, 17) < 0.3] = -100
    expected = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=50, num_items_in_batch=num_items)
    got = linear_cross_entropy(hidden, weight, labels, num_items, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for g, e in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_bf16_weights_compute_like_lm_head():
    """bf16 hidden states and weight: bf16 logits, float32 loss, as lm_head + ForCausalLMLoss do."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    expected = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=40)
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    grad_hidden, grad_weight = torch.autograd.grad(got, (hidden, weight))
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    ref_hidden, ref_weight = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(grad_hidden, ref_hidden, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(grad_weight, ref_weight, atol=1e-3, rtol=1e-2)


class _Outputs(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an op returns while active (no mock: the ops run as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(t.dtype, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_bf16_weight_gradient_is_summed_in_bf16_close_to_a_float32_reference():
    """bf16 weights: the weight's gradient is summed over the slices in bf16, no float32 (V, H) buffer.

    Oracle: F.cross_entropy on the full float32 logits of the same (bf16-valued) inputs. Tolerance:
    a bf16 gradient cannot be closer than the reference rounded to bf16 (8 significant bits,
    ~1.6e-3 relative in norm here); bf16 logits (as lm_head computes them) and one bf16 rounding of
    the running sum per slice add about as much again; 1e-2 leaves room for that and fails on a real
    loss of precision (e.g. a bf16 product rounded before a bf16 add, or slices dropped).
    """
    torch.manual_seed(0)
    seq, vocab, hidden_size, chunk = 1025, 4096, 128, 64  # 1024 labelled positions: 16 slices
    hidden = torch.randn(1, seq, hidden_size).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size) * 3 / hidden_size**0.5).bfloat16().requires_grad_(True)  # logits ~3
    labels = torch.randint(0, vocab, (1, seq))
    weight32 = weight.detach().float().requires_grad_(True)
    reference = F.cross_entropy(hidden.detach().float()[0, :-1] @ weight32.T, labels[0, 1:])
    (ref_grad,) = torch.autograd.grad(reference, weight32)
    floor = float((ref_grad.bfloat16().float() - ref_grad).norm() / ref_grad.norm())

    errors, float32_buffers = {}, {}
    for name, accumulate in (("bf16", None), ("float32", torch.float32)):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, grad_weight_dtype=accumulate)
        torch.testing.assert_close(loss, reference, atol=1e-3, rtol=0)
        with _Outputs() as outputs:
            (grad_weight,) = torch.autograd.grad(loss, weight)
        assert grad_weight.dtype == torch.bfloat16
        errors[name] = float((grad_weight.float() - ref_grad).norm() / ref_grad.norm())
        float32_buffers[name] = [n for dtype, n in outputs.seen if dtype == torch.float32 and n >= weight.numel()]
    assert float32_buffers["bf16"] == []  # the largest float32 buffer is a (64, 4096) slice of logits
    assert float32_buffers["float32"] != []  # what the default saves (the recorder sees it when it is there)
    assert floor < errors["bf16"] < 1e-2 and floor < errors["float32"] < 1e-2, (floor, errors)


def test_shift_and_select_keeps_positions_that_predict_a_label():
    hidden = torch.arange(12.0).view(1, 6, 2)
    hidden_kept, targets = shift_and_select(hidden, torch.tensor([[-100, 5, 6, -100, -100, 7]]))
    # position t predicts label t + 1: positions 0, 1 and 4
    assert targets.tolist() == [5, 6, 7]
    assert hidden_kept.tolist() == [[0.0, 1.0], [2.0, 3.0], [8.0, 9.0]]
    with pytest.raises(ValueError, match=r"expected labels of shape \(1, 6\) .* but found \(1, 5\)"):
        shift_and_select(hidden, torch.zeros(1, 5, dtype=torch.long))


def test_no_labelled_token_gives_zero_with_a_count_like_the_model():
    hidden, weight = torch.randn(1, 4, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    labels = torch.full((1, 4), -100)
    got = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=1)
    assert got.item() == ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=30, num_items_in_batch=1).item() == 0
    got.backward()
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


# ------------------------------------------------------------ the tiny model
@pytest.mark.parametrize("layout", ["padded", "flattened", "packed"])
def test_chunked_equals_model_loss(model, tokenizer, items, layout):
    batch = batches(tokenizer, items)[layout]
    assert_same(chunked_loss(model, batch), model_loss(model, batch))
    global_count = labelled(batch) + 37  # as if other micro-batches of the step held 37 more labels
    assert_same(chunked_loss(model, batch, global_count), model_loss(model, batch, global_count))


@pytest.mark.parametrize("layout", ["padded", "flattened"])
def test_gradient_accumulation_equals_one_big_batch(model, tokenizer, items, layout):
    """Two micro-batches, each divided by the step's label count, sum to the big batch's mean loss and grads."""
    collate = batches(tokenizer, items)
    micro = [batches(tokenizer, part)[layout] for part in (items[:2], items[2:])]
    total = sum(labelled(b) for b in micro)
    model.zero_grad(set_to_none=True)
    accumulated = torch.zeros(())
    for batch in micro:
        loss, _ = compute_lm_loss(model, batch, torch.tensor(total), impl="chunked", chunk_size=CHUNK)
        loss.backward()
        accumulated += loss.detach()
    got = (accumulated, grads_of(model))
    assert_same(got, model_loss(model, collate[layout]))


def test_placeholder_batch_count_is_used_like_the_model(model, tokenizer):
    """The all-bad placeholder carries num_items_in_batch=1: loss 0, not NaN, as the model's own."""
    batch = placeholder_batch(tokenizer.pad_token_id, flattened=True)
    loss, outputs = compute_lm_loss(model, batch, None, impl="chunked")
    assert loss.item() == 0.0 == model(**batch).loss.item()
    assert outputs.loss is loss


def test_lm_head_runs_once_on_no_position_whatever_the_length(model, tokenizer, items):
    """ZeRO-3 needs the same module calls on every rank: one lm_head call, zero positions, any length."""
    calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        for batch in (FlattenedDataCollatorForSupervisedDataset()(items[:1]),
                      FlattenedDataCollatorForSupervisedDataset()(items),
                      DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)):
            calls.clear()
            with torch.no_grad():
                _, outputs = compute_lm_loss(model, batch, impl="chunked", chunk_size=CHUNK)
            assert calls == [(batch["input_ids"].shape[0], 0, model.config.text_config.hidden_size)]
            assert outputs.logits.shape == (batch["input_ids"].shape[0], 0, model.config.text_config.vocab_size)
    finally:
        handle.remove()


def test_peft_wrapped_model(tiny_model_dir, tokenizer, items):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(load_model(tiny_model_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    assert type(unwrap_model(wrapped)).__name__ == "Qwen2_5_VLForConditionalGeneration"
    batch = FlattenedDataCollatorForSupervisedDataset()(items)
    (loss, grads), (ref_loss, ref_grads) = chunked_loss(wrapped, batch, 500), model_loss(wrapped, batch, 500)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ selection
def test_select_on_cpu(model):
    assert select_loss_impl(model, "auto")[0] == "chunked"
    assert select_loss_impl(model, "chunked")[0] == "chunked"
    assert select_loss_impl(model, "model")[0] == "model"
    with pytest.raises(ValueError, match="loss_impl liger .* needs a CUDA device and the liger-kernel package but "
                                         "found no CUDA device"):
        select_loss_impl(model, "liger")
    with pytest.raises(ValueError, match=r"loss_impl should be one of \('auto', 'chunked', 'liger', 'model'\) "
                                         "but found 'fused'"):
        select_loss_impl(model, "fused")


def test_select_falls_back_when_the_forward_adds_a_router_loss(tiny_model_dir):
    moe_like = load_model(tiny_model_dir)
    moe_like.config.text_config.output_router_logits = True
    impl, reason = select_loss_impl(moe_like, "chunked")
    assert impl == "model" and "router auxiliary loss" in reason


def test_select_falls_back_for_soft_capped_logits_and_the_model_s_loss_is_the_capped_one():
    """Gemma 2 (PaliGemma 2's LLM) soft-caps its logits: the hidden-state loss would train on uncapped ones."""
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=2.0)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    model.lm_head.weight.data.mul_(50)  # logits well past the cap
    impl, reason = select_loss_impl(model, "auto")
    assert impl == "model" and "its logits are soft-capped (Gemma 2" in reason
    ids = torch.randint(0, 64, (1, 12))
    hidden = model.model(input_ids=ids).last_hidden_state
    capped = 2.0 * torch.tanh(model.lm_head(hidden) / 2.0)  # the cap, by hand
    by_hand = F.cross_entropy(capped[0, :-1], ids[0, 1:])
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, by_hand, atol=1e-5, rtol=0)
    uncapped = F.cross_entropy(model.lm_head(hidden)[0, :-1], ids[0, 1:])
    assert abs(uncapped - by_hand) > 1.0  # what the chunked loss would have trained on
    config.final_logit_softcapping = None
    assert select_loss_impl(transformers.Gemma2ForCausalLM(config), "auto")[0] == "chunked"


def test_select_falls_back_for_a_head_that_is_not_a_plain_linear(tiny_model_dir):
    model = load_model(tiny_model_dir)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    impl, reason = select_loss_impl(model, "auto")
    assert impl == "model" and "not a bias-free nn.Linear" in reason


# ------------------------------------------------- DeepSpeed ZeRO-3, torchrun
@pytest.mark.slow
def test_zero3_ranks_with_different_lengths_train_like_the_model_loss(tiny_model_dir, tmp_path):
    """2 CPU ranks (gloo), ZeRO-3 with lm_head partitioned: one rank has 1 slice, the other 3.

    Three SGD steps with each loss; the per-rank losses and the final lm_head
    must be the same, so the gathered weight, its gradient and ZeRO-3's
    reduce-scatter of it all worked, and no rank waited for another.
    """
    import subprocess

    from tests.conftest import PYTHON, REPO_ROOT, free_port, kill_tree, python_env

    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests/train/test_loss.py"), str(tiny_model_dir), str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=python_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise AssertionError("the ZeRO-3 run did not finish in 600 s (ranks out of step?)") from None
    assert process.returncode == 0, log[-4000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["slices"] == [1, 3][rank]
        torch.testing.assert_close(torch.tensor(result["chunked"]), torch.tensor(result["model"]), atol=ATOL, rtol=0)
    heads = torch.load(tmp_path / "heads.pt")
    assert (heads["model"] - heads["initial"]).abs().max() > 1e-3  # lm_head did train
    torch.testing.assert_close(heads["chunked"], heads["model"], atol=ATOL, rtol=0)


def _zero3_worker(model_dir: str, out_dir: str) -> None:
    """torchrun worker of the test above: the same 3 ZeRO-3 steps with the model's loss, then the chunked one."""
    import os
    from pathlib import Path

    import deepspeed

    from qwenvl.train.train_qwen import load_image_processor

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    items = demo_items(tokenizer, load_image_processor(model_dir), FOUR_DEMO_KINDS)
    # Both ranks' batches hold images (the tower runs once on each); rank 1's is four times longer.
    batch = FlattenedDataCollatorForSupervisedDataset()(items[:1] if rank == 0 else items)
    count = torch.tensor(labelled(batch))
    torch.distributed.all_reduce(count)  # the step's label count over both ranks, as the Trainer passes it
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    result: dict = {"slices": math.ceil(labelled(batch) / CHUNK)}
    heads = {"initial": load_model(model_dir).lm_head.weight.detach().clone()}
    for impl in ("model", "chunked"):
        model = load_model(model_dir)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                          config=config)
        head = engine.module.lm_head.weight
        assert head.numel() == 0, "lm_head.weight should be partitioned"
        losses = []
        for _ in range(3):
            if impl == "model":
                loss = engine(**batch, num_items_in_batch=count).loss
            else:
                loss, _ = compute_lm_loss(engine, batch, count, impl="chunked", chunk_size=CHUNK)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result[impl] = losses
        with deepspeed.zero.GatheredParameters([head]):
            heads[impl] = head.detach().clone()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if rank == 0:
        torch.save(heads, Path(out_dir) / "heads.pt")


if __name__ == "__main__":
    import sys

    _zero3_worker(sys.argv[1], sys.argv[2])
