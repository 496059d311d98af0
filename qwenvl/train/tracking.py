"""Experiment tracking: what a run trains and on what data, in its wandb summary.

``--report_to wandb`` makes the Trainer log losses and LRs; ``RunSummaryCallback``
adds the numbers a reader needs to compare runs: trainable parameters per
module and samples per dataset. Offline runs (``WANDB_MODE=offline``) keep
them in ``wandb/offline-run-*/files/wandb-summary.json``.
"""

from __future__ import annotations

import logging
import math
import os
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
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils creates (same object)
    if not any(isinstance(f, OncePerRunFilter) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(OncePerRunFilter(("Setting accelerator to CPU",)))


class OncePerRunFilter(logging.Filter):
    """Let a message that every process logs through only on the first rank (``RANK`` 0 or unset), once.

    DeepSpeed's "Setting accelerator to CPU" comes from each process that imports it: one line says it.

    Args:
        prefixes: starts of the messages to keep to one line per run.
    """

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        if os.environ.get("RANK", "0") != "0" or prefix in self.seen:
            return False
        self.seen.add(prefix)
        return True


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
        self.weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.legacy_notes = list(legacy_notes or [])
        self.resume_from = resume_from
        self.text = ""

    def summary(self, args: Any, state: Any, train_dataloader: Any = None) -> str:
        """The block's text.

        Args:
            args, state: the Trainer's arguments and state (``state.max_steps`` set).
            train_dataloader: the Trainer's (per-process) train dataloader: epochs are counted from its
                length as the Trainer counts them; without it, from the dataset's length.
        """
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
            steps_line(args, state, len(self.train_dataset), effective, train_dataloader),
            f"precision: {'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'} (weights {self.weights_dtype}); "
            f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}",
            f"tokens per step: {tokens}",
            loss_line(args, world),
            *interval_lines(args, state),
        ]
        plan = getattr(self.train_dataset, "plan", None)
        if plan is not None:  # online packing
            lines.append(f"packing: {len(plan.members):,} samples in {len(plan):,} rows of {plan.pack_length:,} "
                         f"tokens, fill {100 * plan.fill:.2f}%")
        lines += [f"old flag: {note}" for note in self.legacy_notes]
        if getattr(args, "launch_note", None):
            lines.append(f"launch: {args.launch_note}")
        lines += config_file_lines(args)
        if self.resume_from:
            lines.append(f"resuming from {self.resume_from}")
        return "\n".join(lines)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if state.is_world_process_zero:
            self.text = self.summary(args, state, train_dataloader)
            logger.info("start-up summary\n%s", "\n".join("  " + line for line in self.text.splitlines()))


def steps_line(args: Any, state: Any, items: int, effective: int, train_dataloader: Any = None) -> str:
    """``steps: 2 optimizer steps = 2.00 epoch(s) of 2 items (--max_steps 2), 1 step(s) per epoch``.

    Epochs are optimizer steps over the steps of one pass through the train dataloader, counted as the
    Trainer counts them (``ceil(len(dataloader) / accumulation)``), so a dataset smaller than one
    effective batch (the sampler pads it with repeats) or packed rows count right.

    Args:
        args, state: the Trainer's arguments and state.
        items: ``len(train_dataset)`` (rows: packed groups for a packed run).
        effective: items per optimizer step over all processes.
        train_dataloader: the Trainer's per-process train dataloader, or None (then ``items / effective``).
    """
    try:
        batches = len(train_dataloader) if train_dataloader is not None else None
    except TypeError:  # an iterable dataset has no length
        batches = None
    accumulation = max(int(args.gradient_accumulation_steps), 1)
    if batches:
        per_epoch = max(math.ceil(batches / accumulation), 1)
    else:
        per_epoch = max(math.ceil(items / max(effective, 1)), 1)
    source = f"--max_steps {args.max_steps}" if args.max_steps > 0 else f"--num_train_epochs {args.num_train_epochs:g}"
    return (f"steps: {state.max_steps:,} optimizer steps = {state.max_steps / per_epoch:.2f} epoch(s) of {items:,} "
            f"items ({source}), {per_epoch:,} step(s) per epoch")


# ------------------------------------------------------------ config files
def steps_text(value: float, resolved: int | None, max_steps: int) -> str:
    """An interval as the summary states it: ``every 2 step(s)``, or, for a fraction of the run,
    ``every 0.1 of the run = every 2 step(s) of 20``.

    Example:
        >>> steps_text(0.1, 2, 20), steps_text(5, 5, 20)
        ('every 0.1 of the run = every 2 step(s) of 20', 'every 5 step(s)')
    """
    if value < 1:
        steps = resolved if resolved else max(1, math.ceil(max_steps * value))
        return f"every {value:g} of the run = every {steps} step(s) of {max_steps}"
    return f"every {value:g} step(s)"


def interval_lines(args: Any, state: Any) -> list[str]:
    """Logging, evaluation and saving intervals, fractions resolved to the steps the Trainer uses."""
    max_steps = int(state.max_steps)
    line = f"logging {steps_text(args.logging_steps, getattr(state, 'logging_steps', None), max_steps)}; saving "
    line += f"{steps_text(args.save_steps, getattr(state, 'save_steps', None), max_steps)} to {args.output_dir}"
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if strategy == "steps" and args.eval_steps is not None:
        line += f"; evaluating {steps_text(args.eval_steps, getattr(state, 'eval_steps', None), max_steps)}"
    return [line]


def config_file_lines(args: Any) -> list[str]:
    """The config files read, which file (or the command line) set each non-default value (and to what), and what
    file keys were translated to (``TrainingArguments.config_*``, written by ``parse_args``)."""
    files = getattr(args, "config_files", [])
    if not files:
        return []
    lines = ["config files: " + ", ".join(f"{path} ({'+'.join(kinds)})" for path, kinds in files)]
    origins = getattr(args, "config_origins", {})
    values = getattr(args, "config_values", {})
    by_origin: dict[str, list[str]] = {}
    for name, origin in sorted(origins.items()):
        by_origin.setdefault(origin, []).append(f"{name}={values.get(name, '?')}")
    lines += [f"set by {origin}: {', '.join(names)}" for origin, names in by_origin.items()]
    lines += [f"config: {note}" for note in getattr(args, "config_notes", [])]
    return lines


def loss_line(args: Any, world: int) -> str:
    """How a step weighs its tokens (``--loss_average``) and, with several processes, DDP's unused-parameter search.

    Example:
        >>> loss_line(TrainingArguments(output_dir="o", gradient_accumulation_steps=4), 1)
        'loss: token mean over the 4 accumulated micro-batches (--loss_average token)'
    """
    average = getattr(args, "loss_average", "token")
    scope = f"the {args.gradient_accumulation_steps} accumulated micro-batches" \
        if args.gradient_accumulation_steps > 1 else "the micro-batch"
    if world > 1:
        scope += f" of all {world} processes" if average == "token" else f", then averaged over {world} processes"
    text = f"loss: {'token mean over' if average == 'token' else 'mean of the token means of'} {scope} " \
           f"(--loss_average {average})"
    if world > 1 and args.ddp_find_unused_parameters is not None and not (args.deepspeed or args.fsdp):
        text += f"; DDP find_unused_parameters {args.ddp_find_unused_parameters}"
    return text
