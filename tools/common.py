"""What the dataset tools (pack_data.py, check_image.py) share: inputs, media flags, atomic writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl.data import data_dict, data_list, parse_sampling_rate
from qwenvl.train.argument import DataArguments, PixelCount

# DataArguments flags that change how media become tokens; the tools take them with training's names and defaults.
MEDIA_FLAGS = ("max_pixels", "min_pixels", "base_interval", "video_max_frames", "video_min_frames",
               "video_max_frame_pixels", "video_min_frame_pixels")
_FLAG_TYPES = {"PixelCount": PixelCount, "int": int, "float": float}


def add_media_flags(parser: argparse.ArgumentParser) -> None:
    """``--max_pixels`` ... with the types, defaults and help of training's ``DataArguments``."""
    fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    for name in MEDIA_FLAGS:
        spec = fields[name]
        # A string under `from __future__ import annotations`, the class once HfArgumentParser resolved it.
        type_name = spec.type if isinstance(spec.type, str) else spec.type.__name__
        help_text = spec.metadata.get("help", "").replace("%", "%%")
        parser.add_argument(f"--{name}", type=_FLAG_TYPES[type_name], default=spec.default,
                            help=f"as in training (default {spec.default}){'; ' + help_text if help_text else ''}")


def media_data_args(args: argparse.Namespace) -> DataArguments:
    """The ``DataArguments`` of the parsed media flags (validated as training validates them)."""
    return DataArguments(**{name: getattr(args, name) for name in MEDIA_FLAGS})


def looks_like_file(name: str) -> bool:
    """An input that names an annotation file rather than a registered dataset."""
    return name.endswith((".json", ".jsonl")) or os.sep in name or (os.altsep is not None and os.altsep in name)


@dataclass
class Source:
    """One input of a tool: where its samples come from and which of them it works on."""

    label: str  # what the user typed
    name: str  # registry name, or the annotation path for file inputs
    annotation_path: str
    data_path: str
    sampling_rate: float
    records: list = field(repr=False, default_factory=list)
    indices: list[int] = field(repr=False, default_factory=list)


def resolve_input(spec: str, data_path: str) -> tuple[str, float, str, str]:
    """One input (``name``, ``name%N``, ``file.json`` or ``file.json%N``) -> where its samples are.

    Args:
        spec: what the user typed.
        data_path: media folder of annotation-file inputs (registry entries bring their own).

    Returns:
        (name, sampling rate, annotation_path, data_path); ``name`` is the registry
        name or the annotation path, the key ``%N`` subsets are seeded with.

    Raises:
        ValueError: neither a registered name nor a file path (the message lists the
            registered names), or a bad ``%N``.
    """
    name, rate = parse_sampling_rate(spec)
    if looks_like_file(name):
        return name, rate, name, data_path
    if name in data_dict:
        config = data_list([spec])[0]
        return name, rate, config["annotation_path"], config["data_path"]
    raise ValueError(
        f"input {spec!r} is neither a registered dataset nor an annotation file (.json/.jsonl or a path); "
        f"registered datasets: {', '.join(sorted(data_dict))}"
    )


def output_stem(annotation_path: str, sampling_rate: float) -> str:
    """``train.json`` -> ``train``; with ``%50`` -> ``train_50pct``."""
    stem = Path(annotation_path).name.removesuffix(".jsonl").removesuffix(".json")
    return stem + (f"_{sampling_rate * 100:g}pct" if sampling_rate < 1.0 else "")


def write_json_atomic(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write JSON through a temporary file, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=indent)
    os.replace(tmp, path)
