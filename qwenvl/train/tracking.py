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
        for name, count in sorted(Counter(ref.dataset for ref in getattr(dataset, "refs", [])).items()):
            summary[f"data/{split}/{name}"] = count
    return summary


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
