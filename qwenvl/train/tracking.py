"""Experiment tracking: what a run trains and on what data, in its wandb summary.

``--report_to wandb`` makes the Trainer log losses and LRs; ``RunSummaryCallback``
adds the numbers a reader needs to compare runs: trainable parameters per
module and samples per dataset. Offline runs (``WANDB_MODE=offline``) keep
them in ``wandb/offline-run-*/files/wandb-summary.json``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from torch import nn
from transformers import TrainerCallback

from qwenvl.train.trainer import LLM, PROJECTOR, VISION_TOWER, classify_parameter

logger = logging.getLogger(__name__)


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts, overall and per module (ZeRO-3 partitions counted whole).

    Returns:
        ``{"params/total", "params/trainable", "params/trainable/llm",
        "params/trainable/vision_tower", "params/trainable/projector",
        "params/total/llm", ...}``.

    Example:
        >>> parameter_summary(nn.Linear(2, 2))
        {'params/total': 6, 'params/trainable': 6, 'params/total/llm': 6, 'params/trainable/llm': 6, \
'params/total/vision_tower': 0, 'params/trainable/vision_tower': 0, 'params/total/projector': 0, \
'params/trainable/projector': 0}
    """
    total: Counter = Counter()
    trainable: Counter = Counter()
    for name, param in model.named_parameters():
        if ".original_module." in name:  # peft's frozen spare of a modules_to_save module: not in use
            continue
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        module = classify_parameter(name)
        total[module] += count
        if param.requires_grad:
            trainable[module] += count
    summary = {"params/total": sum(total.values()), "params/trainable": sum(trainable.values())}
    for module in (LLM, VISION_TOWER, PROJECTOR):
        summary[f"params/total/{module}"] = total[module]
        summary[f"params/trainable/{module}"] = trainable[module]
    return summary


def dataset_summary(train_dataset: Any, eval_dataset: Any | None = None) -> dict[str, int]:
    """Samples per split and, where the dataset records it, per registry name.

    Returns:
        ``{"data/train_samples": n, "data/train/<name>": n_name, ..., "data/eval_samples": m, ...}``.
    """
    summary: dict[str, int] = {}
    for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            continue
        summary[f"data/{split}_samples"] = len(dataset)
        for name, count in sorted(_per_dataset(dataset).items()):
            summary[f"data/{split}/{name}"] = count
    return summary


def _per_dataset(dataset: Any) -> dict[str, int]:
    """Samples per dataset name: the dataset's ``samples_per_dataset`` when it has one, else from its refs."""
    per_dataset = getattr(dataset, "samples_per_dataset", None)
    if per_dataset is not None:
        return dict(per_dataset())
    return dict(Counter(ref.dataset for ref in getattr(dataset, "refs", [])))


class RunSummaryCallback(TrainerCallback):
    """Write a summary dict (and a text report) into the wandb run once it exists; finish the run at the end.

    Runs after the Trainer's ``WandbCallback`` (callbacks fire in the order they
    were added and the integration ones come first), on the main process only.

    Args:
        summary: numbers for ``wandb.run.summary`` (``parameter_summary`` | ``dataset_summary``).
        report: text for the run config (``describe_trainable``), under ``trainable_report``.
    """

    def __init__(self, summary: dict[str, int], report: str = ""):
        self.summary = summary
        self.report = report

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is None:
            logger.warning("--report_to wandb but no wandb run is active: the run summary is not logged")
            return
        wandb.run.summary.update(self.summary)
        wandb.run.config.update({"trainable_report": self.report, **self.summary}, allow_val_change=True)

    def on_train_end(self, args, state, control, **kwargs):
        # The Trainer's WandbCallback (which ran just before) leaves the run open; a second train() in the
        # same process would log into it. Close it here (a script's exit would, too).
        if state.is_world_process_zero:
            import wandb

            if wandb.run is not None:
                wandb.finish()


# ------------------------------------------------------------ start-up summary
def quiet_library_warnings() -> None:
    """Filter, once, the library warnings that tell a user of this project nothing they can act on.

    Each filter names the module that warns and the start of its message, so anything new still shows.
    """
    import warnings

    noise = [
        # DeepSpeed's ZeRO-3 hooks and checkpoint code use torch APIs that torch marks as deprecated.
        (FutureWarning, r"deepspeed(\.|$)", r".*"),
        (FutureWarning, r"torch\.distributed", r"`torch\.distributed\.\w+` is deprecated"),
        (FutureWarning, r"torch\.utils\.checkpoint", r".*"),
        (UserWarning, r"torch\.utils\.checkpoint", r".*None of the inputs have requires_grad"),
        (UserWarning, r"torch\.distributed\.distributed_c10d", r".*barrier\(\).*device"),
        (UserWarning, r"accelerate(\.|$)", r".*(use_cpu|mixed precision|gradient_accumulation_plugin)"),
    ]
    for category, module, message in noise:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _estimated_tokens(dataset: Any) -> tuple[float | None, bool]:
    """Mean tokens per item and whether that is exact, without counting anything (``item_lengths``, else the
    first 2048 of ``lengths``); (None, False) when the dataset says nothing."""
    if hasattr(dataset, "item_lengths"):
        lengths, exact = dataset.item_lengths()
        return (float(np.mean(lengths)) if len(lengths) else None), exact
    try:
        lengths = dataset.lengths
    except (AttributeError, TypeError, ValueError):
        return None, False
    if not lengths:
        return None, False
    head = list(lengths[:2048])
    return sum(head) / len(head), False


