"""Dataset registry.

Register a dataset by adding a dict and an entry in ``data_dict``::

    MY_DATASET = {
        "annotation_path": "/data/my_dataset/train.json",  # a JSON list or a .jsonl file
        "data_path": "/data/my_dataset",  # media paths in the file are relative to this ("" = as written)
    }
    data_dict = {..., "my_dataset": MY_DATASET}

then train with ``--dataset_use my_dataset`` or ``--dataset_use my_dataset%50``
(keep a seeded 50 % of it; the same subset on every rank).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_DEMO = Path(__file__).resolve().parents[2] / "demo"

# ---- demo datasets, shipped in demo/ (they train out of the box) ------------
DEMO_SINGLE_IMAGE = {
    "annotation_path": str(_DEMO / "single_image.json"),
    "data_path": str(_DEMO),
}
DEMO_MULTI_IMAGE = {
    "annotation_path": str(_DEMO / "multi_image.json"),
    "data_path": str(_DEMO),
}
DEMO_GROUNDING = {
    "annotation_path": str(_DEMO / "grounding.json"),
    "data_path": str(_DEMO),
}
DEMO_TEXT_ONLY = {
    "annotation_path": str(_DEMO / "text_only.jsonl"),
    "data_path": "",
}
DEMO_VIDEO = {
    "annotation_path": str(_DEMO / "video.json"),
    "data_path": str(_DEMO),
}

# ---- your datasets ----------------------------------------------------------
# CAMBRIAN_737K = {
#     "annotation_path": "/data/cambrian/cambrian_737k.json",
#     "data_path": "/data/cambrian",
# }

data_dict = {
    "demo_single_image": DEMO_SINGLE_IMAGE,
    "demo_multi_image": DEMO_MULTI_IMAGE,
    "demo_grounding": DEMO_GROUNDING,
    "demo_text_only": DEMO_TEXT_ONLY,
    "demo_video": DEMO_VIDEO,
    # "cambrian_737k": CAMBRIAN_737K,
}

_NAME_RATE = re.compile(r"^(?P<name>[^%]+?)(?:%(?P<rate>.*))?$")
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def parse_sampling_rate(spec: str) -> tuple[str, float]:
    """Split ``"name%N"`` into (name, N / 100); no ``%`` means 1.0.

    Raises:
        ValueError: N is not a number in (0, 100].

    Example:
        >>> parse_sampling_rate("my_ds%50")
        ('my_ds', 0.5)
    """
    match = _NAME_RATE.match(spec.strip())
    if match is None:
        raise ValueError(f"dataset entry {spec!r} should look like 'name' or 'name%N'")
    name, rate = match.group("name").strip(), match.group("rate")
    if rate is None:
        return name, 1.0
    try:
        percent = float(rate)
    except ValueError:
        raise ValueError(f"dataset entry {spec!r}: sampling rate {rate!r} is not a number; use e.g. {name}%50") from None
    if not 0 < percent <= 100:
        raise ValueError(f"dataset entry {spec!r}: sampling rate must be in (0, 100], got {rate}")
    return name, percent / 100.0


def data_list(dataset_names: list[str]) -> list[dict]:
    """Look up registry entries; each result is a copy with ``sampling_rate`` added.

    Args:
        dataset_names: e.g. ``["demo_single_image%50", "demo_text_only"]``.

    Returns:
        one dict per name: ``annotation_path``, ``data_path``, ``sampling_rate``
        and ``name``.

    Raises:
        ValueError: an unknown name or a malformed rate (the message lists the
            registered names), or a name given twice (``a,a`` or ``a%50,a%50``).

    Example:
        >>> [d["sampling_rate"] for d in data_list(["demo_single_image%50", "demo_text_only"])]
        [0.5, 1.0]
    """
    configs = []
    named: dict[str, str] = {}  # name -> the entry that named it first
    for spec in dataset_names:
        if not spec.strip():
            continue
        try:
            name, rate = parse_sampling_rate(spec)
        except ValueError as exc:
            raise ValueError(f"{exc}. Registered datasets: {', '.join(sorted(data_dict))}") from None
        if name in named:  # 'a,a' and 'a%50,a%50' alike: every kept sample would be trained twice
            raise ValueError(f"dataset {name!r} is named twice in --dataset_use ({named[name]!r} and "
                             f"{spec.strip()!r}): each of its samples would be trained twice; name it once "
                             f"(use {name}%N to keep N percent)")
        named[name] = spec.strip()
        if name not in data_dict:
            raise ValueError(
                f"unknown dataset {name!r} in --dataset_use; registered datasets: {', '.join(sorted(data_dict))} "
                f"(register yours in {__file__})"
            )
        config = dict(data_dict[name])
        config["sampling_rate"] = rate
        config["name"] = name
        configs.append(config)
    if not configs:
        raise ValueError(f"--dataset_use names no dataset; registered datasets: {', '.join(sorted(data_dict))}")
    return configs


def looks_like_hub_name(name: str) -> bool:
    """Whether ``name`` has the shape of a Hugging Face hub dataset name (``owner/name`` or ``name``).

    Example:
        >>> looks_like_hub_name("lmms-lab/LLaVA-OneVision-Data"), looks_like_hub_name("data/train.json")
        (True, False)
    """
    return (name.count("/") <= 1 and not name.startswith((".", "/", "~")) and not os.path.splitext(name)[1]
            and bool(_HUB_NAME.fullmatch(name)))


# Optional keys of a registry entry and the type each must have (see qwenvl.data.sources).
_OPTIONAL_KEYS = {"split": str, "system_prompt": str, "columns": dict}


def load_registry_file(path: str) -> list[str]:
    """Add the datasets of a registry file (YAML or JSON) to ``data_dict``; returns their names.

    The file maps names to entries shaped like the Python ones, with the optional
    ``columns``, ``split`` and ``system_prompt`` of ``qwenvl.data.sources``::

        my_dataset:
          annotation_path: /data/my_dataset/train.json
          data_path: /data/my_dataset
        my_qa:
          annotation_path: qa_parquet          # a local Hugging Face dataset, or a cached hub name
          data_path: ""
          split: test
          system_prompt: Answer briefly.
          columns: {image: img, question: q, answer: a}

    Relative paths in the file are relative to the file's folder; an ``annotation_path``
    shaped like a hub name (``owner/name``) that is no path there stays a hub name. A name
    already in ``data_dict`` with a different entry is an error (rename one of them).

    Raises:
        ValueError: the file is not a mapping of names to entries with an ``annotation_path``,
            an optional key has the wrong type (e.g. ``split: 2024`` read by YAML as a number),
            or it redefines a registered name.
        OSError: the file cannot be read.

    Example:
        >>> load_registry_file("my_registry.yaml")
        ['my_dataset', 'my_qa']
    """
    import json

    file = Path(path)
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        entries = json.loads(text)
    else:
        import yaml

        entries = yaml.safe_load(text)
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a mapping of dataset names to entries, found {type(entries).__name__}")
    added = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "annotation_path" not in entry:
            raise ValueError(f"{path}: entry {name!r} should be a mapping with annotation_path (and data_path)")
        for key, expected in _OPTIONAL_KEYS.items():
            value = entry.get(key)
            if value is not None and not isinstance(value, expected):
                raise ValueError(f"{path}: entry {name!r}: {key} should be a {expected.__name__} but found "
                                 f"{type(value).__name__} {value!r}" + (" (quote it)" if expected is str else ""))
        resolved = dict(entry)
        for key in ("annotation_path", "data_path"):
            value = str(resolved.get(key) or "")
            if value and not os.path.isabs(value):
                local = file.parent / value
                if key == "data_path" or local.exists() or not looks_like_hub_name(value):
                    value = str(local.resolve())
            resolved[key] = value
        if name in data_dict and data_dict[name] != resolved:
            raise ValueError(f"{path}: dataset {name!r} is already registered with {data_dict[name]}; rename it")
        data_dict[name] = resolved
        added.append(str(name))
    return added
