"""Causal-LM loss that never holds the full logits: chunked cross-entropy or Liger's fused kernel.

The model's own loss projects every position onto the vocabulary (151,936 for
Qwen-VL) and keeps those logits, their log-softmax and their gradient: at 16k
tokens that is 10 GB per copy in float32, far more than the rest of a tiny
model's step and several GB on a 7B one. Here the model runs without labels,
its last hidden state is taken, and the loss is computed from it and
``lm_head.weight`` over slices of the labelled positions:

- ``chunked`` (any device): ``ChunkedLinearCrossEntropy``, a custom autograd
  function. Forward keeps only the loss sum; backward recomputes each slice's
  logits and turns them into the gradients of the hidden states and the weight
  in place. Peak extra memory is one slice of logits (``chunk_size`` x vocab),
  whatever the sequence length.
- ``liger`` (CUDA with ``liger-kernel`` installed): the same loss through
  ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`` (Triton).

Both give the loss of transformers' ``ForCausalLMLoss``: labels shifted by one,
-100 ignored, float32 cross-entropy, ``sum / num_items_in_batch`` when the
Trainer passes the count of the whole accumulated batch, else the mean; and the
same gradients (float32: equal to 1e-5).

How the model is driven (``compute_lm_loss``): the top-level (possibly DDP-,
DeepSpeed- or peft-wrapped) model is called as usual, so every wrapper does its
forward bookkeeping, but without labels and with ``logits_to_keep`` an empty
index, so its ``lm_head`` projects zero positions. A forward hook on the
backbone (``model.model``, whose output the ForConditionalGeneration class
feeds to ``lm_head``) keeps the last hidden state.

Only positions that predict a label are projected (a prompt, an image or padding
costs no vocabulary work), and the chunked loss needs one slice of logits in
forward and one in backward, against the model's full logits, their
log-softmax and their gradient (bench/train_step.py measures it).

DeepSpeed ZeRO-3: ranks must issue the same collectives in the same order, and a
partitioned ``lm_head.weight`` is empty outside ``lm_head``'s own forward. So
``lm_head`` is called exactly once per micro-batch (the empty projection), and
the weight is gathered with ``deepspeed.zero.GatheredParameters`` once in the
loss's forward and once in its backward: two all-gathers per micro-batch on
every rank, however long its sequence and however many slices it has. (A fixed
number of ``lm_head`` calls per micro-batch would also keep the ranks in step,
but then the slice size, and the memory, would grow with the sequence.) In
backward the weight stays whole until its gradient has been accumulated into
it, as inside a module's own backward, where ZeRO-3 takes the gradient for its
reduce-scatter (tests/train/test_loss.py trains two ranks of different lengths
under ZeRO-3 against the model's own loss).

FSDP (1 or 2) shards ``lm_head.weight`` as a DTensor (or a flat parameter)
outside the root module's forward, so ``select_loss_impl`` falls back to the
model's own loss there, with the reason; likewise for a MoE model whose forward
adds the router's auxiliary loss, and for an ``lm_head`` that is not a plain
bias-free ``nn.Linear`` (e.g. a quantised or adapter-wrapped head).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "chunked", "liger", "model")
# Labelled positions per slice: the slice's float32 logits are chunk_size x vocab x 4 bytes
# (1024 x 151,936 -> 622 MB), the only vocabulary-sized buffer the chunked loss holds.
DEFAULT_CHUNK_SIZE = 1024


# ------------------------------------------------------------------ helpers
def gather(weight: torch.Tensor) -> Callable[[], None]:
    """Make a DeepSpeed ZeRO-3 partitioned ``weight`` whole now; the returned function partitions it again.

    A no-op (returning a no-op) for any other tensor. It is an all-gather: every
    rank must call it the same number of times.
    """
    if not hasattr(weight, "ds_id"):
        return lambda: None
    import deepspeed

    context = deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    context.__enter__()
    return lambda: context.__exit__(None, None, None)


@contextlib.contextmanager
def gathered(weight: torch.Tensor) -> Iterator[None]:
    """``gather`` for the length of a block."""
    release = gather(weight)
    try:
        yield
    finally:
        release()


def release_after_accumulation(weight: torch.Tensor, release: Callable[[], None], needs_grad: bool) -> None:
    """Call ``release`` once ``weight``'s gradient has been accumulated into it (now, if none is coming).

    ZeRO-3 accumulates a gradient into its parameter, and takes it for the
    reduce-scatter, only while the parameter is whole, as inside a module's own
    backward; a gathered weight must stay whole until then.
    """
    if not (needs_grad and hasattr(weight, "ds_id")):
        release()
        return

    def release_after_accumulating(param: torch.Tensor) -> None:
        handle.remove()
        release()

    handle = weight.register_post_accumulate_grad_hook(release_after_accumulating)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype of the logits matmul: the autocast dtype when autocast is on (as ``lm_head`` would run), else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def liger_available() -> bool:
    """True when ``liger-kernel`` >= 0.4 (``reduction="sum"`` in its fused loss) can be imported."""
    import importlib.metadata

    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        return False
    return Version(importlib.metadata.version("liger-kernel")) >= Version("0.4.0")


def shift_and_select(
    hidden_states: torch.Tensor, labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the positions that predict a label, and those labels.

    Args:
        hidden_states: (..., seq, hidden), the input of ``lm_head``.
        labels: (..., seq) with -100 where nothing is learned; shifted by one here (position t predicts t + 1).
        shift_labels: (..., seq) labels already shifted (context parallelism); used instead of ``labels``.

    Returns:
        hidden: (N, hidden) rows of the N positions whose shifted label is not -100, in order.
        targets: (N,) their labels.

    Example:
        >>> h, y = shift_and_select(torch.zeros(1, 4, 2), torch.tensor([[-100, 5, 6, -100]]))
        >>> h.shape, y.tolist()  # positions 0 and 1 predict 5 and 6
        (torch.Size([2, 2]), [5, 6])
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("expected labels or shift_labels for the loss but found neither")
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(f"expected labels of shape {tuple(hidden_states.shape[:-1])} (the hidden states' "
                         f"positions) but found {tuple(shift_labels.shape)}")
    flat_labels = shift_labels.reshape(-1).to(hidden_states.device)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    return hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, keep), flat_labels.index_select(0, keep)


# ----------------------------------------------------------------- the loss
def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp of (C, V) ``logits``, overwriting them (no second C x V buffer, unlike torch.logsumexp)."""
    top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    return logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(1)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of (C, V) ``logits`` in place."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T, target_i)`` over slices of ``chunk_size`` rows, logits recomputed in backward.

    Forward keeps ``hidden`` and ``targets`` only; backward recomputes each slice's
    logits, turns them into ``softmax - one_hot`` in place and multiplies out the
    two gradients. Numerics follow ``lm_head`` + ``ForCausalLMLoss``: the logits
    matmul runs in ``_compute_dtype`` (bf16 under bf16 autocast or for bf16
    weights), the softmax and the loss in float32.

    The weight's gradient is summed over the slices in ``grad_weight_dtype``,
    by default the weight's own dtype, as Liger does: for bf16 weights one
    ``addmm_`` per slice (the product accumulated in float32 inside the GEMM)
    into a bf16 (V, H) buffer that is itself the returned gradient, so no
    weight-sized float32 buffer (2.2 GB at vocab 151,936 x hidden 3,584), no
    (V, H) product per slice and no final copy. The cost is one bf16 rounding
    of the running sum per slice. Measured against float32 cross-entropy on the
    full logits (4,096 positions, vocab 151,936, hidden 256, norm of the error
    over norm of the gradient): 0.28% with 4 slices, 0.33% with 32 (hidden 64,
    128 slices: 0.45%), against 0.25-0.27% when summed in float32, 0.25% for
    ``lm_head``'s own bf16 backward and 0.16% for the exact gradient rounded
    to bf16. ``grad_weight_dtype=torch.float32`` sums in float32 and rounds
    once at the end, at the cost of those buffers.

    ZeRO-3: apply it inside ``gathered(weight)``: autograd records the weight's
    shape at ``apply`` and checks the returned gradient against it, so the weight
    must be whole then (as it is inside a module's own forward). It is kept on
    ``ctx`` as the parameter itself, not saved as a tensor (its data becomes an
    empty partition after forward); backward gathers it again and keeps it whole
    until its gradient has been accumulated into it, which is when ZeRO-3 takes
    the gradient for its reduce-scatter.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, grad_weight_dtype: torch.dtype | None = None) -> torch.Tensor:
        compute_dtype = _compute_dtype(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)  # (V, H); whole here: the caller applies this function inside `gathered`
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start:start + chunk_size].to(compute_dtype), w).float()  # (C, V)
            target_logit = logits.gather(1, targets[start:start + chunk_size, None]).squeeze(1)  # (C,)
            total += (_logsumexp_(logits) - target_logit).sum()
            del logits
        ctx.save_for_backward(hidden, targets)
        ctx.weight, ctx.chunk_size, ctx.compute_dtype = weight, chunk_size, compute_dtype
        ctx.grad_weight_dtype = grad_weight_dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None,
                                                               None]:
        hidden, targets = ctx.saved_tensors
        weight, chunk_size, compute_dtype = ctx.weight, ctx.chunk_size, ctx.compute_dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        scale = grad_total.float()
        release = gather(weight)
        try:
            w = weight.to(compute_dtype)  # (V, H)
            if need_weight:  # (V, H), the only weight-sized buffer: it is the returned gradient
                grad_weight = torch.zeros(w.shape, dtype=ctx.grad_weight_dtype or weight.dtype, device=w.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)  # (C, H)
                target = targets[start:start + chunk_size]
                grad_logits = F.linear(h, w).float()  # (C, V): logits, then d loss / d logits in place
                _softmax_(grad_logits)
                grad_logits[torch.arange(target.shape[0], device=target.device), target] -= 1.0
                grad_logits = grad_logits.mul_(scale).to(compute_dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = grad_logits @ w
                if need_weight and grad_weight.dtype == compute_dtype:
                    # sum + product in one GEMM (float32 accumulation inside), rounded once per slice
                    grad_weight.addmm_(grad_logits.t(), h)
                elif need_weight:  # bf16 product added into a float32 sum (autocast over float32 weights)
                    grad_weight.add_(grad_logits.t() @ h)
                del grad_logits
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)  # no copy unless grad_weight_dtype asked for another
        except BaseException:
            release()
            raise
        release_after_accumulation(weight, release, need_weight)
        return grad_hidden, grad_weight, None, None, None


