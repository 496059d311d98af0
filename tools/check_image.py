"""Validate datasets before training: every sample goes through the checks training runs.

Usage:
    python tools/check_image.py demo_single_image demo_multi_image%50
    python tools/check_image.py /data/train.jsonl --data_path /data/media --workers 16
    python tools/check_image.py my_ds --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --model_max_length 8192

Inputs and outputs:
    Each input is what training's ``--dataset_use`` takes, resolved the same way
    (``qwenvl/data/sources.py``) and read from the same annotation store: a registry name from
    ``qwenvl/data/__init__.py`` or from ``--dataset_registry FILE`` (its column mapping, split and
    system prompt apply), an annotation file (.json list or .jsonl), a Hugging Face dataset
    (``save_to_disk`` folder, parquet or arrow files) or a hub dataset in the local cache; each
    optionally ``name%N``: the same seeded N percent that ``--dataset_use name%N --seed S`` trains on.
    Media paths of inputs given by path are relative to ``--data_path``. For each input the tool
    writes, next to its annotation file or dataset (or in ``--output_dir``; a hub dataset's in the
    working folder), ``<stem>_valid.json`` (a JSON list of the samples that passed, in file order, as
    training reads them: register it to train on clean data) and ``<stem>_problems.json`` (one object
    per bad sample: dataset, annotation_path, index, kind, reason, message) and ``<stem>_images.json``
    (one object per image of a valid sample: index, number, its file's width and height, the
    processed_width / processed_height and tokens the model gets), then prints a summary table
    (total, valid, and the count of each problem kind), the problems, and per input the images by
    processed size and tokens.

What is checked: ``qwenvl/data/validation.py``, the layer ``LazySupervisedDataset`` itself runs,
in the same order (record structure, conversation, tags versus media, then every image and video
decoded as training decodes it). With ``--model_name_or_path`` the samples are also tokenised
(its tokenizer and image processor), which finds samples over ``--model_max_length`` whose cut
would split an image (``over_length``) and samples with no answer token left (``no_labels``):
pass the flags you train with and the tool reports exactly what ``--bad_sample_policy skip``
would skip. For a checkpoint of an HF-processor family (LLaVA & co.) the samples are built by its
processor exactly as training builds them (``ProcessorItemBuilder``), the pixel flags do not apply,
and each image's size and tokens are the processor's (LLaVA-1.5: 336x336, 576 tokens).

A sample whose check raises an exception no check expected is reported as that sample's
``unexpected_error`` (with the exception's type and message) and checking goes on.
``--bad_sample_policy error`` stops at the first input with a problem and names its first bad
sample (file, index, cause) on stderr.

Exit status: 0 when every sample is valid, 1 when any problem was found (for CI pipelines),
2 on usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/check_image.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.data.annotations import AnnotationStore  # noqa: E402
from qwenvl.data.chat import Problem, SampleRef  # noqa: E402
from qwenvl.data.packing import map_jobs  # noqa: E402
from qwenvl.data.validation import ImageInfo, ProcessorSampleValidator, SampleValidator, summarize  # noqa: E402
from qwenvl.data.vision import VisionConfig  # noqa: E402
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

CHUNK = 32  # samples per task sent to a worker
# Training's settings this tool takes from --config files (a train file's dataset_use: the inputs).
CONFIG_KEYS = ("dataset_use", "dataset_registry", "model_name_or_path", "model_max_length", "seed",
               "bad_sample_policy", *MEDIA_FLAGS, *ROW_FLAGS)
SHOWN_PROBLEMS = 20  # problems printed per input; the problems file has them all


# ------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every flag)."""
    parser = argparse.ArgumentParser(
        prog="tools/check_image.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Inputs and outputs:"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_flags(parser)
    parser.add_argument("--model_name_or_path", default=None,
                        help="checkpoint: its image processor (patch geometry) and tokenizer (over_length and "
                             "no_labels checks); without it those two checks are skipped")
    parser.add_argument("--model_max_length", type=int, default=512,
                        help="as in training (default 512); used with --model_name_or_path")
    parser.add_argument("--seed", type=int, default=42, help="as training's --seed: picks the name%%N subsets")
    parser.add_argument("--output_dir", default=None,
                        help="where *_valid.json and *_problems.json go (default: next to each annotation file)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode media (default 1)")
    parser.add_argument("--io_retries", type=int, default=3, help="retries of transient I/O errors per sample")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_policy_flag(parser, "checks every sample and reports all problems")
    add_media_flags(parser)
    return parser


# ------------------------------------------------------------------------- inputs
@dataclass
class CheckedSource(ToolInput):
    """One input and which of its samples are checked (``error``: its store could not be opened)."""

    def output_path(self, suffix: str, output_dir: str | None) -> Path:
        """``<stem>_valid.json`` / ``<stem>_problems.json`` (``<stem>_{N}pct_...`` for ``%N``)."""
        return self.output_folder(output_dir) / f"{self.output_stem()}_{suffix}.json"


def resolve_inputs(inputs: Sequence[str], data_path: str, seed: int) -> list[CheckedSource]:
    """Inputs as ``--dataset_use`` takes them -> sources with their stores and selected rows.

    A source whose records cannot be read (a missing, empty or broken annotation file, a column
    mapping naming a missing column) becomes a source with ``error`` set; a JSONL line that does
    not parse is a ``bad_json`` sample.

    Raises:
        ValueError: what ``resolve_sources`` refuses: an input that names nothing that exists (the message
            lists the registered names), a bad ``%N``, or an input given twice.
    """
    sources = [CheckedSource(i.label, i.source) for i in common_resolve_inputs(inputs, data_path)]
    for source in sources:
        try:
            source.open(seed)
        except (ValueError, OSError) as exc:
            source.error = str(exc)
    return sources


# ------------------------------------------------------------------------ checking
@dataclass
class _CheckJobs:
    """Job k: ``(k, record, ref)`` of row ``rows[k]`` of a store, read where it is called (picklable: the store
    pickles as its path)."""

    store: AnnotationStore
    rows: np.ndarray
    dataset: str

    def __call__(self, k: int) -> tuple[int, Any, SampleRef]:
        row = int(self.rows[k])
        source = self.store.source
        return k, self.store[row], SampleRef(self.dataset, source.location, source.data_path, row)


def check_job(validator: SampleValidator, job: tuple[int, Any, SampleRef]
              ) -> tuple[int, Problem | None, list[ImageInfo]]:
    """``(position, the sample's first problem or None, its images as training sizes them)`` for ``map_jobs``."""
    position, record, ref = job
    return position, *validator.inspect(record, ref)


def check_samples(validator: SampleValidator, num_jobs: int, fetch: Callable[[int], tuple[int, Any, SampleRef]],
                  workers: int, desc: str, progress: bool = True
                  ) -> Iterator[tuple[int, Problem | None, list[ImageInfo]]]:
    """Validate ``num_jobs`` samples, in processes when ``workers > 1``, with a progress bar (``map_jobs``).

    Args:
        validator: training's checks.
        num_jobs: how many samples.
        fetch: job number -> ``(position, record, ref)``; called where the sample is checked, so the
            processes read their records from the memory-mapped store.
        workers: processes (1 = check here).
        desc: progress bar label.
        progress: show a progress bar.

    Yields:
        (position, the sample's first problem or None, the images of a valid sample), in any order.
    """
    return map_jobs(check_job, validator, num_jobs, fetch, workers, desc, progress, chunk=CHUNK)


@dataclass
class CheckResult:
    """What one input produced."""

    source: CheckedSource
    problems: list[Problem]
    valid_path: Path | None = None
    problems_path: Path | None = None
    images: list[tuple[int, ImageInfo]] = field(default_factory=list)  # (sample index, image) of valid samples
    images_path: Path | None = None

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.problems, len(self.source.indices))


