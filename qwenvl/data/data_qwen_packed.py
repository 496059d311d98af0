"""Packed annotation files (written by ``tools/pack_data.py``): one training row per group.

A packed file is a JSON list whose items are groups, each a list of ordinary
samples (SPEC 4). Register it like any dataset (``annotation_path`` = the
``*_pack.json``, ``data_path`` = the source's) and train with
``--data_packing True --dataset_use my_ds_pack``.

``PackedSupervisedDataset[g]`` is the list of the group's samples, each built
exactly like ``LazySupervisedDataset`` builds it (same tokens, pixels, position
ids, ``model_max_length`` rule); ``PackedDataCollatorForSupervisedDataset``
concatenates all samples of the micro-batch with ``flatten_instances``: one row,
4-row position ids, no padding, no attention mask (SPEC 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenvl.data.data_qwen import BadSampleError, LazySupervisedDataset, Problem, SampleRef, flatten_instances


@dataclass(frozen=True)
class PackedSampleRef(SampleRef):
    """A sample inside a packed file: ``index`` is the group, ``position`` the sample within it."""

    position: int = 0


class PackedSupervisedDataset(LazySupervisedDataset):
    """Groups of a packed file; item ``g`` is the list of group ``g``'s sample items.

    Takes the same arguments as ``LazySupervisedDataset`` (``bad_sample_policy``,
    ``io_retries`` and ``io_backoff`` included); ``%N`` in ``dataset_use`` keeps
    N percent of the groups. Each sample is loaded with ``load_sample``, so under
    ``skip`` a bad sample becomes a ``Problem`` inside its group, which the
    collator drops and reports; the rest of the group still trains.

    Raises:
        ValueError: an item of the file is not a non-empty list of samples (the
            file was not written by ``tools/pack_data.py``); the message names
            the file and the item.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # The parent reads the registry and the %N subsets; its records are our groups.
        super().__init__(*args, **kwargs)
        groups, group_refs = self.records, self.refs
        self.records, self.refs = [], []  # one entry per sample, so the parent's get_item works on samples
        self.groups: list[list[int]] = []  # group -> indices into records
        for group, ref in zip(groups, group_refs):
            if not isinstance(group, list) or not group:
                found = "an empty list" if isinstance(group, list) else f"a {type(group).__name__}"
                raise ValueError(
                    f"{ref.annotation_path}:{ref.index}: expected a group (a non-empty list of samples) but found "
                    f"{found}; with --data_packing True, --dataset_use must name files written by "
                    f"tools/pack_data.py (dataset {ref.dataset!r})"
                )
            members = []
            for position, sample in enumerate(group):
                members.append(len(self.records))
                self.records.append(sample)
                self.refs.append(PackedSampleRef(ref.dataset, ref.annotation_path, ref.data_path, ref.index,
                                                 position))
            self.groups.append(members)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> list[dict[str, Any] | Problem]:
        """The items of group ``g``, each as ``LazySupervisedDataset.load_sample`` builds it."""
        return [self.load_sample(i) for i in self.groups[g]]

    @property
    def lengths(self) -> list[int]:
        """Rough length of every group: the sum of its samples' rough lengths."""
        per_sample = LazySupervisedDataset.lengths.fget(self)
        return [sum(per_sample[i] for i in members) for members in self.groups]

    def bad(self, i: int, reason: str, kind: str = "invalid") -> BadSampleError:
        """Error for sample ``i``: ``{pack file}:{group}: sample {position} of the group: {reason}``."""
        ref = self.refs[i]
        return BadSampleError(ref.annotation_path, ref.index, f"sample {ref.position} of the group: {reason}", kind)


@dataclass
class PackedDataCollatorForSupervisedDataset:
    """Flatten every sample of every group in the micro-batch into one row (``flatten_instances``).

    Items may be groups (lists of sample items, from ``PackedSupervisedDataset``)
    or single sample items (an unpacked eval set), so one collator serves both.
    ``Problem`` entries of skipped bad samples are dropped and reported by
    ``flatten_instances``.

    Example:
        >>> batch = PackedDataCollatorForSupervisedDataset()([[a, b], [c]])  # == flatten_instances([a, b, c])
        >>> batch["position_ids"].shape  # (4, 1, len(a) + len(b) + len(c))
    """

    pad_token_id: int = 0  # only fills the placeholder of an all-bad micro-batch

    def __call__(self, instances: Sequence[Any]) -> dict[str, torch.Tensor]:
        samples = [s for x in instances for s in (x if isinstance(x, list) else [x])]
        return flatten_instances(samples, self.pad_token_id)