class _WholeWeightInBackward(torch.autograd.Function):
    """Identity on a loss; its backward gathers a ZeRO-3 weight before the nodes under it return its gradient.

    Liger computes both gradients in its forward and hands the weight's back in
    backward, where ZeRO-3 needs the weight whole to accumulate it
    (``release_after_accumulation``).
    """

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, holder: list[torch.Tensor]) -> torch.Tensor:
        ctx.weight = holder[0]  # in a list, so autograd does not take it for an input
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        release_after_accumulation(ctx.weight, gather(ctx.weight), needs_grad=True)
        return grad, None


def _liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy through Liger's fused linear cross-entropy (CUDA, Triton)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    compute_dtype = _compute_dtype(weight)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    with gathered(weight):  # Liger computes both gradients here, in its forward
        total = loss_fn(weight.to(compute_dtype), hidden.to(compute_dtype), targets)
    if isinstance(total, tuple):  # versions that also return the z-loss
        total = total[0]
    total = getattr(total, "loss", total).float()  # newer versions may return a CrossEntropyOutput
    if hasattr(weight, "ds_id") and weight.requires_grad:
        total = _WholeWeightInBackward.apply(total, [weight])
    return total


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    grad_weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``ForCausalLMLoss(hidden_states @ weight.T, labels, num_items_in_batch)`` without building the logits.

    Args:
        hidden_states: (batch, seq, hidden) or (seq, hidden), the input of ``lm_head``.
        weight: (vocab, hidden), ``lm_head.weight`` (may be ZeRO-3 partitioned).
        labels: same leading shape as ``hidden_states``, -100 where nothing is learned; shifted by one here.
        num_items_in_batch: labelled tokens of the whole accumulated batch: the loss is ``sum / num_items_in_batch``;
            None: the mean over this batch's labelled tokens (NaN when there are none, like the model's).
        shift_labels: labels already shifted by one, used instead of ``labels``.
        impl: ``"chunked"`` (any device) or ``"liger"`` (CUDA, liger-kernel installed).
        chunk_size: labelled positions per slice (``chunked``).
        grad_weight_dtype: dtype the weight's gradient is summed in over the slices (``chunked``);
            None: the weight's dtype (see ``ChunkedLinearCrossEntropy``).

    Returns:
        the scalar float32 loss.

    Raises:
        ValueError: unknown ``impl``, or labels whose shape does not match the hidden states.

    Example:
        >>> h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> y = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
        >>> reference = transformers.loss.loss_utils.ForCausalLMLoss(h @ w.T, y, vocab_size=11)
        >>> torch.allclose(linear_cross_entropy(h, w, y, chunk_size=2), reference)
        True
    """
    if impl not in ("chunked", "liger"):
        raise ValueError(f"impl should be one of 'chunked' or 'liger' but found {impl!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size should be a positive number of positions but found {chunk_size}")
    hidden, targets = shift_and_select(hidden_states, labels, shift_labels)
    if impl == "liger":
        total = _liger_loss_sum(hidden, weight, targets)
    else:
        with gathered(weight):
            total = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, grad_weight_dtype)
    if num_items_in_batch is None:
        return total / targets.shape[0]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# --------------------------------------------------------- driving the model
def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / FSDP1 (``.module``) and peft (``get_base_model()``) wrappers.

    Example:
        >>> type(unwrap_model(get_peft_model(qwen2_5_vl, lora_config))).__name__
        'Qwen2_5_VLForConditionalGeneration'
    """
    while True:
        if callable(getattr(model, "get_base_model", None)):  # peft PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeedEngine, FSDP1
            model = model.module
        else:
            return model