def check_source(source: CheckedSource, validator: SampleValidator, workers: int, output_dir: str | None,
                 progress: bool = True) -> CheckResult:
    """Validate one input's selected samples and write its valid, problems and images files.

    The valid file holds the records as training reads them (a Hugging Face row mapped to a record,
    inline image bytes as ``data:`` URIs); the images file one object per image of a valid sample: its
    sample index, number, file size and the size and tokens training gives the model (``ImageInfo``: for an
    HF-processor family, what its processor makes of it).

    Returns:
        the problems (sorted by index), the images and the paths written.
    """
    if source.error:
        return CheckResult(source, [])
    rows = source.indices
    found: dict[int, Problem | None] = {}
    images: dict[int, list[ImageInfo]] = {}
    fetch = _CheckJobs(source.store, rows, source.name)
    for position, problem, infos in check_samples(validator, len(rows), fetch, workers, f"checking {source.label}",
                                                  progress):
        found[position], images[position] = problem, infos
    problems = sorted((p for p in found.values() if p is not None), key=lambda p: p.index)
    valid = [source.store[row] for position, row in enumerate(rows.tolist()) if found[position] is None]
    result = CheckResult(source, problems, source.output_path("valid", output_dir),
                         source.output_path("problems", output_dir),
                         [(row, info) for position, row in enumerate(rows.tolist()) for info in images[position]],
                         source.output_path("images", output_dir))
    write_json_atomic(result.valid_path, valid, indent=1)
    write_json_atomic(result.problems_path, [p.to_dict() for p in problems], indent=1)
    write_json_atomic(result.images_path, [{"index": row, **asdict(info)} for row, info in result.images], indent=1)
    return result


