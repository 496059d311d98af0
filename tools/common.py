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
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl.data import data_dict, load_registry_file
from qwenvl.data.annotations import AnnotationStore, open_store
from qwenvl.data.chat import sample_indices
from qwenvl.data.media_settings import MEDIA_FLAGS
from qwenvl.data.sources import Source, resolve_sources, set_row_format
from qwenvl.data.vision import VisionConfig
from qwenvl.models import ModelFamily, VisionSettings, family_for
from qwenvl.models.base import read_json
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments, PixelCount, argument_names
from qwenvl.train.config_files import load_config_files

# The DataArguments flags that change how media become tokens (MEDIA_FLAGS) and those that turn rows into records
# (ROW_FLAGS): the tools take them with training's names and defaults.
ROW_FLAGS = ("dataset_columns", "message_format")
_FLAG_TYPES = {"PixelCount": PixelCount, "int": int, "float": float, "str": str}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")  # stripped from an input's name to name its outputs


def add_media_flags(parser: argparse.ArgumentParser, names: Sequence[str] = MEDIA_FLAGS, saved: bool = False) -> None:
    """``--max_pixels`` ... with the types, defaults and help of training's ``DataArguments``.

    Args:
        parser: the tool's parser.
        names: the flags to add (``MEDIA_FLAGS`` by default).
        saved: every default is None, meaning "what the model folder saved" (``tools/infer.py``).
    """
    fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    for name in names:
        spec = fields[name]
        # A string under `from __future__ import annotations`, the class once HfArgumentParser resolved it.
        type_name = spec.type if isinstance(spec.type, str) else spec.type.__name__
        type_name = type_name.removesuffix(" | None")  # optional flags: None = the checkpoint's value
        help_text = spec.metadata.get("help", "").replace("%", "%%")
        default = "as the model folder saved it (media_settings.json), else training's" if saved else spec.default
        choices = spec.metadata.get("choices")
        parser.add_argument(f"--{name}", type=_FLAG_TYPES[type_name], default=None if saved else spec.default,
                            choices=choices, help=f"as in training (default {default})"
                                                  f"{'; ' + help_text if help_text else ''}")


def add_row_flags(parser: argparse.ArgumentParser) -> None:
    """``--dataset_columns`` and ``--message_format``: training's column mapping and message template."""
    fields = {f.name: f for f in dataclasses.fields(DataArguments)}
    for name in ROW_FLAGS:
        help_text = fields[name].metadata.get("help", "").replace("%", "%%")
        parser.add_argument(f"--{name}", default="", help=f"as in training: {help_text}")


def apply_row_flags(args: argparse.Namespace) -> None:
    """Make the inputs read as training reads them under the same ``--dataset_columns`` / ``--message_format``.

    Raises:
        ValueError: a flag that training refuses (bad JSON, an unknown record key or placeholder).
    """
    row_args = DataArguments(**{name: getattr(args, name, "") or "" for name in ROW_FLAGS})
    set_row_format(*row_args.row_format())


# ------------------------------------------------------------------ config files
@dataclass
class ToolConfig:
    """What ``--config`` files gave a tool.

    Attributes:
        settings: flag name -> value of every file key (as training reads them).
        used: the settings this tool applies (became its flags' defaults, so a flag given still wins).
        ignored: the settings that do not apply to this tool (training-only flags).
        lines: what to print: the files, what they set, what this tool does not use.
    """

    settings: dict[str, Any] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE_OR_FOLDER`` (repeatable): training's config files, applied where a key fits the tool."""
    parser.add_argument("--config", action="append", default=[], metavar="PATH",
                        help="a config file or folder as train_qwen.py takes them (train, model, collator and PEFT "
                             "YAML/JSON files; repeat for several, later ones win). Every key is checked as training "
                             "checks it; the keys this tool uses become its flags' defaults (a flag given here "
                             "wins), the others are listed as not used; a train file's dataset_use is the inputs "
                             "when none are given")


