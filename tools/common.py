"""What the dataset tools (pack_data.py, check_image.py) share: inputs, media flags, atomic writes.

Inputs are resolved exactly as training resolves ``--dataset_use`` (``qwenvl.data.sources.resolve_sources``:
registry names, .json/.jsonl files, Hugging Face datasets, cached hub names, ``%N``) and read through
the same memory-mapped annotation store (``qwenvl.data.annotations.open_store``), so a tool sees the
records training sees, in the same ``%N`` subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl.data import data_dict, load_registry_file
from qwenvl.data.annotations import AnnotationStore, open_store
from qwenvl.data.chat import sample_indices
from qwenvl.data.sources import Source, resolve_sources
from qwenvl.data.vision import VisionConfig
from qwenvl.models import ModelFamily, VisionSettings, family_for
from qwenvl.models.base import read_json
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments, PixelCount

# DataArguments flags that change how media become tokens; the tools take them with training's names and defaults.
MEDIA_FLAGS = ("max_pixels", "min_pixels", "base_interval", "video_max_frames", "video_min_frames",
               "video_max_frame_pixels", "video_min_frame_pixels", "video_fps", "video_max_pixels", "video_min_pixels",
               "image_resize_mode", "image_max_size", "video_max_duration")
_FLAG_TYPES = {"PixelCount": PixelCount, "int": int, "float": float, "str": str}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")  # stripped from an input's name to name its outputs


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
    vision_config = VisionConfig.from_image_processor(processor, data_args.min_pixels, data_args.max_pixels,
                                                      getattr(data_args, "image_resize_mode", "keep_aspect"),
                                                      getattr(data_args, "image_max_size", None))
    return Checkpoint(AutoTokenizer.from_pretrained(path), vision_config, family, family.vision_settings(path))


# ------------------------------------------------------------------------- inputs
def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The positional inputs, ``--data_path`` and ``--dataset_registry`` (training's registry file flag)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="what --dataset_use takes: registry names (name or name%%N), annotation files (.json "
                             "list or .jsonl), Hugging Face datasets (save_to_disk folder, parquet or arrow files) "
                             "or cached hub dataset names, each optionally with %%N")
    parser.add_argument("--data_path", default="",
                        help="folder the media paths of inputs given by path (not registry names, which use their "
                             "own data_path) are relative to; default: paths as written")
    parser.add_argument("--dataset_registry", default="",
                        help="as in training: a registry file (YAML or JSON: name -> {annotation_path, data_path, "
                             "and optionally columns, split, system_prompt}) whose names the inputs may use")


def load_dataset_registry(path: str) -> list[str]:
    """Add the entries of ``--dataset_registry`` to the registry (``qwenvl.data.load_registry_file``).

    Returns:
        the names it added (none when ``path`` is empty).

    Raises:
        ValueError: ``--dataset_registry {path}: {cause}`` (unreadable, malformed, or redefining a name).
    """
    if not path:
        return []
    try:
        return load_registry_file(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--dataset_registry {path}: {exc}") from None


@dataclass
class ToolInput:
    """One input of a tool: its resolved source, its annotation store and the rows it works on.

    Attributes:
        label: what the user typed (``name%N``).
        source: as training resolves it; ``data_path`` is ``--data_path`` for an input given by path.
        store: the memory-mapped records (None until opened, or when opening failed).
        indices: (n,) int64 rows kept by ``%N``, in store order (the subset training keeps).
        error: why the store could not be opened ("" when it was).
    """

    label: str
    source: Source
    store: AnnotationStore | None = field(default=None, repr=False)
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    error: str = ""

    @property
    def name(self) -> str:
        """The registry name, or the input as typed: what ``%N`` subsets are seeded with."""
        return self.source.name

    @property
    def annotation_path(self) -> str:
        """The annotation file, dataset folder or file, or hub name (what messages name)."""
        return self.source.location

    @property
    def data_path(self) -> str:
        """The folder media paths are relative to ("" = as written)."""
        return self.source.data_path

    @property
    def sampling_rate(self) -> float:
        """The ``%N`` of the input as a fraction."""
        return self.source.sampling_rate

    def open(self, seed: int) -> None:
        """Open (converting once if needed) the store and pick the ``%N`` rows as training does.

        Raises:
            ValueError: the annotation file cannot be read (``load_annotations``'s messages), or a bad
                Hugging Face source or column mapping (``SourceError``).
            OSError: the files cannot be read.
        """
        self.store = open_store(self.source)
        if self.sampling_rate >= 1.0:  # every row, without a Python list of millions of ints
            self.indices = np.arange(len(self.store), dtype=np.int64)
        else:
            self.indices = np.asarray(sample_indices(len(self.store), self.sampling_rate, seed, self.name), np.int64)

    def output_folder(self, output_dir: str | None) -> Path:
        """``output_dir``, else the folder holding the annotation file or dataset (the working folder for a
        hub dataset)."""
        if output_dir:
            return Path(output_dir)
        if self.source.kind == "hub":
            return Path.cwd()
        return Path(self.annotation_path.rstrip("/\\") or ".").parent

    def output_stem(self, with_rate: bool = True) -> str:
        """``train.json`` -> ``train``; with ``%50`` -> ``train_50pct`` (unless ``with_rate`` is False); a Hugging
        Face dataset's split is added (``ds`` with split test -> ``ds_test``).

        Example:
            >>> ToolInput("x%50", Source("x", "json", "/d/train.json", (), "", 0.5)).output_stem()
            'train_50pct'
        """
        stem = Path(self.annotation_path.rstrip("/\\")).name
        for suffix in _SUFFIXES:
            stem = stem.removesuffix(suffix)
        if self.source.kind not in ("json", "jsonl") and self.source.split:
            stem += f"_{self.source.split}"
        return stem + (f"_{self.sampling_rate * 100:g}pct" if with_rate and self.sampling_rate < 1.0 else "")


def resolve_inputs(specs: Sequence[str], data_path: str) -> list[ToolInput]:
    """The tool's inputs, resolved by ``resolve_sources`` exactly as ``--dataset_use`` entries (stores not opened).

    Args:
        specs: e.g. ``["demo_single_image%50", "/data/extra.jsonl", "/data/hf_folder"]``.
        data_path: media folder of inputs given by path or hub name (registry entries bring their own).

    Returns:
        one ``ToolInput`` per non-blank spec, in order.

    Raises:
        SourceError: an input that names nothing that exists (the message lists the registered names), a bad
            ``%N``, the same dataset or file named twice, a folder that is not a dataset, a missing split.
    """
    labels = [spec.strip() for spec in specs if spec.strip()]
    sources = resolve_sources(labels, flag="the inputs")
    inputs = []
    for label, source in zip(labels, sources):
        if source.name not in data_dict:  # given by path: its media are relative to --data_path, as before
            source = dataclasses.replace(source, data_path=data_path)
        inputs.append(ToolInput(label, source))
    return inputs


def add_policy_flag(parser: argparse.ArgumentParser, skip_help: str) -> None:
    """``--bad_sample_policy`` with training's choices and default (skip)."""
    parser.add_argument("--bad_sample_policy", choices=("skip", "error"), default="skip",
                        help=f"as in training: 'skip' (default) {skip_help}; 'error' stops at the first bad sample "
                             f"(lowest index of the first input that has one) naming its file, index and cause")


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