def format_images(result: CheckResult, shown: int = 5) -> str:
    """One line: an input's images by the size and tokens training gives the model, the most frequent first.

    Example:
        >>> format_images(llava_result)
        'images: 14, as the model gets them: 14 x 336x336 (576 tokens)'
    """
    sizes = Counter((info.processed_width, info.processed_height, info.tokens) for _, info in result.images)
    parts = [f"{count} x {width}x{height} ({'?' if tokens is None else tokens} tokens)"
             for (width, height, tokens), count in sizes.most_common(shown)]
    if len(sizes) > shown:
        parts.append(f"... {len(sizes) - shown} more sizes")
    return f"images: {len(result.images)}, as the model gets them: {', '.join(parts) or '-'}"


# ------------------------------------------------------------------------- report
def format_table(results: Sequence[CheckResult]) -> str:
    """The summary table: one row per input plus a total row; one column per problem kind found.

    Example output::

        input              total  valid  problems  missing_media  bad_image
        demo_single_image     12     12         0              0          0
        bad.json              20     18         2              1          1
        total                 32     30         2              1          1
    """
    kinds: list[str] = []
    for result in results:
        for kind in result.summary["kinds"]:
            if kind not in kinds:
                kinds.append(kind)
    header = ["input", "total", "valid", "problems"] + kinds
    rows = []
    totals = [0, 0, 0] + [0] * len(kinds)
    for result in results:
        if result.source.error:
            rows.append([result.source.label, "error", "-", "-"] + ["-"] * len(kinds))
            continue
        summary = result.summary
        numbers = [summary["total"], summary["valid"], summary["problems"]] + [summary["kinds"].get(k, 0)
                                                                              for k in kinds]
        totals = [a + b for a, b in zip(totals, numbers)]
        rows.append([result.source.label] + numbers)
    if len(results) > 1:
        rows.append(["total"] + totals)
    widths = [max(len(str(row[c])) for row in [header] + rows) for c in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [str(row[0]).ljust(widths[0])] + [str(v).rjust(w) for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def load_validator(args: argparse.Namespace) -> SampleValidator:
    """The validator the flags describe: training's pixel/frame limits, the model's geometry and tokenizer; for an
    HF-processor family (``family.uses_processor_items``) its processor (``ProcessorSampleValidator``: training's
    ``ProcessorItemBuilder``; the pixel flags do not apply, the processor sizes the images)."""
    data_args = media_data_args(args)
    tokenizer = family = settings = None
    config = read_json(Path(args.model_name_or_path) / "config.json") if args.model_name_or_path else None
    family = family_for(config) if config is not None else None
    if family is not None and family.uses_processor_items:
        return ProcessorSampleValidator(family.load_processor(args.model_name_or_path), family,
                                        model_max_length=args.model_max_length, io_retries=args.io_retries)
    if args.model_name_or_path:
        checkpoint = load_checkpoint(args.model_name_or_path, data_args)
        tokenizer, vision_config = checkpoint.tokenizer, checkpoint.vision_config
        family, settings = checkpoint.family, checkpoint.settings
    else:
        vision_config = VisionConfig(min_pixels=int(data_args.min_pixels), max_pixels=int(data_args.max_pixels),
                                     resize_mode=data_args.image_resize_mode, max_size=data_args.image_max_size)
    return SampleValidator(vision_config, data_args, tokenizer,
                           model_max_length=args.model_max_length if tokenizer is not None else None,
                           io_retries=args.io_retries, family=family, settings=settings)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 all valid, 1 problems found)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer was used
    parser = build_parser()
    args = parse_tool_args(parser, argv, CONFIG_KEYS)
    try:
        load_dataset_registry(args.dataset_registry)
        sources = resolve_inputs(args.inputs, args.data_path, args.seed)
        validator = load_validator(args)
    except ValueError as exc:
        parser.error(str(exc))
    results = []
    for source in sources:
        result = check_source(source, validator, max(1, args.workers), args.output_dir, not args.no_progress)
        results.append(result)
        if args.bad_sample_policy == "error" and (source.error or result.problems):
            first = source.error or f"[{result.problems[0].kind}] {result.problems[0].message}"
            print(f"error: {first} (--bad_sample_policy error: stopped at the first input with a problem; "
                  f"{len(result.problems)} problem(s) in {result.problems_path})", file=sys.stderr)
            return 1

    print(format_table(results))
    if validator.encoder is None:
        print("(no --model_name_or_path: over_length and no_labels were not checked)")
    failed = False
    for result in results:
        source = result.source
        if source.error:
            failed = True
            print(f"\n{source.label}: cannot read the annotation file: {source.error}")
            continue
        print(f"\n{source.label}: wrote {result.valid_path} ({result.summary['valid']} valid samples) and "
              f"{result.problems_path} ({len(result.problems)} problems)")
        if result.images:
            print(f"  {format_images(result)} (each in {result.images_path})")
        for problem in result.problems[:SHOWN_PROBLEMS]:
            print(f"  [{problem.kind}] {problem.message}")
        if len(result.problems) > SHOWN_PROBLEMS:
            print(f"  ... and {len(result.problems) - SHOWN_PROBLEMS} more in {result.problems_path}")
        failed = failed or bool(result.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
