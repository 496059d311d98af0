"""Packed annotation files (written by ``tools/pack_data.py``): one training row per group.

A packed file is a JSON list whose items are groups, each a list of ordinary
samples (SPEC 4). ``tools/pack_data.py --registry_file my_registry.yaml`` registers it
(``my_ds_pack``: ``annotation_path`` = the ``*_pack.json``, ``data_path`` = the source's); train
with ``--dataset_registry my_registry.yaml --data_packing True --dataset_use my_ds_pack``, or
with ``--data_packing True --dataset_use /path/x_pack.json`` when the file lies in its media
folder. Without ``--data_packing True`` a packed file is refused before the model loads
(``qwenvl/train/preflight.py``).

``PackedSupervisedDataset[g]`` is the list of the group's samples, each built
exactly like ``LazySupervisedDataset`` builds it (same tokens, pixels, position
ids, ``model_max_length`` rule); ``PackedDataCollatorForSupervisedDataset``
concatenates all samples of the micro-batch with ``flatten_instances``: one row,
4-row position ids, no padding, no attention mask (SPEC 9).
"""

from __future__ import annotations

# The classes live in data_qwen.py (make_supervised_data_module builds them; one module, no import cycle).
from qwenvl.data.data_qwen import (  # noqa: F401 - the names users import from here
    PackedDataCollatorForSupervisedDataset,
    PackedSampleRef,
    PackedSupervisedDataset,
)

__all__ = ["PackedDataCollatorForSupervisedDataset", "PackedSampleRef", "PackedSupervisedDataset"]