def apply_config_files(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       applies: Sequence[str], renames: dict[str, str] | None = None) -> ToolConfig:
    """Read the ``--config`` items of ``argv`` and set the defaults of the tool's flags they give.

    Args:
        parser: the tool's parser (holding ``--config``).
        argv: the command line (None: ``sys.argv[1:]``).
        applies: the settings (training's flag names) that this tool takes.
        renames: training's name -> this tool's flag dest where they differ.

    Returns:
        ToolConfig: the settings and what to print.

    Raises:
        ConfigError: a bad config file (the file, the key and the flag to use), as training raises it.
    """
    tokens = list(sys.argv[1:] if argv is None else argv)
    items = []
    for position, token in enumerate(tokens):
        if token == "--config" and position + 1 < len(tokens):
            items.append(tokens[position + 1])
        elif token.startswith("--config="):
            items.append(token.split("=", 1)[1])
    config = ToolConfig()
    if not items:
        return config
    loaded = load_config_files(items, argument_names())
    config.settings = dict(loaded.settings)
    renames = renames or {}
    defaults = {}
    for name, value in loaded.settings.items():
        if name in applies:
            defaults[renames.get(name, name)] = value
            config.used.append(name)
        else:
            config.ignored.append(name)
    parser.set_defaults(**defaults)
    config.lines.append("config: " + ", ".join(path for path, _ in loaded.files))
    given = {token[2:].split("=", 1)[0] for token in tokens if token.startswith("--")}
    for name in config.used:
        dest = renames.get(name, name)
        over = "; the command line's value wins" if dest in given else ""
        config.lines.append(f"  --{dest} {loaded.settings[name]!r} (from {loaded.origins[name]}{over})")
    if config.ignored:
        config.lines.append(f"  not used by this tool: {', '.join(sorted(config.ignored))}")
    return config


def parse_tool_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, applies: Sequence[str],
                    required: Sequence[str] = (), renames: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse a tool's command line with its ``--config`` files: training's keys that ``applies`` names become
    the flags' defaults, a train file's ``dataset_use`` the inputs when none are given, and the row flags
    (``--dataset_columns`` / ``--message_format``) apply to the inputs. What the files set is printed.

    Args:
        parser: the tool's parser (with ``add_config_flag``; ``add_input_flags`` for inputs).
        argv: the command line (None: ``sys.argv[1:]``).
        applies: training's flag names this tool takes from config files.
        required: flags (dests) that must be given, on the command line or by a config file.
        renames: training's name -> this tool's dest where they differ.

    Returns:
        argparse.Namespace: the arguments (``args.config_settings``: everything the files set).

    Raises:
        SystemExit: ``parser.error`` with a config file's, a missing flag's or a row flag's message.
    """
    try:
        config = apply_config_files(parser, argv, applies, renames)
    except ValueError as exc:  # ConfigError
        parser.error(str(exc))
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (on the command line or in a "
                     f"--config file)")
    try:
        if hasattr(args, "inputs"):
            args.inputs = config_inputs(args.inputs, config)
        if all(hasattr(args, name) for name in ROW_FLAGS):
            apply_row_flags(args)
    except ValueError as exc:
        parser.error(str(exc))
    for line in config.lines:
        print(line, file=sys.stderr)
    args.config_settings = config.settings
    return args


def config_inputs(inputs: Sequence[str], config: ToolConfig) -> list[str]:
    """The tool's inputs: as given, else the config files' ``dataset_use`` (comma-separated entries).

    Raises:
        ValueError: no inputs given and no config file names a ``dataset_use``.
    """
    if inputs:
        return list(inputs)
    use = str(config.settings.get("dataset_use") or "")
    entries = [entry.strip() for entry in use.split(",") if entry.strip()]
    if not entries:
        raise ValueError("no INPUT given, and no --config train file sets dataset_use")
    return entries


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
    """The positional inputs, ``--data_path``, ``--dataset_registry`` (training's registry file flag), the row flags
    (``add_row_flags``) and ``--config`` (``add_config_flag``)."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="what --dataset_use takes: registry names (name or name%%N), annotation files (.json "
                             "list or .jsonl), Hugging Face datasets (save_to_disk folder, parquet or arrow files) "
                             "or cached hub dataset names, each optionally with %%N (none: a --config train "
                             "file's dataset_use)")
    parser.add_argument("--data_path", default="",
                        help="folder the media paths of inputs given by path (not registry names, which use their "
                             "own data_path) are relative to; default: paths as written")
    parser.add_argument("--dataset_registry", default="",
                        help="as in training: a registry file (YAML or JSON: name -> {annotation_path, data_path, "
                             "and optionally columns, split, system_prompt}) whose names the inputs may use")
    add_row_flags(parser)
    add_config_flag(parser)


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