def _is_fsdp(model: nn.Module, host: nn.Module, weight: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    fsdp_classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_classes.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule

        fsdp_classes.append(FSDPModule)
    except ImportError:  # pragma: no cover
        pass
    wrapped = any(isinstance(m, tuple(fsdp_classes)) for m in (*model.modules(), *host.modules())) if fsdp_classes \
        else False
    return wrapped or (bool(DTensor) and isinstance(weight, DTensor))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the hidden-state loss cannot drive ``model``, or None when it can.

    Args:
        model: the model the Trainer passes to ``compute_loss`` (wrapped or not).
    """
    host = unwrap_model(model)
    head = host.get_output_embeddings() if callable(getattr(host, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return (f"the output head of {type(host).__name__} is {type(head).__name__}, not a bias-free nn.Linear "
                "(quantised or adapter-wrapped lm_head)")
    if _is_fsdp(model, host, head.weight):
        return ("FSDP shards lm_head.weight (a DTensor or flat parameter) outside the root module's forward, where "
                "the hidden-state loss would need it")
    if not isinstance(getattr(host, "model", None), nn.Module):
        return f"{type(host).__name__} has no backbone `.model` whose output feeds lm_head"
    if "logits_to_keep" not in inspect.signature(host.forward).parameters:
        return f"{type(host).__name__}.forward takes no logits_to_keep (it would project every position)"
    text_config = getattr(host.config, "text_config", host.config)
    if getattr(text_config, "output_router_logits", False):
        return "the MoE model adds its router auxiliary loss inside its own forward"
    if getattr(text_config, "final_logit_softcapping", None) or getattr(host.config, "final_logit_softcapping", None):
        return "its logits are soft-capped (Gemma 2: tanh(logits / cap) x cap), which the hidden-state loss does not apply"
    return None


def select_loss_impl(model: nn.Module, requested: str = "auto") -> tuple[str, str]:
    """Resolve ``--loss_impl`` for training: ``"chunked"``, ``"liger"`` or ``"model"``, with the reason.

    ``auto`` takes Liger's fused kernel on CUDA when liger-kernel is installed,
    else the chunked loss; any choice falls back to ``model`` (the model's own
    loss, full logits) when ``unsupported_reason`` names a cause.

    Args:
        model: the model as ``compute_loss`` receives it (after the Trainer wrapped it).
        requested: one of ``LOSS_IMPLS``.

    Returns:
        (impl, reason): the implementation to use and a sentence for the log.

    Raises:
        ValueError: ``requested`` is unknown, or ``liger`` was asked for where it cannot run.

    Example:
        >>> select_loss_impl(tiny_qwen2_5_vl, "auto")  # on CPU
        ('chunked', 'auto: chunked cross-entropy over 1024-position slices (liger-kernel needs CUDA ...)')
    """
    if requested not in LOSS_IMPLS:
        raise ValueError(f"loss_impl should be one of {LOSS_IMPLS} but found {requested!r}")
    if requested == "model":
        return "model", "loss_impl model: the model's own loss (full logits)"
    reason = unsupported_reason(model)
    if reason is not None:
        return "model", f"the model's own loss (full logits), because {reason}"
    on_cuda = unwrap_model(model).get_output_embeddings().weight.device.type == "cuda"
    if requested == "liger" and not (on_cuda and liger_available()):
        raise ValueError("loss_impl liger (--use_liger_kernel) needs a CUDA device and the liger-kernel package but "
                         f"found {'no CUDA device' if not on_cuda else 'liger-kernel >= 0.4 not installed'}; use "
                         "--loss_impl chunked for the same memory saving in plain PyTorch")
    if requested == "liger" or (requested == "auto" and on_cuda and liger_available()):
        return "liger", f"{requested}: Liger fused linear cross-entropy"
    why = "" if requested == "chunked" else \
        f" (liger-kernel {'>= 0.4 is not installed' if on_cuda else 'needs CUDA'})"
    return "chunked", f"{requested}: chunked cross-entropy over {DEFAULT_CHUNK_SIZE}-position slices{why}"


def compute_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, Any]:
    """Run ``model`` without labels and return its causal-LM loss from the last hidden state.

    Equal to ``model(**inputs, num_items_in_batch=num_items_in_batch).loss`` (and
    so are the gradients) without ever holding the logits of the sequence.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL ForConditionalGeneration, possibly
            wrapped by DDP, DeepSpeed or peft (check ``select_loss_impl`` first).
        inputs: the collator's batch: ``labels`` (or ``shift_labels``) plus the model inputs;
            a ``num_items_in_batch`` key (the all-bad placeholder batch) is used when the
            argument is None, as the model's own loss would.
        num_items_in_batch: the Trainer's count of labelled tokens in the accumulated batch.
        impl: ``"chunked"`` or ``"liger"``.
        chunk_size: labelled positions per slice (``chunked``).

    Returns:
        (loss, outputs): the scalar loss, and the model's output with ``loss`` set and
        ``logits`` of zero positions, (batch, 0, vocab).

    Raises:
        ValueError: the batch has no labels.
    """
    inputs = dict(inputs)
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    batch_count = inputs.pop("num_items_in_batch", None)
    if num_items_in_batch is None:
        num_items_in_batch = batch_count
    if labels is None and shift_labels is None:
        raise ValueError(f"expected `labels` in the batch for the training loss but found only {sorted(inputs)}")
    host = unwrap_model(model)
    captured: list[torch.Tensor] = []

    def keep_hidden(module: nn.Module, args: tuple, output: Any) -> None:
        captured.append(output[0])  # last_hidden_state, what the model passes to lm_head

    device = (labels if labels is not None else shift_labels).device
    handle = host.model.register_forward_hook(keep_hidden)
    try:
        outputs = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one forward of {type(host.model).__name__} per model call but found "
                           f"{len(captured)}")
    loss = linear_cross_entropy(captured[0], host.get_output_embeddings().weight, labels, num_items_in_batch,
                                shift_labels=shift_labels, impl=impl, chunk_size=chunk_size)
    if isinstance(outputs, dict):
        outputs["loss"] = loss
    return loss, outputs
