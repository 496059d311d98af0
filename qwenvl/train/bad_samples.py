"""Bad samples skipped during training: counted across ranks and dataloader workers, reported, capped.

How a skipped sample travels (``--bad_sample_policy skip``):

1. ``LazySupervisedDataset[i]`` returns a ``Problem`` instead of the item, in
   whichever process loads it (a dataloader worker or the rank itself);
2. the collator drops it and lists it under ``batch["bad_samples"]``, so it
   reaches the rank's main process with the batch, whatever the number of
   workers (an all-bad micro-batch becomes a one-token placeholder with loss 0);
3. ``QwenVLTrainer`` pops the list before the model and hands it to ``BadSampleMonitor.record``;
4. at every optimizer step the ranks exchange what they saw (one ``all_reduce``
   of a count; an ``all_gather_object`` only when something is new), so every
   rank holds the same list and takes the same decision: when more than
   ``--bad_sample_threshold`` of the training samples are bad, all ranks raise
   ``BadDataError`` at the same step, with the list.

Rank 0 logs the totals per dataset at the end of each epoch that skipped something
(and one line at the end of training) and writes every
bad sample to ``output_dir/bad_samples.jsonl`` (one JSON object per line:
dataset, annotation_path, index, kind, reason, message, split, epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from qwenvl.data.data_qwen import Problem

logger = logging.getLogger(__name__)

BAD_SAMPLES_FILE = "bad_samples.jsonl"
MAX_LISTED = 50  # problems quoted in the BadDataError message; the file has them all


class BadDataError(RuntimeError):
    """More than ``--bad_sample_threshold`` of the training samples are bad; the message lists them."""


def dataset_sizes(dataset: Any) -> dict[str, int]:
    """Samples per registry name, from the dataset's ``refs`` (one per sample).

    Example:
        >>> dataset_sizes(LazySupervisedDataset(tokenizer, DataArguments(dataset_use="demo_text_only"), cfg))
        {'demo_text_only': 8}
    """
    per_dataset = getattr(dataset, "samples_per_dataset", None)
    if per_dataset is not None:  # no SampleRef per sample (a million of them at 1M samples)
        return dict(per_dataset())
    refs = getattr(dataset, "refs", None)
    if refs is None:
        return {"train": len(dataset)}
    return dict(Counter(ref.dataset for ref in refs))


class BadSampleMonitor(TrainerCallback):
    """Counts, reports and caps the bad samples that training skipped (see the module docstring).

    Args:
        sizes: training samples per dataset name (``dataset_sizes``).
        threshold: stop once more than this fraction of the training samples is bad.
        output_dir: where rank 0 writes ``bad_samples.jsonl``.

    Raises:
        BadDataError: from ``on_step_end``/``on_epoch_end``/``on_train_end`` when the threshold is crossed.
    """

    def __init__(self, sizes: dict[str, int], threshold: float, output_dir: str):
        self.sizes = dict(sizes)
        self.total = sum(self.sizes.values())
        self.threshold = threshold
        self.output_dir = output_dir
        self.pending: list[dict[str, Any]] = []  # seen by this rank since the last sync
        self.problems: dict[tuple[str, str, int], dict[str, Any]] = {}  # all ranks; identical on every rank
        self.epoch = 1

    # ------------------------------------------------------------ collecting
    def record(self, problems: Iterable[Problem], split: str = "train") -> None:
        """Note the bad samples of one micro-batch (called by ``QwenVLTrainer`` on this rank)."""
        for problem in problems:
            self.pending.append(problem.to_dict() | {"split": split, "epoch": self.epoch})

    def sync(self, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
        """Merge what every rank recorded since the last call; every rank must call it at the same point.

        Returns:
            the entries not seen before (the same list on every rank).
        """
        local, self.pending = self.pending, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([len(local)], dtype=torch.long, device=device)
            dist.all_reduce(count)
            if int(count.item()) == 0:
                return []
            gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            local = [entry for part in gathered for entry in (part or [])]
        new = []
        for entry in local:
            key = (entry["split"], entry["annotation_path"], entry["index"])
            if key not in self.problems:
                self.problems[key] = entry
                new.append(entry)
        return new

    # ------------------------------------------------------------ reporting
    def train_problems(self) -> list[dict[str, Any]]:
        """Distinct bad training samples so far, sorted by dataset, file and index."""
        entries = [e for e in self.problems.values() if e["split"] == "train"]
        return sorted(entries, key=lambda e: (e["dataset"], e["annotation_path"], e["index"]))

    def report(self) -> str:
        """Totals per dataset, e.g. ``bad samples: 2 of 20 training samples skipped (10.00%)`` then one line each.

        Example output::

            bad samples: 2 of 20 training samples skipped (10.00%)
              demo_bad: 2 of 20 (bad_image 1, missing_media 1)
        """
        problems = self.train_problems()
        lines = [f"bad samples: {len(problems)} of {self.total} training samples skipped "
                 f"({100.0 * len(problems) / max(self.total, 1):.2f}%)"]
        for name, size in self.sizes.items():
            kinds = Counter(e["kind"] for e in problems if e["dataset"] == name)
            detail = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
            lines.append(f"  {name}: {sum(kinds.values())} of {size}" + (f" ({detail})" if detail else ""))
        evaluation = [e for e in self.problems.values() if e["split"] != "train"]
        if evaluation:
            lines.append(f"  eval: {len(evaluation)} bad samples skipped")
        return "\n".join(lines)

    def write(self) -> str:
        """Write every bad sample to ``output_dir/bad_samples.jsonl`` (atomically); returns the path."""
        path = os.path.join(self.output_dir, BAD_SAMPLES_FILE)
        os.makedirs(self.output_dir, exist_ok=True)
        entries = sorted(self.problems.values(),
                         key=lambda e: (e["split"] != "train", e["dataset"], e["annotation_path"], e["index"]))
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        return path

    def check_threshold(self, is_main: bool) -> None:
        """Raise ``BadDataError`` (on every rank alike) when more than ``threshold`` of the samples are bad."""
        problems = self.train_problems()
        if len(problems) <= self.threshold * self.total:
            return
        path = os.path.join(self.output_dir, BAD_SAMPLES_FILE)
        if is_main:
            self.write()
        listed = "\n".join(f"  [{e['kind']}] {e['message']}" for e in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise BadDataError(
            f"{len(problems)} of {self.total} training samples are bad ({100.0 * len(problems) / self.total:.2f}%), "
            f"more than --bad_sample_threshold {self.threshold:g}; fix or drop them (tools/check_image.py lists "
            f"them all), or raise the threshold. All of them are in {path}:\n{listed}{more}"
        )

    # ------------------------------------------------------------ Trainer hooks
    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(math.floor(state.epoch or 0)) + 1

    def on_step_end(self, args, state, control, **kwargs):
        new = self.sync(args.device)
        if new:
            self._log_new(new, state.is_world_process_zero)
            self.check_threshold(state.is_world_process_zero)

    def _log_new(self, entries: list[dict[str, Any]], is_main: bool) -> None:
        if is_main:  # once per run: entries are new to every rank, logged by rank 0 only
            for entry in entries:
                logger.warning("skipped bad sample (%s): %s", entry["kind"], entry["message"])

    def on_evaluate(self, args, state, control, **kwargs):
        self._log_new(self.sync(args.device), state.is_world_process_zero)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._end_of(f"epoch {self.epoch}", args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._end_of("training", args, state)

    def _end_of(self, what: str, args, state) -> None:
        """Report after an epoch only when something was skipped; at the end of training always (one line if none)."""
        self._log_new(self.sync(args.device), state.is_world_process_zero)
        if state.is_world_process_zero:
            if self.problems:
                path = self.write()
                logger.warning("after %s: %s\n  (listed in %s)", what, self.report(), path)
            elif what == "training":
                logger.info("bad samples: none of %d training samples skipped", self.total)
        self.check_threshold(state.is_world_process_zero)