class StartupSummaryCallback(TrainerCallback):
    """One block on the main process when training begins: what trains, on what, how fast it will go.

    Logged lines: model and family (``model_type``), attention, distributed mode, trainable parameters
    per module (``describe_trainable``), datasets with sizes and ``%N``, effective batch, optimizer
    steps and epochs, estimated tokens per step, old flags translated, and the checkpoint resumed from.

    Args:
        model: the model being trained (before DeepSpeed/FSDP wrapping).
        model_args, data_args: the parsed arguments.
        data_module: ``make_supervised_data_module``'s dict.
        distributed_type: ``trainer.accelerator.distributed_type``.
        trainable: ``describe_trainable(model)``.
        legacy_notes: ``TrainingArguments.legacy_notes``.
        resume_from: the checkpoint this run resumes from, or None.
    """

    def __init__(self, model: nn.Module, model_args: Any, data_args: Any, data_module: dict, distributed_type: Any,
                 trainable: str, legacy_notes: list[str] | None = None, resume_from: str | None = None):
        self.model_type = getattr(model.config, "model_type", "?")
        self.model_class = type(model).__name__
        self.attention = getattr(model.config, "_attn_implementation", None) or model_args.attn_implementation
        self.model_path = model_args.model_name_or_path
        self.data_args = data_args
        self.train_dataset = data_module["train_dataset"]
        self.eval_dataset = data_module.get("eval_dataset")
        self.distributed = str(distributed_type).split(".")[-1]
        self.trainable = trainable
        self.params = parameter_summary(model)
        self.legacy_notes = list(legacy_notes or [])
        self.resume_from = resume_from
        self.text = ""

    def summary(self, args: Any, state: Any) -> str:
        """The block's text."""
        world = max(int(args.world_size), 1)
        per_device = int(args.per_device_train_batch_size)
        accumulation = int(args.gradient_accumulation_steps)
        effective = per_device * world * accumulation
        mode = "packed" if self.data_args.data_packing else "flattened" if self.data_args.data_flatten else "padded"
        sizes = _per_dataset(self.train_dataset)
        rates = {}
        for spec in self.data_args.dataset_use.split(","):
            name, _, rate = spec.strip().partition("%")
            rates[name] = f" ({rate}%)" if rate else ""
        datasets = ", ".join(f"{name} {count:,}{rates.get(name, '')}" for name, count in sizes.items()) \
            or f"{len(self.train_dataset):,} items"
        mean, exact = _estimated_tokens(self.train_dataset)
        how = "exact counts" if exact else "rough: text words + media guesses"
        tokens = f"~{mean * effective:,.0f} ({how})" if mean else "unknown"
        lines = [
            f"model: {self.model_path} ({self.model_type}, {self.model_class}), attention {self.attention}",
            f"distributed: {self.distributed}, {world} process(es)" + (f", {args.deepspeed}" if args.deepspeed else ""),
            f"trainable: {self.params['params/trainable']:,} of {self.params['params/total']:,} parameters "
            f"(llm {self.params['params/trainable/llm']:,}, vision tower "
            f"{self.params['params/trainable/vision_tower']:,}, projector {self.params['params/trainable/projector']:,})",
            *("  " + line for line in self.trainable.splitlines()),
            f"data: {datasets}; batches {mode}"
            + (f"; eval {len(self.eval_dataset):,} samples" if self.eval_dataset is not None else ""),
            f"batch: {per_device} per device x {world} process(es) x {accumulation} accumulation = {effective} "
            f"{'packed rows' if self.data_args.data_packing else 'samples'} per optimizer step",
            f"steps: {state.max_steps:,} optimizer steps = {state.max_steps * effective / max(len(self.train_dataset), 1):.2f} "
            f"epoch(s) of {len(self.train_dataset):,} items"
            + (f" (--max_steps {args.max_steps})" if args.max_steps > 0 else f" (--num_train_epochs {args.num_train_epochs:g})"),
            f"tokens per step: {tokens}",
            f"logging every {args.logging_steps:g} step(s); saving every {args.save_steps:g} step(s) to "
            f"{args.output_dir}",
        ]
        plan = getattr(self.train_dataset, "plan", None)
        if plan is not None:  # online packing
            lines.append(f"packing: {len(plan.members):,} samples in {len(plan):,} rows of {plan.pack_length:,} "
                         f"tokens, fill {100 * plan.fill:.2f}%")
        lines += [f"old flag: {note}" for note in self.legacy_notes]
        if self.resume_from:
            lines.append(f"resuming from {self.resume_from}")
        return "\n".join(lines)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.text = self.summary(args, state)
            logger.info("start-up summary\n%s", "\n".join("  " + line for line in self.text.splitlines()))
