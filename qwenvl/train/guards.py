"""Stop a run whose loss or gradients are not finite, before anything non-finite is saved.

A NaN or inf loss (fp16 overflow, a bad learning rate, a broken sample) otherwise
trains on silently: the Trainer logs the mean of earlier losses in its place
(``logging_nan_inf_filter``) and every later checkpoint and the final model hold NaN.

How it works (``NonFiniteGuard``, a ``TrainerCallback``; ``QwenVLTrainer`` feeds it):

1. the training dataloader hands every micro-batch the ``SampleRef`` of each of its
   samples (``WithSampleRefs`` + ``SampleRefsCollator``, installed by
   ``QwenVLTrainer.get_train_dataloader``; ``batch["sample_refs"]``);
2. ``QwenVLTrainer.compute_loss`` pops them and calls ``NonFiniteGuard.record`` with
   the micro-batch's loss;
3. before every optimizer step (``on_pre_optimizer_step``) each rank checks its
   losses and the gradient norm (DeepSpeed's global norm, else the norm of the
   local gradients), and the ranks agree with one ``all_reduce`` of two flags: all
   ranks raise ``NonFiniteError`` at the same step, with the same message naming
   the step and every sample of the step's batch on every rank;
4. before a checkpoint (``on_step_end`` / ``on_epoch_end`` when the Trainer is
   about to save) and at the end of training (before the final save) the weights
   themselves are checked the same way: an update that turned finite gradients
   into non-finite weights is stopped too.

The error propagates out of ``trainer.train()``, so ``train_qwen`` never reaches its
final ``save_model``. Under DeepSpeed the optimizer step runs inside the backward
pass, so the in-memory weights may already hold the NaN when the guard raises;
they are never written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Collated batches carry the samples they hold under this key; QwenVLTrainer pops it before the model.
SAMPLE_REFS_KEY = "sample_refs"
MAX_LISTED = 64  # samples quoted per rank in the error message


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite; the message names the step and the batch."""


# ---------------------------------------------------------------- sample refs
def dataset_sample_refs(dataset: Any, index: int) -> list[Any]:
    """The ``SampleRef`` of every sample item ``index`` of ``dataset`` holds.

    ``LazySupervisedDataset`` item ``i`` is sample ``refs[i]``; a
    ``PackedSupervisedDataset`` item is group ``i``: samples ``refs[j]`` for ``j``
    in ``groups[i]``. A dataset without ``refs`` gives ``[]``.

    Example:
        >>> dataset_sample_refs(packed_dataset, 0)
        [PackedSampleRef(dataset='my_pack', annotation_path='my_pack.json', data_path='', index=0, position=0), ...]
    """
    refs = getattr(dataset, "refs", None)
    if refs is None:
        return []
    groups = getattr(dataset, "groups", None)
    return [refs[j] for j in groups[index]] if groups is not None else [refs[index]]


