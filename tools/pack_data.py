"""Pack a dataset offline: count every sample's exact tokens, bin-pack them into groups of ``--pack_length``.

Usage:
    python tools/pack_data.py demo_single_image demo_multi_image%50 --model_name_or_path tiny_model/qwen2_5_vl
    python tools/pack_data.py /data/train.jsonl --data_path /data/media \\
        --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \\
        --pack_length 8192 --model_max_length 8192 --max_pixels 576*28*28 --workers 16

Inputs and outputs:
    Each input is what training's ``--dataset_use`` takes, resolved the same way
    (``qwenvl/data/sources.py``) and read from the same annotation store: a registry name from
    ``qwenvl/data/__init__.py`` or from ``--dataset_registry FILE`` (its column mapping, split and
    system prompt apply), an annotation file (.json list or .jsonl), a Hugging Face dataset
    (``save_to_disk`` folder, parquet or arrow files) or a hub dataset in the local cache; each
    optionally ``name%N``: the same seeded N percent that ``--dataset_use name%N --seed S`` trains on.
    Media paths of inputs given by path are relative to ``--data_path``. By default each input is
    packed on its own, next to its annotation file or dataset (or in ``--output_dir``; a hub
    dataset's in the working folder): ``train.json`` -> ``train_pack.json`` (``train_50pct_pack.json``
    for ``%50``). The packed file holds the records as training reads them (a Hugging Face row
    mapped to a record, inline image bytes as ``data:`` URIs). ``--output FILE`` packs all inputs
    together into FILE instead (their media must share one data_path). Counts are cached per input
    in ``train_count.json`` (next to it, in ``--output_dir``, or in ``--cache_dir``), keyed by the
    annotation's content (a Hugging Face dataset or column-mapped file: by its annotation store,
    whose name holds a hash of the files and the mapping), data_path, the tokenizer (sha256 of its
    full serialisation and the chat special ids), pixel/frame flags, model_max_length and the source
    of the counting code: any change recounts, nothing stale is reused. Media files edited in place
    are not detected; pass ``--recount`` then.

Train on the result: ``--registry_file my_registry.yaml`` (or ``.json``) adds or updates its entry
there, named ``<registry name>_pack`` for an input named from the registry (``%50``:
``<name>_50pct_pack``), else after the output file, e.g. for ``demo_single_image``
    demo_single_image_pack: {annotation_path: /abs/demo/single_image_pack.json, data_path: /abs/demo}
then train with ``--dataset_registry my_registry.yaml --data_packing True --dataset_use
demo_single_image_pack``. Without ``--registry_file`` the tool prints that entry and the flags. When
the packed file lies in its media folder (the annotation file sits in its data_path, or the
inputs have no media), ``--data_packing True --dataset_use /abs/path/x_pack.json`` works too, with
no entry: a file given by path has its media relative to its own folder; the tool says which
applies.

Counts are exact: ``count == len(LazySupervisedDataset(...)[i]["input_ids"])`` for the same flags
(see ``qwenvl/data/token_count.py``); image sizes come from file headers, videos from container
metadata, nothing is decoded. Samples the dataset would reject (missing media, tag mismatches, a
``model_max_length`` cut through an image, a video whose header promises frames the file does not
hold) are left out and listed; so is a sample whose counting raised an unexpected error
(``unexpected_error``, with the exception), and counting goes on. Pass the ``--model_max_length``
you train with; samples longer than ``--pack_length`` get a group of their own (``--oversize keep``)
or are left out (``--oversize drop``), and are always reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/pack_data.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.data import data_dict  # noqa: E402
from qwenvl.data.packing import (  # noqa: E402,F401 - first_fit_decreasing: also imported from here (bench)
    NOT_CACHED,
    StoreJobs,
    count_jobs,
    first_fit_decreasing,
    is_packed_file,
)
from qwenvl.data.token_count import TokenCount, TokenCounter  # noqa: E402
from qwenvl.models import family_for  # noqa: E402
from qwenvl.models.base import read_json  # noqa: E402
from tools.common import (  # noqa: E402
    MEDIA_FLAGS,
    ROW_FLAGS,
    ToolInput,
    add_input_flags,
    add_media_flags,
    add_policy_flag,
    load_checkpoint,
    load_dataset_registry,
    media_data_args,
    parse_tool_args,
    write_json_atomic,
)
from tools.common import resolve_inputs as common_resolve_inputs  # noqa: E402

CACHE_FORMAT = "qwenvl-token-counts"
# Training's settings this tool takes from --config files (a train file's dataset_use: the inputs).
CONFIG_KEYS = ("dataset_use", "dataset_registry", "model_name_or_path", "model_max_length", "pack_length", "seed",
               "bad_sample_policy", *MEDIA_FLAGS, *ROW_FLAGS)


# ------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every flag)."""
    parser = argparse.ArgumentParser(
        prog="tools/pack_data.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Inputs and outputs:"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_flags(parser)
    parser.add_argument("--model_name_or_path", default=None,
                        help="checkpoint or processor folder: its tokenizer and image processor (patch/merge sizes); "
                             "required, here or in a --config file")
    parser.add_argument("--pack_length", type=int, default=4096, help="tokens per group (default 4096)")
    parser.add_argument("--model_max_length", type=int, default=None,
                        help="training's --model_max_length: longer samples are cut on text or rejected exactly as "
                             "the dataset does (default: --pack_length)")
    parser.add_argument("--oversize", choices=("keep", "drop"), default="keep",
                        help="samples longer than --pack_length: keep each in a group of its own (default) or "
                             "drop them; either way they are reported")
    parser.add_argument("--output", default=None,
                        help="write ONE packed file holding all inputs (default: one *_pack.json per input, next "
                             "to its annotation file)")
    parser.add_argument("--output_dir", default=None,
                        help="folder for the *_pack.json outputs (and the count caches unless --cache_dir is "
                             "given); default: next to each annotation file")
    parser.add_argument("--registry_file", default=None,
                        help="a dataset registry file (.yaml/.yml or .json) to add or update each packed output's "
                             "entry in; train with --dataset_registry FILE. Default: print the entry")
    parser.add_argument("--cache_dir", default=None,
                        help="where the *_count.json caches go (default: --output_dir, else next to each "
                             "annotation file)")
    parser.add_argument("--recount", action="store_true", help="ignore cached counts (they are still rewritten)")
    parser.add_argument("--workers", type=int, default=1, help="counting processes (default 1)")
    parser.add_argument("--seed", type=int, default=42,
                        help="training's --seed: picks the name%%N subsets (default 42)")
    parser.add_argument("--show_problems", type=int, default=20,
                        help="list at most this many left-out samples per output (default 20; all are counted)")
    add_policy_flag(parser, "leaves bad samples out of the packs and lists them")
    add_media_flags(parser)
    return parser


# ------------------------------------------------------------------------- inputs
@dataclass
class PackedSource(ToolInput):
    """One input and which of its samples are packed."""

    @property
    def has_media(self) -> bool:
        """Whether any selected sample references an image or a video (from the store's per-row counts)."""
        media = self.store.column("num_images")[self.indices] + self.store.column("num_videos")[self.indices]
        return bool(media.any())

    def default_output(self, output_dir: str | None = None) -> Path:
        """``<stem>_pack.json`` (or ``<stem>_{N}pct_pack.json``) in ``output_dir``, else next to the annotation file."""
        return self.output_folder(output_dir) / f"{self.output_stem()}_pack.json"


def check_not_packed(source: PackedSource) -> None:
    """Refuse a file from this tool as input: its records are groups, not samples.

    Raises:
        ValueError: ``{path} holds groups of samples: it is already packed``.
    """
    store = source.store
    if source.source.kind == "json" and is_packed_file(source.annotation_path):
        if all(isinstance(store[i], list) for i in range(len(store))):
            raise ValueError(f"{source.annotation_path} holds groups of samples: it is already packed")


def resolve_inputs(inputs: Sequence[str], data_path: str, seed: int) -> list[PackedSource]:
    """Inputs as ``--dataset_use`` takes them -> sources with their stores and selected rows.

    Args:
        inputs: e.g. ``["demo_single_image%50", "/data/extra.jsonl", "/data/hf_folder%10"]``.
        data_path: media folder for inputs given by path.
        seed: picks ``%N`` subsets exactly as training's ``--seed`` does.

    Returns:
        one source per input, its store open (a JSONL line that does not parse is a sample the
        counter rejects, not an error).

    Raises:
        ValueError: what ``resolve_sources`` refuses (an unknown name, listing the registered ones; a bad
            ``%N``; an input given twice), an annotation file or dataset that cannot be read, or a file
            this tool wrote (already packed).
    """
    sources = [PackedSource(i.label, i.source) for i in common_resolve_inputs(inputs, data_path)]
    for source in sources:
        try:
            source.open(seed)
        except OSError as exc:
            raise ValueError(f"{source.annotation_path}: {exc}") from None
        check_not_packed(source)
    return sources


# -------------------------------------------------------------------------- cache
def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path_for(source: PackedSource, cache_dir: str | None) -> Path:
    """``<stem>_count.json`` (stem without ``%N``) in ``cache_dir``, else next to the annotation file or dataset
    (a hub dataset's next to its annotation store)."""
    name = f"{source.output_stem(with_rate=False)}_count.json"
    if cache_dir:
        return Path(cache_dir) / name
    if source.source.kind == "hub":
        return Path(source.store.path).parent / name
    return source.output_folder(None) / name


def cache_key(settings: dict, source: PackedSource) -> str:
    """sha256 over the counter settings, what the records are and the media folder.

    What the records are: an annotation file read as written is keyed on its content; a Hugging Face
    dataset or a column-mapped file on its annotation store's name, which holds a hash of the source's
    files, the mapping, split and system prompt.
    """
    material = {
        "settings": settings,
        "data_path": os.path.abspath(source.data_path) if source.data_path else "",
    }
    if source.source.mapped:
        material["store"] = os.path.basename(source.store.path)
    else:
        material["annotation_sha256"] = file_sha256(source.annotation_path)
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def read_cache(path: Path, key: str, num_records: int) -> list[TokenCount | None] | None:
    """Cached counts when ``path`` holds counts for exactly this key, else None."""
    try:
        with open(path, encoding="utf-8") as handle:
            cache = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or cache.get("key") != key:
        return None
    counts = cache.get("counts")
    if not isinstance(counts, list) or len(counts) != num_records:
        return None
    try:
        return [None if c is None else TokenCount.from_json(c) for c in counts]
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------- counting
def counts_for(
    source: PackedSource, counter: TokenCounter, settings: dict, cache_dir: str | None, recount: bool, workers: int
) -> tuple[dict[int, TokenCount], int, int]:
    """Counts of a source's selected samples, from the cache where it is valid.

    The samples not cached are counted by ``packing.count_jobs`` (in processes when ``workers > 1``,
    each reading its rows from the memory-mapped store).

    Returns:
        ({row: TokenCount}, reused from cache, counted now).
    """
    store = source.store
    cache_path = cache_path_for(source, cache_dir)
    key = cache_key(settings, source)
    cached = None if recount else read_cache(cache_path, key, len(store))
    counts: list[TokenCount | None] = cached if cached is not None else [None] * len(store)
    missing = np.asarray([i for i in source.indices.tolist() if counts[i] is None], dtype=np.int64)
    for row, count in count_jobs(counter, len(missing), StoreJobs(store, missing), workers,
                                 f"counting {source.label}"):
        counts[row] = count
    if len(missing) or cached is None:
        try:
            write_json_atomic(cache_path, {
                "format": CACHE_FORMAT, "key": key,
                "annotation_path": source.annotation_path if source.source.kind == "hub"
                else os.path.abspath(source.annotation_path),
                "data_path": source.data_path, "settings": settings,
                # a transient I/O failure or an unexpected error is not remembered: the next run counts again
                "counts": [c.to_json() if c is not None and c.kind not in NOT_CACHED else None
                           for c in counts],
            })
        except OSError as exc:
            print(f"warning: cannot write the count cache {cache_path} ({exc}); pass --cache_dir to keep counts",
                  file=sys.stderr)
    reused = len(source.indices) - len(missing)
    return {i: counts[i] for i in source.indices.tolist()}, reused, len(missing)


# ------------------------------------------------------------------------ packing
@dataclass
class PackResult:
    """What one output file holds; ``main`` prints it and returns it (for tests)."""

    output: Path
    data_path: str
    sources: list[str]
    num_input: int  # samples selected from the inputs
    num_packed: int  # samples written
    num_bins: int
    tokens: int  # real tokens written
    fill: float  # tokens / sum over bins of max(pack_length, bin tokens)
    longest: int  # longest packed sample
    truncated: int  # packed samples cut to model_max_length
    oversize: int  # samples longer than pack_length (kept alone or dropped)
    dropped: list[tuple[str, int, str, str]]  # (annotation_path, index, kind, reason)
    reused: int  # counts read from the cache
    counted: int  # counts computed now
    count_seconds: float
    pack_seconds: float
    bin_lengths: list[int] = field(repr=False, default_factory=list)


def pack_sources(
    sources: list[PackedSource], output: Path, data_path: str, counts: list[dict[int, TokenCount]], pack_length: int,
    oversize: str,
) -> tuple[list[list[dict]], PackResult]:
    """Groups of samples for one output, and its report (counting fields left at 0)."""
    start = time.perf_counter()
    items: list[tuple[PackedSource, int]] = []
    lengths: list[int] = []
    dropped: list[tuple[str, int, str, str]] = []
    truncated = over = 0
    for source, source_counts in zip(sources, counts):
        for index in source.indices.tolist():
            count = source_counts[index]
            if not count.ok:
                dropped.append((source.annotation_path, index, count.kind, count.reason))
                continue
            if count.length > pack_length:
                over += 1
                if oversize == "drop":
                    dropped.append((source.annotation_path, index, "over_pack_length",
                                    f"{count.length} tokens > pack_length {pack_length}"))
                    continue
            truncated += count.kind == "truncated"
            items.append((source, index))
            lengths.append(count.length)
    bins = first_fit_decreasing(lengths, pack_length)
    groups = [[items[k][0].store[items[k][1]] for k in members] for members in bins]
    bin_lengths = [sum(lengths[k] for k in members) for members in bins]
    tokens = sum(lengths)
    capacity = sum(max(pack_length, n) for n in bin_lengths)
    result = PackResult(
        output=output, data_path=data_path, sources=[s.label for s in sources],
        num_input=sum(len(s.indices) for s in sources), num_packed=len(items), num_bins=len(bins), tokens=tokens,
        fill=tokens / capacity if capacity else 0.0, longest=max(lengths, default=0), truncated=truncated,
        oversize=over, dropped=dropped, reused=0, counted=0, count_seconds=0.0,
        pack_seconds=time.perf_counter() - start, bin_lengths=bin_lengths,
    )
    return groups, result


def report(result: PackResult, pack_length: int, model_max_length: int, oversize: str, show: int) -> str:
    """Human-readable summary of one output."""
    rate = result.counted / result.count_seconds if result.count_seconds > 0 else float("inf")
    kinds = Counter(kind for _, _, kind, _ in result.dropped)
    lines = [
        f"{', '.join(result.sources)} -> {result.output}",
        f"  samples: {result.num_input} selected, {result.num_packed} packed, {len(result.dropped)} left out"
        + (f" ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})" if kinds else ""),
        f"  counts: {result.counted} counted in {result.count_seconds:.2f} s ({rate:.0f} samples/s), "
        f"{result.reused} reused from the cache",
        f"  bins: {result.num_bins} of {pack_length} tokens, fill {100 * result.fill:.2f}% "
        f"({result.tokens} real tokens), longest sample {result.longest}, packed in {result.pack_seconds:.3f} s",
        f"  truncated to model_max_length {model_max_length}: {result.truncated}; longer than pack_length: "
        f"{result.oversize} ({'each kept in a group of its own' if oversize == 'keep' else 'left out'})",
    ]
    for path, index, kind, reason in result.dropped[:show]:
        lines.append(f"  left out {path}:{index}: [{kind}] {reason}")
    if len(result.dropped) > show:
        lines.append(f"  ... and {len(result.dropped) - show} more (--show_problems N lists more; the count "
                     f"caches hold them all)")
    return "\n".join(lines)


def pack_name(output: Path, members: list[PackedSource]) -> str:
    """The registry name of a packed file: ``<registry name>_pack`` (``my_dataset_50pct_pack`` for ``%50``) for
    one input named from the registry, else the file's stem (``train_pack``).

    Example:
        >>> pack_name(Path("/d/train_pack.json"), [])  # inputs given by path, or --output
        'train_pack'
    """
    if len(members) == 1 and members[0].name in data_dict and members[0].name != members[0].annotation_path:
        source = members[0]
        rate = f"_{source.sampling_rate * 100:g}pct" if source.sampling_rate < 1.0 else ""
        return f"{source.name}{rate}_pack"
    return output.name.removesuffix(".json")


def usable_by_path(output: Path, data_path: str, has_media: bool) -> bool:
    """Whether ``--dataset_use OUTPUT`` (the file's path, no registry entry) finds the media: a file given by path
    has its media relative to its own folder, so that folder must be the inputs' ``data_path``."""
    if not has_media:
        return True
    return bool(data_path) and os.path.abspath(data_path) == os.path.abspath(output.parent)


def registry_entry(output: Path, data_path: str, name: str | None = None) -> tuple[str, dict[str, str]]:
    """(name, entry) of a packed file for a registry file: absolute paths, named ``name`` (default: after the
    file).

    Example:
        >>> registry_entry(Path("/d/train_pack.json"), "/d/media")
        ('train_pack', {'annotation_path': '/d/train_pack.json', 'data_path': '/d/media'})
    """
    return name or output.name.removesuffix(".json"), {
        "annotation_path": str(output.resolve()),
        "data_path": str(Path(data_path).resolve()) if data_path else "",
    }


def _registry_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"--registry_file should end in .yaml, .yml or .json but found {path.name!r}")


