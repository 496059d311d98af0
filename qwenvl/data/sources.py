"""Where the samples of one ``--dataset_use`` entry come from, and how a row becomes a record.

An entry (after ``%N`` is split off by ``qwenvl.data.parse_sampling_rate``) is one of:

- a registry name (``qwenvl.data.data_dict``); its ``annotation_path`` may itself be any of
  the kinds below, and the entry may carry ``"columns"`` (a column mapping), ``"split"`` and
  ``"system_prompt"``;
- a ``.json`` (a list) or ``.jsonl`` annotation file (media paths relative to its folder);
- a local Hugging Face dataset: a ``save_to_disk`` folder, a folder of ``.parquet`` or
  ``.arrow`` files, or one such file;
- the name of a hub dataset already in the local Hugging Face cache (never downloaded).

Rows of every kind become the records of SPEC 4 (``image`` / ``images`` / ``video`` /
``conversations``) through ``make_record``; single-turn sets (``question`` / ``answer`` /
optional ``system``) become one human turn (with one ``<image>`` tag per image) and one answer.

Example:
    >>> source = resolve_source("demo/single_image.json")
    >>> source.kind, source.name, source.data_path.endswith("demo")
    ('json', 'demo/single_image.json', True)
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qwenvl.data import data_dict, looks_like_hub_name, parse_sampling_rate
from qwenvl.data.vision import image_format

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
# Keys a column mapping may name: record keys, and the parts of a single-turn sample.
MEDIA_KEYS = ("image", "images", "video", "videos")
MAPPING_KEYS = MEDIA_KEYS + ("conversations", "question", "answer", "system", "context")
SOURCE_KINDS = ("json", "jsonl", "hf_disk", "parquet", "arrow", "hub")
_SPLIT_RE = re.compile(r"(?:^|[/_-])(train|test|validation|valid|dev|eval)(?:[-_.]|/|$)")
class SourceError(ValueError):
    """A dataset source that cannot be read as asked; the message names the source and what exists."""


@dataclass
class Source:
    """One ``--dataset_use`` entry, resolved to files.

    Attributes:
        name: the registry name, or the entry as typed (a path or a hub name); ``%N``
            subsets are seeded with it, so every rank keeps the same samples.
        kind: one of ``SOURCE_KINDS``.
        location: the annotation file, the dataset folder or file, or the hub name.
        files: the files whose bytes define the records (fingerprinted by the annotation cache).
        data_path: folder that relative media paths are joined to ("" = as written).
        sampling_rate: from ``%N`` (1.0 without).
        columns: record key -> column, as given (``{}``: columns named like the keys are used).
        split: the split of a dataset with several (``None``: ``train``, or the only one).
        system_prompt: a fixed system turn put first in every sample that has none.
        template: a message template (``--message_format``) that renders each row's conversation
            (``render_template``), or None.
    """

    name: str
    kind: str
    location: str
    files: tuple[str, ...]
    data_path: str
    sampling_rate: float = 1.0
    columns: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    system_prompt: str | None = None
    template: dict[str, Any] | None = None

    @property
    def mapped(self) -> bool:
        """Whether rows need ``make_record`` (HF rows always; JSON records only with a mapping, prompt or template)."""
        return (self.kind not in ("json", "jsonl") or bool(self.columns) or self.system_prompt is not None
                or self.template is not None)

    def describe(self) -> str:
        """``name (location)`` for messages, or just the location when they are the same."""
        return self.location if self.name == self.location else f"{self.name} ({self.location})"


# ------------------------------------------------------------------ row format
# (column mapping, message template) of this run: --dataset_columns / --message_format, set by
# parse_args (qwenvl/train/argument.py) through set_row_format and applied by resolve_source.
_ROW_FORMAT: tuple[dict[str, str], dict[str, Any] | None] = ({}, None)


def set_row_format(columns: dict[str, str] | None = None, template: dict[str, Any] | None = None) -> None:
    """Set the run's row format: a column mapping for every source without its own, and a message template.

    Identity mappings (``image -> image``) are dropped: the column is read under its own name anyway.

    Args:
        columns: record key (``MAPPING_KEYS``) -> column; None or ``{}`` = none.
        template: ``{"system_prompt", "messages"}`` (``config_files.check_message_format``), or None.

    Raises:
        SourceError: a mapping key that is not a record key, or a column that is not a name.
    """
    global _ROW_FORMAT
    columns = {k: v for k, v in (columns or {}).items() if k != v}
    check_mapping_keys(columns, "--dataset_columns")
    _ROW_FORMAT = (columns, template)


# ------------------------------------------------------------------ resolution
def resolve_sources(dataset_use: str | list[str], registry: dict[str, dict] | None = None,
                    flag: str = "--dataset_use") -> list[Source]:
    """All entries of ``--dataset_use`` (comma-separated or a list), each with its ``%N``.

    ``flag`` names where the entries came from in the messages (``--eval_dataset_use``, a tool's inputs).

    Raises:
        SourceError: an entry names nothing that exists, or the same source twice.

    Example:
        >>> [s.sampling_rate for s in resolve_sources("demo_single_image%50,demo/text_only.jsonl")]
        [0.5, 1.0]
    """
    specs = dataset_use.split(",") if isinstance(dataset_use, str) else list(dataset_use)
    sources: list[Source] = []
    named: dict[str, str] = {}  # entry -> the spec that named it first
    located: dict[str, str] = {}  # what the source reads -> the spec that named it first
    for spec in specs:
        if not spec.strip():
            continue
        try:
            name, rate = parse_sampling_rate(spec)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        if name in named:  # the wording of qwenvl.data.data_list
            raise SourceError(f"dataset {name!r} is named twice in {flag} ({named[name]!r} and "
                              f"{spec.strip()!r}): each of its samples would be trained twice; name it once "
                              f"(use {name}%N to keep N percent)")
        named[name] = spec.strip()
        source = resolve_source(name, rate, registry, flag)
        key = source.location if source.kind == "hub" else os.path.abspath(source.location)
        key = f"{key}|{source.split}|{sorted(source.columns.items())}|{source.system_prompt}"
        if key in located:
            raise SourceError(f"{flag} reads {source.location} twice ({located[key]!r} and {spec.strip()!r}): "
                              f"each of its samples would be trained twice; name it once (use NAME%N to keep N "
                              f"percent)")
        located[key] = spec.strip()
        sources.append(source)
    if not sources:
        raise SourceError(f"{flag} names no dataset")
    return sources


def resolve_source(entry: str, sampling_rate: float = 1.0, registry: dict[str, dict] | None = None,
                   flag: str = "--dataset_use") -> Source:
    """``find_source``, then the run's row format (``set_row_format``): its column mapping for a source
    without one of its own, its message template for every source."""
    source = find_source(entry, sampling_rate, registry, flag)
    columns, template = _ROW_FORMAT
    if columns and not source.columns:
        source.columns = dict(columns)
    if template is not None:
        source.template = template
    return source


def find_source(entry: str, sampling_rate: float = 1.0, registry: dict[str, dict] | None = None,
                flag: str = "--dataset_use") -> Source:
    """One entry (without ``%N``) -> a ``Source``.

    Args:
        entry: a registry name, a file or folder path, or a cached hub dataset name.
        sampling_rate: the ``%N`` of the entry, as a fraction.
        registry: name -> entry dict; ``qwenvl.data.data_dict`` by default.
        flag: where the entry came from, for the message of an unknown one.

    Returns:
        the source; nothing is read beyond file names and, for folders, their metadata files.

    Raises:
        SourceError: the entry is none of the kinds (the message lists the registered names and
            where the hub cache was searched), a folder is not a dataset, a file has an unknown
            extension, or a split does not exist (the message lists the splits).
    """
    registry = data_dict if registry is None else registry
    if entry in registry:
        config = registry[entry]
        location = str(config.get("annotation_path") or "")
        if not location:
            raise SourceError(f"dataset {entry!r}: the registry entry has no annotation_path")
        columns = dict(config.get("columns") or {})
        check_mapping_keys(columns, entry)
        split = config.get("split")
        if not os.path.exists(location) and looks_like_hub_name(location):
            return _hub_source(entry, location, sampling_rate, columns, split, config.get("system_prompt"),
                               str(config.get("data_path") or ""))
        kind, files, split = locate(location, entry, split)
        return Source(entry, kind, location, files, str(config.get("data_path") or ""), sampling_rate, columns, split,
                      config.get("system_prompt"))
    if os.path.exists(entry):
        kind, files, split = locate(entry, entry, None)
        folder = entry if os.path.isdir(entry) else os.path.dirname(os.path.abspath(entry))
        return Source(entry, kind, entry, files, folder, sampling_rate, split=split)
    if looks_like_hub_name(entry) and hub_cache_dirs(entry):
        return _hub_source(entry, entry, sampling_rate, {}, None, None, "")
    raise SourceError(
        f"unknown dataset {entry!r} in {flag}; registered datasets: {', '.join(sorted(registry))}; nor is it "
        f"an existing file or folder, or a Hugging Face dataset in the local cache ({_datasets_cache_root()})"
    )


def check_mapping_keys(columns: dict[str, str], label: str) -> None:
    """Refuse a mapping key that no record key or single-turn part is called.

    Raises:
        SourceError: e.g. ``dataset 'x': unknown key 'img' in "columns"; expected some of image, images, ...``.
    """
    unknown = [key for key in columns if key not in MAPPING_KEYS]
    if unknown:
        raise SourceError(f"dataset {label!r}: unknown key {unknown[0]!r} in \"columns\"; expected some of "
                          f"{', '.join(MAPPING_KEYS)} (record key -> your column name)")
    bad = [key for key, value in columns.items() if not isinstance(value, str) or not value]
    if bad:
        raise SourceError(f"dataset {label!r}: \"columns\" maps {bad[0]!r} to {columns[bad[0]]!r}, expected a "
                          f"column name")


def locate(path: str, label: str, split: str | None) -> tuple[str, tuple[str, ...], str | None]:
    """The kind of a local source, the files that hold it, and the split used.

    Returns:
        (kind, files, split); ``files`` of a ``save_to_disk`` folder are all its files (the
        cache key covers them), of a parquet/arrow folder the data files of the split.

    Raises:
        SourceError: a missing path, a file with an unknown extension, a folder that is not a
            dataset (the message lists what it holds), or a split that does not exist.
    """
    if not os.path.exists(path):
        raise SourceError(f"dataset {label!r}: {path} does not exist")
    if os.path.isfile(path):
        kind = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(
            os.path.splitext(path)[1].lower())
        if kind is None:
            raise SourceError(f"dataset {label!r}: {path} is not a .json, .jsonl, .parquet or .arrow file")
        return kind, (path,), split
    names = sorted(os.listdir(path))
    if "dataset_dict.json" in names:  # DatasetDict.save_to_disk: one sub-folder per split
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as handle:
            splits = list(json.load(handle).get("splits", []))
        split = _pick_split(split, splits, label, path)
        return "hf_disk", _all_files(os.path.join(path, split)), split
    if "state.json" in names and "dataset_info.json" in names:  # Dataset.save_to_disk
        if split is not None:
            raise SourceError(f"dataset {label!r}: {path} holds a single split; remove \"split\": {split!r}")
        return "hf_disk", _all_files(path), None
    for ext, kind in ((".parquet", "parquet"), (".arrow", "arrow")):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f.endswith(ext))
        if files:
            chosen, split = _split_files(files, path, split, label)
            return kind, tuple(chosen), split
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "") or "nothing"
    raise SourceError(
        f"dataset {label!r}: folder {path} is not a dataset: no state.json or dataset_dict.json (a save_to_disk "
        f"folder) and no .parquet or .arrow files; it holds: {shown}"
    )


def _all_files(folder: str) -> tuple[str, ...]:
    return tuple(sorted(os.path.join(root, f) for root, _, fs in os.walk(folder) for f in fs))


def _pick_split(split: str | None, splits: list[str], label: str, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise SourceError(f"dataset {label!r}: split {split!r} not in {where}; splits: {', '.join(splits)}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise SourceError(f"dataset {label!r}: {where} has splits {', '.join(splits)}; name one with \"split\"")


def _split_files(files: list[str], root: str, split: str | None, label: str) -> tuple[list[str], str | None]:
    """Files of one split in a hub-style folder (``data/train-00000-of-00002.parquet``, ``train/x.parquet``).

    Without a split, a folder whose files name at most one split is read whole; with several
    splits, ``train`` is read (or an error lists them).
    """
    by_split: dict[str, list[str]] = {}
    for file in files:
        match = _SPLIT_RE.search(os.path.relpath(file, root))
        by_split.setdefault(match.group(1) if match else "", []).append(file)
    named = sorted(s for s in by_split if s)
    if split is None and len(named) <= 1:
        return files, named[0] if named else None
    split = _pick_split(split, named, label, root)
    return by_split[split], split


# ------------------------------------------------------------------ hub cache
def _datasets_cache_root() -> str:
    import datasets

    return os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))


def hub_cache_dirs(name: str) -> list[str]:
    """Prepared copies of hub dataset ``name`` in the local ``datasets`` cache (``owner___name/config/version/hash``).

    Example:
        >>> hub_cache_dirs("nobody/nothing")
        []
    """
    import glob

    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(_datasets_cache_root(), "___".join(parts))
    return sorted(p for p in glob.glob(os.path.join(root, "*", "*", "*")) if os.path.isdir(p))


def _hub_source(label: str, name: str, rate: float, columns: dict, split: str | None, system_prompt: str | None,
                data_path: str) -> Source:
    found = hub_cache_dirs(name)
    if not found:
        raise SourceError(f"dataset {label!r}: hub dataset {name!r} is not in the local Hugging Face cache "
                          f"({_datasets_cache_root()}); download it once on a machine with access (datasets."
                          f"load_dataset) or save_to_disk it and give the folder")
    files = tuple(f for folder in found for f in _all_files(folder))
    return Source(label, "hub", name, files, data_path, rate, columns, split, system_prompt)


def load_hub_dataset(source: Source) -> Any:
    """The cached hub dataset of ``source`` (a ``datasets.Dataset``), read without any network access.

    Raises:
        SourceError: offline mode is off (``HF_HUB_OFFLINE=1`` is required, so nothing is ever
            downloaded), or the cache does not hold the split (the message lists the splits).
    """
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        raise SourceError(f"dataset {source.name!r}: hub datasets are read from the local cache only; set "
                          f"HF_HUB_OFFLINE=1 (nothing is downloaded during training)")
    loaded = datasets.load_dataset(source.location)
    split = _pick_split(source.split, list(loaded), source.name, f"the cached hub dataset {source.location}")
    source.split = split
    return loaded[split]


# ------------------------------------------------------------------ reading rows
def source_columns(source: Source) -> list[str]:
    """Column names of a Hugging Face source (reads only schemas).

    Raises:
        SourceError: a file that is not readable as parquet/arrow, or files with different columns.
    """
    if source.kind in ("json", "jsonl"):
        raise SourceError(f"{source.describe()}: JSON records have keys, not columns")
    if source.kind in ("hf_disk", "hub"):
        return list(_hf_dataset(source).column_names)
    columns: list[str] | None = None
    for file in source.files:
        names = _file_schema(file, source).names
        if columns is not None and names != columns:
            raise SourceError(f"dataset {source.name!r}: {file} has columns {', '.join(names)} but "
                              f"{source.files[0]} has {', '.join(columns)}; the files of one dataset must match")
        columns = names
    return columns or []


def _file_schema(file: str, source: Source) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if source.kind == "parquet":
            return pq.read_schema(file)
        with pa.memory_map(file) as handle:
            return _open_ipc(handle).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"dataset {source.name!r}: {file} is not a readable {source.kind} file: {exc}") from None


def _open_ipc(handle: Any) -> Any:
    """An Arrow IPC reader over ``handle``: the stream format (what ``datasets`` writes), else the file format."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(handle)
    except pa.ArrowInvalid:
        handle.seek(0)
        return pa.ipc.open_file(handle)


def _hf_dataset(source: Source) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder (the split's sub-folder of a DatasetDict) or hub name."""
    if source.kind == "hub":
        return load_hub_dataset(source)
    import datasets

    folder = os.path.join(source.location, source.split) if source.split else source.location
    return datasets.load_from_disk(folder)


def iter_batches(source: Source, batch_size: int = 1000) -> Iterator[list[dict[str, Any]]]:
    """Rows of a Hugging Face source, ``batch_size`` at a time, as plain dicts in dataset order.

    Images come as stored (``{"bytes", "path"}`` dicts for a ``datasets`` Image column): no
    pixel is decoded.

    Raises:
        SourceError: a file that is not readable as parquet/arrow.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source.kind in ("hf_disk", "hub"):
        dataset = _hf_dataset(source).with_format("arrow")
        for table in dataset.iter(batch_size=batch_size):
            yield table.to_pylist()
        return
    for file in source.files:
        try:
            if source.kind == "parquet":
                for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
                    yield batch.to_pylist()
            else:
                with pa.memory_map(file) as handle:
                    for batch in _open_ipc(handle):
                        for start in range(0, batch.num_rows, batch_size):
                            yield batch.slice(start, batch_size).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"dataset {source.name!r}: {file} is not a readable {source.kind} file: {exc}") from None


# ------------------------------------------------------------------ mapping
@dataclass(frozen=True)
class RowMapping:
    """Which column feeds each record key; built once per source by ``resolve_mapping``."""

    media: tuple[tuple[str, str], ...]  # (record key, column)
    conversations: str | None
    question: str | None
    answer: str | None
    system: str | None
    system_prompt: str | None
    context: str | None = None
    template: dict[str, Any] | None = None


def resolve_mapping(source: Source, columns: list[str]) -> RowMapping:
    """Match the source's mapping against the columns that exist.

    A record key not in the mapping is read from the column of the same name when there
    is one (``messages`` stands in for ``conversations``).

    Raises:
        SourceError: the mapping names a missing column, or there is neither a conversations
            column nor question and answer columns; the message lists the columns.

    Example:
        >>> resolve_mapping(Source("d", "parquet", "d.parquet", (), ""), ["image", "question", "answer"]).question
        'question'
    """
    check_mapping_keys(source.columns, source.name)
    listed = ", ".join(columns) or "none"
    for key, column in source.columns.items():
        if column not in columns:
            raise SourceError(f"dataset {source.name!r}: the column mapping maps {key!r} to column {column!r}, which "
                              f"{source.location} does not have; its columns: {listed}")

    def pick(key: str, *defaults: str) -> str | None:
        if key in source.columns:
            return source.columns[key]
        return next((name for name in (key, *defaults) if name in columns), None)

    if source.template is not None:
        return template_mapping(source, columns, pick)
    single_turn = "question" in source.columns or "answer" in source.columns
    conversations = None if single_turn else pick("conversations", "messages")
    question, answer = pick("question"), pick("answer")
    if conversations is None and (question is None or answer is None):
        raise SourceError(
            f"dataset {source.name!r}: {source.location} has no conversations column and no question and answer "
            f"columns; its columns: {listed}. Map yours in the registry entry, e.g. \"columns\": "
            f"{{\"conversations\": \"...\"}} or {{\"question\": \"...\", \"answer\": \"...\", \"image\": \"...\"}}"
        )
    media = tuple((key, column) for key in MEDIA_KEYS if (column := pick(key)) is not None)
    system = pick("system") if conversations is None else source.columns.get("system")
    return RowMapping(media, conversations, None if conversations else question, None if conversations else answer,
                      system, source.system_prompt, None if conversations else pick("context"))


# message_format placeholder -> RowMapping field holding its column
PLACEHOLDER_FIELDS = {"question_column": "question", "answer_column": "answer", "context_column": "context",
                      "image_column": "image", "video_column": "video"}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
ROLE_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def template_mapping(source: Source, columns: list[str], pick: Any) -> RowMapping:
    """The mapping of a source rendered through a message template: every placeholder needs a column.

    Raises:
        SourceError: a placeholder whose column the source lacks (named, with the columns that exist).
    """
    found = {"question": pick("question"), "answer": pick("answer"), "context": pick("context"),
             "image": pick("image"), "video": pick("video")}
    for message in source.template["messages"]:
        for part in message["content"]:
            for name in _PLACEHOLDER.findall(part.get("text") or ""):
                if name in PLACEHOLDER_FIELDS and found[PLACEHOLDER_FIELDS[name]] is None:
                    raise SourceError(
                        f"dataset {source.name!r}: message_format uses {{{name}}} but {source.location} has no "
                        f"{PLACEHOLDER_FIELDS[name]!r} column; its columns: {', '.join(columns) or 'none'}. Map it "
                        f"with dataset_columns ({name}: your column)")
    media = tuple((key, column) for key in MEDIA_KEYS if (column := pick(key)) is not None)
    return RowMapping(media, None, found["question"], found["answer"], None, None, found["context"],
                      source.template)


# make_record's note (popped by the annotation store, which counts it) of a row whose images gave way to its video.
IMAGES_LEFT_OUT = "$images_left_out"


def media_slot(template: dict[str, Any]) -> str | None:
    """``image`` or ``video`` when every media part of the template is of that one kind, else None.

    Such a template has one media slot: it holds the row's videos when it has any, else its images
    (data_processing with both modalities on: video takes precedence).

    Example:
        >>> media_slot({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]})
        'image'
    """
    kinds = {part["type"] for message in template.get("messages", []) for part in message["content"]
             if part["type"] in ("image", "video")}
    return kinds.pop() if len(kinds) == 1 else None


def render_template(row: dict[str, Any], mapping: RowMapping, images: int, videos: int) -> list[dict[str, str]]:
    """One row's conversation from the message template: placeholders filled, image/video parts as tags.

    Parts of a turn are joined as written (as the chat template renders content parts). An image
    part stands for all the row's images (one ``<image>`` each); so does a video part. A template
    with media parts of one kind only (``media_slot``) takes the row's media of either kind there.

    Args:
        row: the row.
        mapping: from ``template_mapping`` (holds the template).
        images, videos: media items the row has.

    Returns:
        the turns, ``[{"from": "human"|"gpt"|"system", "value": ...}, ...]``.

    Raises:
        RowError: a placeholder's column holds no text, or the row's media do not fit the template's parts.

    Example:
        >>> template = {"system_prompt": "Be brief.", "messages": [
        ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question_column}"}]},
        ...     {"role": "assistant", "content": [{"type": "text", "text": "{answer_column}"}]}]}
        >>> m = RowMapping((("image", "img"),), None, "q", "a", None, None, None, template)
        >>> render_template({"img": "a.jpg", "q": "What?", "a": "A cat."}, m, 1, 0)[0]["value"]
        '<image>What?'
    """
    template = mapping.template or {}

    def value(name: str) -> str:
        if name == "system_prompt":
            return template.get("system_prompt") or ""
        column = getattr(mapping, PLACEHOLDER_FIELDS[name])
        found = row.get(column)
        if name == "context_column" and found is None:
            return ""
        if not isinstance(found, str):
            raise RowError(f"message_format {{{name}}}: column {column!r} holds {found!r}, expected text")
        return found

    slot = media_slot(template)
    image_parts = video_parts = 0
    turns = []
    for message in template.get("messages", []):
        text = ""
        for part in message["content"]:
            if slot is not None and part["type"] == slot:  # one slot: the row's videos, else its images
                image_parts += 1
                video_parts += 1
                text += VIDEO_TAG * videos + IMAGE_TAG * images
            elif part["type"] == "image":
                image_parts += 1
                text += IMAGE_TAG * images
            elif part["type"] == "video":
                video_parts += 1
                text += VIDEO_TAG * videos
            else:
                text += _PLACEHOLDER.sub(lambda match: value(match.group(1)), part["text"])
        turns.append({"from": ROLE_NAMES[message["role"]], "value": text})
    if slot is not None and not (images or videos):
        raise RowError(f"message_format has a {{type: {slot}}} part but the row has no image or video", "tag_mismatch")
    for what, parts, count in (() if slot is not None else
                               (("image", image_parts, images), ("video", video_parts, videos))):
        if count and not parts:
            raise RowError(f"the row has {count} {what}(s) but message_format has no {{type: {what}}} part",
                           "tag_mismatch")
        if parts and not count:
            raise RowError(f"message_format has a {{type: {what}}} part but the row has no {what}", "tag_mismatch")
    return turns


class RowError(ValueError):
    """A row that cannot become a record (stored as that sample's problem, reported when it is loaded)."""

    def __init__(self, reason: str, kind: str = "no_conversation"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


def make_record(row: dict[str, Any], mapping: RowMapping) -> dict[str, Any]:
    """One row -> a record of SPEC 4 (``image``/``images``/``video``/``videos``, ``conversations``).

    Media values are normalised by ``normalise_media``: inline bytes stay ``bytes`` (the
    annotation store keeps them in a binary column and hands out a data URI).

    Raises:
        RowError: a missing question or answer, or a video given as bytes only.

    Example:
        >>> m = RowMapping((("image", "img"),), None, "q", "a", None, None)
        >>> make_record({"img": "a.jpg", "q": "What?", "a": "A cat."}, m)["conversations"][0]
        {'from': 'human', 'value': '<image>\\nWhat?'}
    """
    record: dict[str, Any] = {}
    images = videos = 0
    for key, column in mapping.media:
        value = row.get(column)
        if value is None or (isinstance(value, list) and not value):
            continue
        what = "video" if key.startswith("video") else "image"
        if isinstance(value, list):
            record[key] = [normalise_media(v, what) for v in value]
        else:
            record[key] = normalise_media(value, what)
        count = len(value) if isinstance(value, list) else 1
        if what == "image":
            images += count
        else:
            videos += count
    if mapping.template is not None:
        left_out = 0
        if images and videos and media_slot(mapping.template) is not None:
            # One media part and a row with both: video takes precedence (data_processing with both modalities
            # on; one turned off refuses the datasets holding it before training). Counted by the store.
            left_out, images = images, 0
            record = {key: value for key, value in record.items() if key.startswith("video")}
        record["conversations"] = render_template(row, mapping, images, videos)
        if left_out:
            record[IMAGES_LEFT_OUT] = left_out
        return record
    system = row.get(mapping.system) if mapping.system else None
    system = system if isinstance(system, str) and system else mapping.system_prompt
    if mapping.conversations is not None:
        raw = row.get(mapping.conversations)
        turns = [_clean_turn(turn) for turn in raw] if isinstance(raw, list) else raw
        if system is not None and isinstance(turns, list) and not _starts_with_system(turns):
            turns = [{"from": "system", "value": system}, *turns]
        if turns is not None:
            record["conversations"] = turns
        return record
    question, answer = row.get(mapping.question), row.get(mapping.answer)
    for part, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise RowError(f"no {part}: column {getattr(mapping, part)!r} holds {value!r}")
    context = row.get(mapping.context) if mapping.context else None
    if isinstance(context, str) and context:
        question = f"{context}\n{question}"
    tags = ""
    if IMAGE_TAG not in question:
        tags += f"{IMAGE_TAG}\n" * images
    if VIDEO_TAG not in question:
        tags += f"{VIDEO_TAG}\n" * videos
    turns = [{"from": "human", "value": tags + question}, {"from": "gpt", "value": answer}]
    if system is not None:
        turns.insert(0, {"from": "system", "value": system})
    record["conversations"] = turns
    return record


def _starts_with_system(turns: list) -> bool:
    first = turns[0] if turns else None
    return isinstance(first, dict) and str(first.get("from", first.get("role", ""))).lower() == "system"


def _clean_turn(turn: Any) -> Any:
    """Drop the ``None`` fields Arrow adds to turns (struct columns unify keys), flatten list contents."""
    if not isinstance(turn, dict):
        return turn
    turn = {k: v for k, v in turn.items() if v is not None}
    for key in ("content", "value"):
        if isinstance(turn.get(key), list):  # chat-template style: [{"type": "image"}, {"type": "text", ...}]
            turn[key] = "".join(_content_part(part) for part in turn[key])
    return turn


def _content_part(part: Any) -> str:
    if isinstance(part, dict):
        kind = part.get("type")
        if kind == "image":
            return IMAGE_TAG
        if kind == "video":
            return VIDEO_TAG
        if kind == "text" and isinstance(part.get("text"), str):
            return part["text"]
    return str(part)


def normalise_media(value: Any, what: str = "image") -> str | bytes:
    """A media value as stored in a dataset -> a path or base64 string, or the image's bytes.

    Accepts a path or base64 string (kept), ``bytes``, a ``datasets`` Image/Video value
    (``{"bytes", "path"}``: the bytes when present, else the path) and a PIL image (encoded
    as PNG, or in its own format when it has one).

    Raises:
        RowError: a video given only as bytes (videos are read from files), or a value of
            another type.

    Example:
        >>> normalise_media({"bytes": None, "path": "img/a.jpg"})
        'img/a.jpg'
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        raw, path = value.get("bytes"), value.get("path")
        if raw is not None and not (what == "video" and path):
            value = raw
        elif isinstance(path, str) and path:
            return path
        else:
            raise RowError(f"{what} value has neither bytes nor a path", "bad_media_ref")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if what == "video":
            raise RowError("video given as bytes; videos are read from files: store paths", "bad_media_ref")
        return bytes(value)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format=getattr(value, "format", None) or "PNG")
        return buffer.getvalue()
    raise RowError(f"{what} value is a {type(value).__name__}; expected a path, bytes or an Image value",
                   "bad_media_ref")


def data_uri(raw: bytes) -> str:
    """Inline image bytes as the ``data:image/...;base64,`` URI that ``vision.open_image`` reads.

    Example:
        >>> data_uri(b"\\x89PNG....")[:22]
        'data:image/png;base64,'
    """
    subtype = (image_format(raw) or "octet-stream").lower()
    return f"data:image/{subtype};base64,{base64.b64encode(raw).decode('ascii')}"
