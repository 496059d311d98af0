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
from qwenvl.data.vision import VisionConfig
from qwenvl.models import ModelFamily, VisionSettings, family_for
from qwenvl.models.base import read_json
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments, PixelCount

# DataArguments flags that change how media become tokens; the tools take them with training's names and defaults.
MEDIA_FLAGS = ("max_pixels", "min_pixels", "base_interval", "video_max_frames", "video_min_frames",
               "video_max_frame_pixels", "video_min_frame_pixels", "video_fps", "video_max_pixels", "video_min_pixels")
_FLAG_TYPES = {"PixelCount": PixelCount, "int": int, "float": float}


def add_media_flags(parser: argparse.ArgumentParser) -> None:
    """``--max_pixels`` ... with the types, defaults and help of training's ``DataArguments``."""
    fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    for name in MEDIA_FLAGS:
        spec = fields[name]
        # A string under `from __future__ import annotations`, the class once HfArgumentParser resolved it.
        type_name = spec.type if isinstance(spec.type, str) else spec.type.__name__
        type_name = type_name.removesuffix(" | None")  # optional flags: None = the checkpoint's value
        help_text = spec.metadata.get("help", "").replace("%", "%%")
        parser.add_argument(f"--{name}", type=_FLAG_TYPES[type_name], default=spec.default,
                            help=f"as in training (default {spec.default}){'; ' + help_text if help_text else ''}")


def media_data_args(args: argparse.Namespace) -> DataArguments:
    """The ``DataArguments`` of the parsed media flags (validated as training validates them)."""
    return DataArguments(**{name: getattr(args, name) for name in MEDIA_FLAGS})


@dataclass(frozen=True)
class Checkpoint:
    """What the tools need from a model folder to build samples exactly as training does."""

    tokenizer: Any
    vision_config: VisionConfig
    family: ModelFamily
    settings: VisionSettings


def load_checkpoint(path: str, data_args: DataArguments) -> Checkpoint:
    """Tokenizer, image geometry (with the pixel flags), family and processor settings of a model folder.

    Args:
        path (str): the checkpoint folder (``config.json``, tokenizer, ``preprocessor_config.json``).
        data_args (DataArguments): the media flags (``--min_pixels``/``--max_pixels`` are applied).

    Returns:
        Checkpoint: what ``TokenCounter`` and ``SampleValidator`` take.

    Raises:
        ValueError: the folder has no ``config.json`` or its model type is not supported.
    """
    from transformers import AutoTokenizer

    config = read_json(Path(path) / "config.json")
    if config is None:
        raise ValueError(f"{path}: no config.json; --model_name_or_path must be a Qwen-VL checkpoint folder")
    family = family_for(config)
    processor = load_image_processor(path)
    vision_config = VisionConfig.from_image_processor(processor, data_args.min_pixels, data_args.max_pixels)
    return Checkpoint(AutoTokenizer.from_pretrained(path), vision_config, family, family.vision_settings(path))


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


def check_distinct_inputs(specs: list[str]) -> None:
    """Refuse an input named twice (``a a`` or ``a%50 a%50``): its samples would be checked or packed twice.

    Raises:
        ValueError: naming the input given twice.

    Example:
        >>> check_distinct_inputs(["demo_video", "demo_video%50"])
        Traceback (most recent call last):
        ValueError: input 'demo_video' is given twice ('demo_video' and 'demo_video%50'): its samples would be counted twice; name it once
    """
    seen: dict[str, str] = {}
    for spec in specs:
        name, _ = parse_sampling_rate(spec)
        key = os.path.abspath(name) if looks_like_file(name) else name
        if key in seen:
            raise ValueError(f"input {name!r} is given twice ({seen[key]!r} and {spec!r}): its samples would be "
                             f"counted twice; name it once")
        seen[key] = spec


def add_policy_flag(parser: argparse.ArgumentParser, skip_help: str) -> None:
    """``--bad_sample_policy`` with training's choices and default (skip)."""
    parser.add_argument("--bad_sample_policy", choices=("skip", "error"), default="skip",
                        help=f"as in training: 'skip' (default) {skip_help}; 'error' stops at the first bad sample "
                             f"(lowest index of the first input that has one) naming its file, index and cause")


def output_stem(annotation_path: str, sampling_rate: float) -> str:
    """``train.json`` -> ``train``; with ``%50`` -> ``train_50pct``."""
    stem = Path(annotation_path).name.removesuffix(".jsonl").removesuffix(".json")
    return stem + (f"_{sampling_rate * 100:g}pct" if sampling_rate < 1.0 else "")


def write_json_atomic(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write JSON through a temporary file, so a killed run never leaves half a file.

    Text is written as UTF-8; a string that UTF-8 cannot hold (an unpaired surrogate read
    from a ``"\\ud800"`` escape) makes the whole file fall back to ``\\u`` escapes, which
    round-trip, instead of failing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text = json.dumps(payload, ensure_ascii=False, indent=indent)
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(payload, ensure_ascii=True, indent=indent).encode("ascii")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