def update_registry_file(path: Path, entries: dict[str, dict[str, str]]) -> None:
    """Add or replace ``entries`` (name -> entry) in a registry file, keeping its other entries.

    Raises:
        ValueError: the file exists but is not a mapping of names to entries, or has an unknown suffix.
    """
    import yaml

    fmt = _registry_format(path)
    current: Any = {}
    if path.exists():
        text = path.read_text(encoding="utf-8")
        current = (json.loads(text) if fmt == "json" else yaml.safe_load(text)) if text.strip() else {}
        if not isinstance(current, dict):
            raise ValueError(f"{path}: a registry file maps dataset names to entries, found "
                             f"{type(current).__name__}")
    current.update(entries)
    if fmt == "json":
        write_json_atomic(path, current, indent=2)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(current, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def registry_snippet(output: Path, data_path: str, name: str | None = None, by_path: bool = False) -> str:
    """How to train on a packed file when no ``--registry_file`` was given: the entry and the flags, and the
    file's path as ``--dataset_use`` when that finds the media (``usable_by_path``)."""
    import yaml

    name, entry = registry_entry(output, data_path, name)
    lines = yaml.safe_dump({name: entry}, sort_keys=False).rstrip("\n").split("\n")
    text = ("  registry entry (add it to a registry file, e.g. my_registry.yaml, or pass --registry_file "
            "my_registry.yaml to have it written):\n" + "\n".join(f"    {line}" for line in lines) + "\n"
            f"  then train with: --dataset_registry my_registry.yaml --data_packing True --dataset_use {name}")
    if by_path:
        text += f"\n  or, without a registry entry: --data_packing True --dataset_use {output.resolve()}"
    else:
        text += (f"\n  (the file's path alone would not do: its media paths are relative to {data_path}, not to "
                 f"{output.resolve().parent})")
    return text


# --------------------------------------------------------------------------- main
def load_counter(args: argparse.Namespace) -> TokenCounter:
    """Tokenizer, image processor, family and flags -> the counter training's dataset agrees with."""
    data_args = media_data_args(args)
    checkpoint = load_checkpoint(args.model_name_or_path, data_args)
    return TokenCounter(checkpoint.tokenizer, data_args, checkpoint.vision_config, args.model_max_length,
                        family=checkpoint.family, settings=checkpoint.settings)


def plan_outputs(sources: list[PackedSource], output: str | None,
                 output_dir: str | None = None) -> list[tuple[Path, str, list[PackedSource]]]:
    """(output file, its data_path, its sources): one per input (in ``output_dir`` when given), or all
    into ``--output``.

    Raises:
        ValueError: two inputs would write the same file, or merged inputs with media
            have different data_paths (one packed file has one data_path).
    """
    if output is None:
        plans = [(s.default_output(output_dir), s.data_path, [s]) for s in sources]
        seen: dict[Path, str] = {}
        for path, _, (source,) in plans:
            if path.resolve() in seen:
                raise ValueError(f"inputs {seen[path.resolve()]!r} and {source.label!r} would both write {path}; "
                                 f"pass --output to pack them together")
            seen[path.resolve()] = source.label
        return plans
    with_media = [s for s in sources if s.has_media]
    roots = {os.path.abspath(s.data_path) if s.data_path else "" for s in with_media}
    if len(roots) > 1:
        listing = "; ".join(f"{s.label}: {s.data_path or '(paths as written)'}" for s in with_media)
        raise ValueError(f"--output packs all inputs into one file, which has one data_path, but the inputs' media "
                         f"live under different data_paths ({listing}); pack them separately (no --output)")
    data_path = with_media[0].data_path if with_media else ""
    return [(Path(output), data_path, list(sources))]


def refuse_unpackable(model_name_or_path: str) -> None:
    """Stop before anything loads when the checkpoint's family cannot train packed files (the HF-processor
    families, ``family.uses_processor_items``: training refuses ``--data_packing`` for them, see
    ``family.flatten_refusal``). Reads only the folder's ``config.json`` (a hub id: ``load_checkpoint`` decides).

    Raises:
        SystemExit: ``error: ... not supported for the llava family (LlavaForConditionalGeneration): ...``.
    """
    config = read_json(Path(model_name_or_path) / "config.json")
    if config is None:
        return
    try:
        family = family_for(config)
    except ValueError:
        return  # load_checkpoint names the supported model types
    if family.uses_processor_items:
        raise SystemExit(f"error: --model_name_or_path {model_name_or_path}: packed files train with --data_packing "
                         f"True, which is not supported for the {family.model_type} family "
                         f"({family.model_class_name}): {family.flatten_refusal}. Train on the annotation files "
                         f"as they are (padded batches); there is nothing to pack.")


def main(argv: list[str] | None = None) -> list[PackResult]:
    """Run the tool; returns one PackResult per written file."""
    args = parse_tool_args(build_parser(), argv, CONFIG_KEYS, required=("model_name_or_path",))
    if args.pack_length < 1:
        raise SystemExit(f"--pack_length must be positive, got {args.pack_length}")
    if args.model_max_length is None:
        args.model_max_length = args.pack_length
    refuse_unpackable(args.model_name_or_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.registry_file:
            _registry_format(Path(args.registry_file))
        load_dataset_registry(args.dataset_registry)
        sources = resolve_inputs(args.inputs, args.data_path, args.seed)
        plans = plan_outputs(sources, args.output, args.output_dir)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    counter = load_counter(args)
    settings = counter.settings()
    cache_dir = args.cache_dir or args.output_dir

    results = []
    for output, data_path, members in plans:
        counts, reused, counted, seconds = [], 0, 0, 0.0
        for source in members:
            start = time.perf_counter()
            source_counts, source_reused, source_counted = counts_for(
                source, counter, settings, cache_dir, args.recount, args.workers)
            seconds += time.perf_counter() - start
            counts.append(source_counts)
            reused, counted = reused + source_reused, counted + source_counted
        if args.bad_sample_policy == "error":
            for source, source_counts in zip(members, counts):
                bad = next((i for i in source.indices.tolist() if not source_counts[i].ok), None)
                if bad is not None:
                    count = source_counts[bad]
                    raise SystemExit(f"error: {source.annotation_path}:{bad}: [{count.kind}] {count.reason} "
                                     f"(--bad_sample_policy error; {output} not written)")
        groups, result = pack_sources(members, output, data_path, counts, args.pack_length, args.oversize)
        result.reused, result.counted, result.count_seconds = reused, counted, seconds
        if not groups:
            print(report(result, args.pack_length, args.model_max_length, args.oversize, args.show_problems))
            raise SystemExit(f"error: no sample of {', '.join(result.sources)} can be packed; nothing written")
        write_json_atomic(output, groups)
        print(report(result, args.pack_length, args.model_max_length, args.oversize, args.show_problems))
        name = pack_name(output, members)
        if args.registry_file:
            name, entry = registry_entry(output, data_path, name)
            try:
                update_registry_file(Path(args.registry_file), {name: entry})
            except ValueError as exc:
                raise SystemExit(f"error: {exc}") from None
            print(f"  registered {name!r} in {args.registry_file}; train with: --dataset_registry "
                  f"{args.registry_file} --data_packing True --dataset_use {name}")
        else:
            print(registry_snippet(output, data_path, name,
                                   usable_by_path(output, data_path, any(m.has_media for m in members))))
        results.append(result)
    return results


if __name__ == "__main__":
    main()