class WithSampleRefs(Dataset):
    """``dataset[i]`` paired with the refs of its samples: ``(refs, item)``; other attributes pass through.

    A pair, not a key inside the item: the Trainer's ``remove_unused_columns``
    strips unknown keys from dict items before the collator sees them.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tuple[Any, ...], Any]:
        return tuple(dataset_sample_refs(self.dataset, index)), self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a dataloader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SampleRefsCollator:
    """Collate ``WithSampleRefs`` pairs with ``collator`` and list the samples under ``batch["sample_refs"]``.

    Args:
        collator: the project's collator (padded, flattened or packed).
    """

    def __init__(self, collator: Callable[[list], dict]):
        self.collator = collator

    def __call__(self, pairs: Sequence[tuple[tuple[Any, ...], Any]]) -> dict:
        batch = self.collator([item for _, item in pairs])
        batch[SAMPLE_REFS_KEY] = [ref for refs, _ in pairs for ref in refs]
        return batch


def describe_ref(ref: Any) -> str:
    """``annotation_path:index`` (``... (sample k of the group)`` inside a packed file)."""
    text = f"{ref.annotation_path}:{ref.index}"
    position = getattr(ref, "position", None)
    return f"{text} (sample {position} of the group)" if position is not None else text


# ---------------------------------------------------------------- the guard
def _is_finite(value: float | torch.Tensor | None) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flags: list[bool], device: torch.device | str) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one ``all_reduce``); every rank must call it."""
    if not _distributed():
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def _gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_weights_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every weight this rank holds is finite (its ZeRO-3 partition when partitioned)."""
    for param in parameters:
        tensor = getattr(param, "ds_tensor", None)
        tensor = param.data if tensor is None else tensor
        if tensor.numel() and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return False
    return True


class NonFiniteGuard(TrainerCallback):
    """Raise ``NonFiniteError`` on every rank at the first step whose loss or gradient norm is not finite.

    See the module docstring. Add it with ``trainer.add_callback(NonFiniteGuard(trainer))``.

    Args:
        trainer: the ``QwenVLTrainer`` (its model and, under DeepSpeed, the engine's gradient norm).

    Raises:
        NonFiniteError: from ``on_pre_optimizer_step`` (loss or gradient norm), or from
            ``on_step_end`` / ``on_epoch_end`` / ``on_train_end`` (weights, before a save).
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.losses: list[torch.Tensor] = []  # this rank's micro-batch losses of the current step
        self.refs: list[Any] = []  # this rank's samples of the current step

    # ------------------------------------------------------------ collecting
    def record(self, loss: torch.Tensor, refs: Sequence[Any] | None) -> None:
        """Note one training micro-batch: its loss and its samples (called by ``QwenVLTrainer.compute_loss``)."""
        self.losses.append(loss.detach().float().reshape(-1)[:1])
        self.refs.extend(refs or [])

    def on_step_begin(self, args, state, control, **kwargs):
        self.losses, self.refs = [], []

    def grad_norm(self) -> float | torch.Tensor | None:
        """The step's gradient norm as the Trainer computed it just before (``QwenVLTrainer._get_grad_norm``), else
        DeepSpeed's global one, else of this rank's gradients."""
        known = getattr(self.trainer, "last_grad_norm", None)
        if known is not None:
            return known
        engine = getattr(self.trainer, "model_wrapped", None)
        if getattr(self.trainer, "is_deepspeed_enabled", False) and hasattr(engine, "get_global_grad_norm"):
            return engine.get_global_grad_norm()
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    # ------------------------------------------------------------ checks
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        losses = torch.cat(self.losses) if self.losses else torch.zeros(0)
        # fp16 with dynamic loss scaling overflows on purpose now and then: the scaler skips that step and
        # lowers the scale. Only a non-finite loss is fatal there; the weights are checked before every save.
        grad_norm = None if args.fp16 else self.grad_norm()
        loss_bad, grad_bad = _any_rank([not _is_finite(losses), not _is_finite(grad_norm)], args.device)
        if not (loss_bad or grad_bad):
            return
        what = " and ".join(w for w, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad)
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        self._raise(f"{what} not finite at step {step} (gradient norm {norm:g})", losses.tolist(),
                    "stopped before the optimizer step's result is saved")

    def check_weights(self, state, where: str, device: torch.device | str) -> None:
        """Raise on every rank if any rank holds a non-finite weight; every rank must call it."""
        (bad,) = _any_rank([not local_weights_finite(self.trainer.model.parameters())], device)
        if bad:
            self._raise(f"weights not finite after step {state.global_step}", [float(t) for t in self.losses],
                        f"stopped {where}")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.check_weights(state, "before saving the checkpoint", args.device)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.check_weights(state, "before saving the checkpoint", args.device)

    def on_train_end(self, args, state, control, **kwargs):
        self.check_weights(state, "before the final save", args.device)

    def _raise(self, headline: str, losses: list[float], action: str) -> None:
        ranks = _gather({"losses": losses, "refs": [describe_ref(r) for r in self.refs]})
        lines = []
        for rank, part in enumerate(ranks):
            refs = part["refs"]
            listed = ", ".join(refs[:MAX_LISTED]) + (f", ... ({len(refs)} in all)" if len(refs) > MAX_LISTED else "")
            loss_text = ", ".join(f"{v:g}" for v in part["losses"])
            lines.append(f"  rank {rank}: loss [{loss_text}]; samples: {listed or 'unknown (no sample refs)'}")
        message = (f"{headline}; {action}, nothing non-finite was written. The step's batch:\n" + "\n".join(lines)
                   + "\nCheck these samples (tools/check_image.py), lower --learning_rate, or use bf16 instead of "
                     "fp16.")
        if not _distributed() or dist.get_rank() == 0:
            logger.error(message)
        raise NonFiniteError(message)
