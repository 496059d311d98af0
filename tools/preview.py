"""Preview a dataset as the model sees it: one self-contained HTML page to look at instead of token ids.

Usage:
    python tools/preview.py demo_grounding demo_video --model_name_or_path output/demo --out preview.html
    python tools/preview.py /data/train.jsonl%1 --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --samples 50 \\
        --max_pixels 1024*28*28 --model_max_length 4096

Inputs and outputs:
    Each input is what training's ``--dataset_use`` takes, resolved the same way: a registry name
    (``qwenvl/data/__init__.py`` or ``--dataset_registry FILE``), an annotation file (.json list or
    .jsonl; its media relative to its folder, as training reads it), a Hugging Face dataset or a
    cached hub dataset, each optionally ``name%N`` (the seeded N percent ``--seed`` picks). The
    samples are built by training's own ``LazySupervisedDataset`` with the checkpoint's tokenizer
    and processor and the flags given here (pass the ones you train with), so the page shows the
    training items themselves. ``--out`` is one HTML file: images inlined, no script, no network.

What the page shows:
    a header with each input's size (records, kept by %N, shown, bad, cut by --model_max_length)
    and a histogram of the token lengths (of every kept sample with ``--count all``, the default:
    training's cached exact counts; of the shown samples with ``--count shown``); then the first
    ``--samples`` samples of each input: every image as the model sees it (the pixels of the
    item, after the resize) with its size, token count and grid (t, h, w); grounding boxes and
    points parsed from the answers and drawn in the family's coordinate frame (Qwen2.5-VL:
    absolute pixels of the resized image; Qwen2-VL and Qwen3-VL: 0-1000 relative), a box outside
    the image flagged; each video's sampled frames with their times; the chat as the tokens
    read, learned tokens (labels != -100) highlighted and tokens cut by ``--model_max_length``
    struck through; a bad sample with its kind and reason. Last, the list of bad samples.

Exit status: 0 when every sample is good, 1 when any is bad, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/preview.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.data.chat import IGNORE_INDEX, IMAGE_TAG, Problem, SampleRef  # noqa: E402
from qwenvl.data.data_qwen import LazySupervisedDataset  # noqa: E402
from qwenvl.data.grounding import PlacedGrounding, parse_grounding, place  # noqa: E402
from qwenvl.data.packing import BAD  # noqa: E402
from qwenvl.data.validation import check_record  # noqa: E402
from qwenvl.data.video import VideoPlan, plan_video, probe_video  # noqa: E402
from qwenvl.data.vision import VisionConfig, image_size, num_vision_tokens  # noqa: E402
from qwenvl.models import family_for  # noqa: E402
from qwenvl.models.base import read_json  # noqa: E402
from qwenvl.train.argument import DataArguments  # noqa: E402
from tools.common import (  # noqa: E402
    MEDIA_FLAGS,
    ROW_FLAGS,
    Checkpoint,
    add_config_flag,
    add_media_flags,
    add_row_flags,
    load_checkpoint,
    load_dataset_registry,
    parse_tool_args,
)

# Training's settings this tool takes from --config files (a train file's dataset_use: the inputs).
CONFIG_KEYS = ("dataset_use", "dataset_registry", "model_name_or_path", "model_max_length", "seed", *MEDIA_FLAGS,
               *ROW_FLAGS)
THUMB_WIDTH = 480  # CSS width an image is shown at when it is wider
HISTOGRAM_BINS = 30


# ------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every flag)."""
    parser = argparse.ArgumentParser(
        prog="tools/preview.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Inputs and outputs:"):], formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="what --dataset_use takes: registry names, annotation files (.json list or .jsonl), "
                             "Hugging Face datasets or cached hub dataset names, each optionally with %%N (none: a "
                             "--config train file's dataset_use)")
    parser.add_argument("--dataset_registry", default="",
                        help="as in training: a registry file (YAML or JSON) whose names the inputs may use")
    add_row_flags(parser)
    add_config_flag(parser)
    parser.add_argument("--model_name_or_path", default=None,
                        help="checkpoint folder: its tokenizer, image processor and model family (chat layout, "
                             "grounding frame); required, here or in a --config file")
    parser.add_argument("--model_max_length", type=int, default=512, help="as in training (default 512)")
    parser.add_argument("--seed", type=int, default=42, help="as training's --seed: picks the name%%N subsets")
    parser.add_argument("--samples", type=int, default=20, help="samples shown per input, the first ones kept "
                                                                "(default 20)")
    parser.add_argument("--out", default="preview.html", help="the HTML file to write (default preview.html)")
    parser.add_argument("--count", choices=("all", "shown"), default="all",
                        help="'all' (default): sizes, bad samples and the length histogram of every kept sample "
                             "(training's exact token counts, cached next to the annotation store); 'shown': of "
                             "the shown samples only (fast on huge datasets)")
    parser.add_argument("--max_bad", type=int, default=200, help="bad samples listed with their reason (default 200)")
    parser.add_argument("--workers", type=int, default=1, help="processes counting tokens for --count all")
    parser.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg",
                        help="how images are inlined: jpeg (default, small pages) or png (the exact pixels)")
    add_media_flags(parser)
    return parser


def preview_data_args(args: argparse.Namespace) -> DataArguments:
    """Training's ``DataArguments`` for the inputs and media flags (validated as training validates them)."""
    return DataArguments(dataset_use=",".join(spec.strip() for spec in args.inputs if spec.strip()),
                         count_workers=max(1, args.workers), bad_sample_policy="skip",
                         **{name: getattr(args, name) for name in MEDIA_FLAGS})


def open_dataset(args: argparse.Namespace, checkpoint: Checkpoint) -> LazySupervisedDataset:
    """Training's dataset over the inputs, with the checkpoint's tokenizer, family and the flags.

    Raises:
        ValueError: what training raises for these inputs (unknown name, unreadable file, bad ``%N``).
    """
    config = read_json(Path(args.model_name_or_path) / "config.json") or {}
    tokens_per_second = (config.get("vision_config") or {}).get("tokens_per_second", 2)
    return LazySupervisedDataset(
        checkpoint.tokenizer, preview_data_args(args), checkpoint.vision_config, model_max_length=args.model_max_length,
        seed=args.seed, tokens_per_second=tokens_per_second, bad_sample_policy="skip", family=checkpoint.family,
        vision_settings=checkpoint.settings,
    )


# ------------------------------------------------------------------- pixels back
def unpatchify(pixel_values: np.ndarray, grid_thw: Sequence[int], cfg: VisionConfig) -> np.ndarray:
    """The uint8 frames the patches were cut from: the inverse of ``qwenvl.data.vision.patchify``.

    Args:
        pixel_values: (t * h * w, 3 * temporal_patch_size * patch_size**2) normalised patches of one image or video.
        grid_thw: (t, h, w) in patches.
        cfg: the geometry and normalisation they were made with.

    Returns:
        (t * temporal_patch_size, h * patch_size, w * patch_size, 3) uint8: an image gives its frame twice,
        a video with an odd number of sampled frames its last frame twice.

    Raises:
        ValueError: the number of rows or columns does not fit the grid.

    Example:
        >>> pv, grid = patchify(frames, cfg)  # frames (2, 56, 84, 3) uint8
        >>> bool((unpatchify(pv, grid, cfg) == frames).all())
        True
    """
    t, h, w = (int(x) for x in grid_thw)
    ps, ms, tps = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pixel_values.shape != (t * h * w, 3 * tps * ps * ps):
        raise ValueError(f"expected pixel values of shape {(t * h * w, 3 * tps * ps * ps)} for grid {(t, h, w)} "
                         f"but found {tuple(pixel_values.shape)}")
    values = pixel_values.reshape(t * h * w, 3, tps * ps * ps).astype(np.float32)
    values = values * np.asarray(cfg.image_std, np.float32)[None, :, None]
    values = values + np.asarray(cfg.image_mean, np.float32)[None, :, None]
    values = np.clip(np.rint(values / np.float32(cfg.rescale_factor)), 0, 255).astype(np.uint8)
    # rows are (t, h/m, w/m, m, m) and columns (channel, temporal, ps, ps), as patchify laid them out
    patches = values.reshape(t, h // ms, w // ms, ms, ms, 3, tps, ps, ps)
    frames = patches.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5)  # -> (t, temporal, h/m, m, ps, w/m, m, ps, channel)
    return np.ascontiguousarray(frames).reshape(t * tps, h * ps, w * ps, 3)


def data_uri(frame: np.ndarray, image_format: str = "jpeg") -> str:
    """A ``data:image/...;base64,`` URI of a (H, W, 3) uint8 frame."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(frame).save(buffer, format="PNG", optimize=True)
    else:
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# ------------------------------------------------------------------ sample views
@dataclass
class ImageView:
    """One image of a sample as the model sees it.

    Attributes:
        number: its position among the sample's images.
        source: the reference as written (a shortened inline image).
        original: (width, height) of the file, from its header.
        size: (width, height) after the resize, the pixels the model gets.
        grid: (t, h, w) in patches (``image_grid_thw``).
        tokens: LLM tokens of the image (t*h*w / merge**2).
        uri: the resized pixels as a data URI.
        boxes: grounding parsed from the answers that follow the image, in its pixels.
    """

    number: int
    source: str
    original: tuple[int, int] | None
    size: tuple[int, int]
    grid: tuple[int, int, int]
    tokens: int
    uri: str
    boxes: list[PlacedGrounding] = field(default_factory=list)


@dataclass
class VideoView:
    """One video of a sample: its sampled frames (as the model gets them) and their times.

    Attributes:
        number: its position among the sample's videos.
        source: the path as written.
        size: (width, height) of a frame after the resize.
        grid: (t, h, w) in patches (``video_grid_thw``).
        tokens: LLM tokens of each vision block it is written as.
        frames: (data URI, frame index in the file, seconds) of each sampled frame.
        block_seconds: the timestamp written before each block (Qwen3-VL), else None.
        second_per_grid_t: seconds one temporal grid step covers.
        note: why the frame times are missing ("" when they are shown).
    """

    number: int
    source: str
    size: tuple[int, int]
    grid: tuple[int, int, int]
    tokens: list[int]
    frames: list[tuple[str, int | None, float | None]]
    block_seconds: tuple[float, ...] | None
    second_per_grid_t: float | None
    note: str = ""


@dataclass
class Segment:
    """A run of tokens shown together: text with one (learned, cut) state, or one vision block's pads.

    Attributes:
        kind: ``text``, ``image`` or ``video``.
        text: the decoded text (pads: empty).
        tokens: how many tokens.
        learned: labels != -100 (in the uncut encoding for cut tokens).
        cut: past ``--model_max_length``: not in the training item.
        media: the image or video number of a pad run (-1 for text).
    """

    kind: str
    text: str
    tokens: int
    learned: bool
    cut: bool
    media: int = -1


@dataclass
class SampleView:
    """What the page shows of one sample.

    Attributes:
        position: index in the dataset (``LazySupervisedDataset[position]``).
        ref: where it comes from.
        problem: why the dataset rejects it (None for a good sample).
        length: tokens of the training item.
        full_length: tokens before the ``--model_max_length`` cut.
        images, videos, segments: see the classes.
        unplaced: grounding in answers that no image precedes.
    """

    position: int
    ref: SampleRef
    problem: Problem | None = None
    length: int = 0
    full_length: int = 0
    images: list[ImageView] = field(default_factory=list)
    videos: list[VideoView] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

    @property
    def cut_tokens(self) -> int:
        return self.full_length - self.length


def short_source(source: str) -> str:
    """A media reference for display: paths as written, inline images shortened."""
    if source.startswith("data:") or len(source) > 200:
        return f"inline image ({len(source)} characters)"
    return source


def image_views(item: dict[str, Any], images: list[str], data_path: str, cfg: VisionConfig,
                image_format: str) -> list[ImageView]:
    """The item's images, rebuilt from its ``pixel_values`` and ``image_grid_thw``."""
    if not images:
        return []
    grids = [tuple(int(x) for x in g) for g in item["image_grid_thw"].tolist()]
    pixels = item["pixel_values"].numpy()
    views, start = [], 0
    for number, (source, grid) in enumerate(zip(images, grids)):
        rows = grid[0] * grid[1] * grid[2]
        frame = unpatchify(pixels[start:start + rows], grid, cfg)[0]
        start += rows
        try:
            height, width = image_size(source, data_path)
            original: tuple[int, int] | None = (width, height)
        except (ValueError, OSError):
            original = None
        views.append(ImageView(number, short_source(source), original, (frame.shape[1], frame.shape[0]), grid,
                               num_vision_tokens(grid, cfg.merge_size), data_uri(frame, image_format)))
    return views


def video_plan(dataset: LazySupervisedDataset, source: str, data_path: str) -> tuple[VideoPlan | None, float | None]:
    """The frame plan training's loader follows for a video (``plan_video`` over ``probe_video``), and its fps."""
    try:
        meta = probe_video(source, data_path)
        return plan_video(meta, dataset.data_args, dataset.vision_config, dataset.family,
                          dataset.vision_settings), meta.fps
    except (ValueError, OSError):
        return None, None


def video_views(dataset: LazySupervisedDataset, item: dict[str, Any], videos: list[str], plans: list[Any],
                fps: list[float | None], image_format: str) -> list[VideoView]:
    """The item's videos: frames rebuilt from ``pixel_values_videos``, times from the loader's plan."""
    if not videos:
        return []
    cfg = dataset.vision_config
    grids = [tuple(int(x) for x in g) for g in item["video_grid_thw"].tolist()]
    pixels = item["pixel_values_videos"].numpy()
    views, start = [], 0
    for number, (source, grid, plan, rate) in enumerate(zip(videos, grids, plans, fps)):
        rows = grid[0] * grid[1] * grid[2]
        frames = unpatchify(pixels[start:start + rows], grid, cfg)
        start += rows
        note = ""
        if plan is None or tuple(plan.grid_thw) != grid:
            note = "frame times unknown: the video's metadata plan differs from the decoded grid"
            plan = None
        count = len(plan.indices) if plan is not None else len(frames)
        shown = []
        for k in range(count):
            index = int(plan.indices[k]) if plan is not None else None
            seconds = index / rate if plan is not None and rate else None
            shown.append((data_uri(frames[k], image_format), index, seconds))
        views.append(VideoView(number, source, (frames.shape[2], frames.shape[1]), grid,
                               dataset.family.video_block_lengths(grid, cfg.merge_size), shown,
                               plan.timestamps if plan is not None else None,
                               plan.second_per_grid_t if plan is not None else None, note))
    return views


def segments_of(tokenizer: Any, ids: np.ndarray, labels: np.ndarray, kept: int, image_pad: int,
                video_pad: int) -> list[Segment]:
    """Runs of tokens with one state: text (learned or not, cut or not) or the pads of one vision block.

    Args:
        tokenizer: decodes the text runs.
        ids: (L,) token ids of the uncut encoding.
        labels: (L,) its labels.
        kept: tokens the training item keeps (the rest were cut by ``--model_max_length``).
        image_pad: id of ``<|image_pad|>``.
        video_pad: id of ``<|video_pad|>``.

    Returns:
        the segments in order; their token counts add up to L.
    """
    kinds = np.where(ids == image_pad, 1, np.where(ids == video_pad, 2, 0))
    learned = labels != IGNORE_INDEX
    cut = np.arange(len(ids)) >= kept
    state = np.stack([kinds, learned, cut], axis=1)
    starts = np.flatnonzero(np.r_[True, (state[1:] != state[:-1]).any(axis=1)])
    ends = np.r_[starts[1:], len(ids)]
    segments, media = [], {1: -1, 2: -1}
    for start, end in zip(starts.tolist(), ends.tolist()):
        kind = int(kinds[start])
        if kind:  # one vision block (a Qwen3-VL video has one per temporal patch)
            media[kind] += 1
            segments.append(Segment("image" if kind == 1 else "video", "", end - start, bool(learned[start]),
                                    bool(cut[start]), media[kind]))
            continue
        text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        segments.append(Segment("text", text, end - start, bool(learned[start]), bool(cut[start])))
    return segments


def attach_grounding(view: SampleView, turns: list[tuple[str, str]], family: Any) -> None:
    """Parse the grounding of every answer and place it on the last image shown before that answer."""
    images_seen = 0
    for role, text in turns:
        if role == "user":
            images_seen += text.count(IMAGE_TAG)
            continue
        found = parse_grounding(text)
        if not found:
            continue
        if images_seen == 0 or images_seen > len(view.images):
            view.unplaced.extend(g.text for g in found)
            continue
        image = view.images[images_seen - 1]
        image.boxes.extend(place(found, family, image.size[0], image.size[1]))


def build_view(dataset: LazySupervisedDataset, position: int, image_format: str = "jpeg") -> SampleView:
    """One sample as the page shows it, built by training's ``LazySupervisedDataset.load_sample``.

    The item's own pixels give the images and frames; the dataset's encoder, with the item's grids,
    gives the uncut token ids (to show what ``--model_max_length`` cut).

    Raises:
        RuntimeError: the item's token ids are not a prefix of the uncut encoding (the pipeline disagrees with itself).
    """
    ref = dataset.refs[position]
    view = SampleView(position, ref)
    item = dataset.load_sample(position)
    if isinstance(item, Problem):
        view.problem = item
        return view
    checked = check_record(dataset.records[position], ref.annotation_path, ref.index, dataset.family)
    cfg = dataset.vision_config
    view.images = image_views(item, checked.images, ref.data_path, cfg, image_format)
    planned = [video_plan(dataset, source, ref.data_path) for source in checked.videos]
    plans = [plan for plan, _ in planned]
    view.videos = video_views(dataset, item, checked.videos, plans, [rate for _, rate in planned], image_format)
    ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
    try:
        full_ids, full_labels = dataset.encoder.encode(
            checked.conversation, [image.tokens for image in view.images], [video.tokens for video in view.videos],
            [plan.timestamps if plan is not None else None for plan in plans])
    except ValueError:  # a video whose metadata no longer probes (its timestamps unknown): show the item as is
        full_ids, full_labels = ids, labels
    if len(full_ids) < len(ids) or not (full_ids[:len(ids)] == ids).all():
        raise RuntimeError(f"{ref.annotation_path}:{ref.index}: the item's token ids are not a prefix of the "
                           f"uncut encoding of the same conversation")
    view.length, view.full_length = len(ids), len(full_ids)
    token_ids = dataset.encoder.token_ids
    view.segments = segments_of(dataset.tokenizer, full_ids, full_labels, len(ids), token_ids.image_pad,
                                token_ids.video_pad)
    attach_grounding(view, checked.conversation.turns, dataset.family)
    return view


# ----------------------------------------------------------------------- summary
@dataclass
class InputSummary:
    """One input's numbers for the header.

    Attributes:
        label: the input as typed.
        location: its annotation file, dataset or hub name.
        records: rows in the source.
        kept: rows kept by ``%N``.
        positions: its samples' indices in the dataset.
        bad: counted bad samples (None with ``--count shown``).
        truncated: samples cut to ``--model_max_length`` (None with ``--count shown``).
    """

    label: str
    location: str
    records: int
    kept: int
    positions: range
    bad: int | None = None
    truncated: int | None = None


def input_summaries(dataset: LazySupervisedDataset, labels: Sequence[str]) -> list[InputSummary]:
    """Size of each input and the range of its samples in the dataset."""
    summaries, start = [], 0
    for label, source, store, kept in zip(labels, dataset.annotations.sources, dataset.annotations.stores,
                                          dataset.annotations.kept):
        size = len(store) if kept is None else len(kept)
        summaries.append(InputSummary(label, source.location, len(store), size, range(start, start + size)))
        start += size
    return summaries


def histogram_svg(lengths: np.ndarray, model_max_length: int, bins: int = HISTOGRAM_BINS) -> str:
    """An inline SVG bar chart of token lengths, with ``model_max_length`` marked.

    Args:
        lengths: (n,) tokens per sample (bad samples left out).
        model_max_length: drawn as a red line when it falls in the range.
        bins: bar count.

    Returns:
        the ``<svg>`` element (an empty-state note when there are no lengths).
    """
    if len(lengths) == 0:
        return '<p class="note">no good sample to count</p>'
    width, height, left, bottom = 720, 200, 48, 28
    low = int(lengths.min())
    high = max(int(lengths.max()), low + 1)
    counts, edges = np.histogram(lengths, bins=bins, range=(low, high))
    top = max(int(counts.max()), 1)
    bar = (width - left - 8) / bins
    parts = [f'<svg class="histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="token length histogram">']
    plot = height - bottom - 8
    for k, count in enumerate(counts.tolist()):
        h = plot * count / top
        parts.append(f'<rect class="bar" x="{left + k * bar:.1f}" y="{8 + plot - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                     f'height="{h:.1f}" data-count="{count}"><title>{edges[k]:.0f}-{edges[k + 1]:.0f} tokens: '
                     f'{count} samples</title></rect>')
    parts.append(f'<line x1="{left}" y1="{8 + plot}" x2="{width - 8}" y2="{8 + plot}" class="axis"/>')
    parts.append(f'<text x="{left}" y="{height - 8}" class="tick">{low}</text>')
    parts.append(f'<text x="{width - 8}" y="{height - 8}" class="tick" text-anchor="end">{high}</text>')
    parts.append(f'<text x="{left - 4}" y="16" class="tick" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 8}" class="tick" text-anchor="middle">tokens per '
                 f'sample</text>')
    if low <= model_max_length <= high:
        x = left + (model_max_length - low) / (high - low) * (width - left - 8)
        parts.append(f'<line class="limit" x1="{x:.1f}" y1="8" x2="{x:.1f}" y2="{8 + plot}"/>'
                     f'<text class="tick limit-label" x="{x - 3:.1f}" y="20" text-anchor="end">model_max_length '
                     f'{model_max_length}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------- page
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px} h2{font-size:16px;margin:0 0 6px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:16px 0}
.sample.bad{border-color:#d33;background:#fff5f5}
.meta{color:#555;font-size:13px} .problem{color:#b00;font-weight:600}
.media{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
figure{margin:0} figcaption{font-size:12px;color:#444;max-width:480px}
svg.view{background:#eee;overflow:visible;max-width:480px;height:auto}
rect.box{fill:none;stroke:#0a0;stroke-width:2;vector-effect:non-scaling-stroke}
rect.box.outside,circle.point.outside{stroke:#e00;stroke-dasharray:6 3}
circle.point{fill:#0a0;stroke:#fff;stroke-width:1;vector-effect:non-scaling-stroke}
text.label{font:bold 13px sans-serif;fill:#0a0;paint-order:stroke;stroke:#fff;stroke-width:3px}
.flag{color:#e00;font-weight:600}
.frames{display:flex;flex-wrap:wrap;gap:4px} .frames figure{font-size:11px;color:#444}
.frames img{height:96px;display:block}
.chat{white-space:pre-wrap;font:13px/1.5 ui-monospace,monospace;background:#f6f6f6;padding:8px;border-radius:4px;
  word-break:break-word}
.tok.learned{background:#c8f2c8}
.tok.cut{color:#999;text-decoration:line-through;background:#fde2e2}
.pad{background:#d6e4ff;color:#124;border-radius:3px;padding:0 3px}
.pad.cut{background:#fde2e2}
svg.histogram rect.bar{fill:#6a8fd0} svg.histogram .axis{stroke:#444}
svg.histogram .limit{stroke:#e00;stroke-width:2} .tick{font-size:11px;fill:#333}
.legend span{margin-right:12px}
"""


def _attrs(**values: Any) -> str:
    return "".join(f' {name.replace("_", "-")}="{html.escape(str(value))}"' for name, value in values.items())


def render_image(image: ImageView, family: Any) -> str:
    """An image with its grounding overlay (SVG) and caption."""
    w, h = image.size
    shown_w = min(w, THUMB_WIDTH)
    parts = [f'<figure class="image"{_attrs(data_image=image.number, data_size=f"{w}x{h}", data_tokens=image.tokens)}'
             f'{_attrs(data_grid=",".join(map(str, image.grid)))}>',
             f'<svg class="view" xmlns="http://www.w3.org/2000/svg" width="{shown_w}" height="{h * shown_w / w:.0f}" '
             f'viewBox="0 0 {w} {h}"><image href="{image.uri}" x="0" y="0" width="{w}" height="{h}"/>']
    for box in image.boxes:
        flag = " outside" if box.problem else ""
        label = html.escape(box.grounding.label)
        coords = " ".join(f"{v:.3f}" for v in box.pixels)
        if box.grounding.is_box:
            x1, y1, x2, y2 = box.pixels
            parts.append(f'<rect class="box{flag}" x="{x1:.3f}" y="{y1:.3f}" width="{x2 - x1:.3f}" '
                         f'height="{y2 - y1:.3f}"{_attrs(data_pixels=coords, data_problem=box.problem)}>'
                         f'<title>{label} {html.escape(box.grounding.text)}</title></rect>')
            anchor = (x1 + 2, max(y1 - 4, 12))
        else:
            x, y = box.pixels
            parts.append(f'<circle class="point{flag}" cx="{x:.3f}" cy="{y:.3f}" r="{max(w, h) / 100 + 2:.1f}"'
                         f'{_attrs(data_pixels=coords, data_problem=box.problem)}><title>{label}</title></circle>')
            anchor = (x + 6, y - 6)
        if label:
            parts.append(f'<text class="label" x="{anchor[0]:.1f}" y="{anchor[1]:.1f}">{label}</text>')
    parts.append("</svg>")
    original = f"{image.original[0]}x{image.original[1]} → " if image.original else ""
    caption = (f"image {image.number}: {html.escape(image.source)}<br>{original}<b>{w}x{h}</b> px, "
               f"<b>{image.tokens} tokens</b>, grid t,h,w = {image.grid[0]},{image.grid[1]},{image.grid[2]}")
    if image.boxes:
        caption += f"<br>{len(image.boxes)} grounding item(s), frame: {html.escape(family.grounding_frame())}"
        if family.grounding_range is None and image.original and image.original != image.size:
            caption += (f" (the answer's numbers are read as pixels of this {w}x{h} image, not of the "
                        f"{image.original[0]}x{image.original[1]} file)")
    for box in image.boxes:
        if box.problem:
            caption += (f'<br><span class="flag">⚠ {html.escape(box.grounding.label or "box")} '
                        f'{html.escape(box.grounding.text)}: {html.escape(box.problem)}</span>')
    return "".join(parts) + f"<figcaption>{caption}</figcaption></figure>"


def render_video(video: VideoView) -> str:
    """A video's sampled frames with their times."""
    frames = []
    for uri, index, seconds in video.frames:
        label = f"frame {index}, {seconds:.2f} s" if index is not None and seconds is not None else "frame"
        frames.append(f'<figure class="frame"{_attrs(data_frame=index if index is not None else "")}'
                      f'{_attrs(data_seconds=f"{seconds:.3f}" if seconds is not None else "")}>'
                      f'<img src="{uri}" alt="{label}"><figcaption>{label}</figcaption></figure>')
    w, h = video.size
    caption = (f"video {video.number}: {html.escape(video.source)}: {len(video.frames)} frames sampled, "
               f"<b>{w}x{h}</b> px each, <b>{sum(video.tokens)} tokens</b> in {len(video.tokens)} block(s), "
               f"grid t,h,w = {video.grid[0]},{video.grid[1]},{video.grid[2]}")
    if video.second_per_grid_t is not None:
        caption += f", {video.second_per_grid_t:.3g} s per temporal grid step"
    if video.block_seconds:
        caption += ", block timestamps " + ", ".join(f"&lt;{t:.1f} seconds&gt;" for t in video.block_seconds)
    if video.note:
        caption += f'<br><span class="flag">{html.escape(video.note)}</span>'
    return (f'<figure class="video"{_attrs(data_video=video.number, data_tokens=sum(video.tokens))}'
            f'{_attrs(data_grid=",".join(map(str, video.grid)))}><div class="frames">{"".join(frames)}</div>'
            f"<figcaption>{caption}</figcaption></figure>")


def video_block(videos: Sequence[VideoView], block: int) -> tuple[int, int]:
    """(video number, block number in it) of the ``block``-th video block of a sample; (-1, -1) past the end."""
    for video in videos:
        if block < len(video.tokens):
            return video.number, block
        block -= len(video.tokens)
    return -1, -1


def render_chat(segments: Sequence[Segment], images: Sequence[ImageView], videos: Sequence[VideoView]) -> str:
    """The tokens as text: learned runs highlighted, cut runs struck through, vision pads as one chip each."""
    parts = []
    for seg in segments:
        state = (" learned" if seg.learned else "") + (" cut" if seg.cut else "")
        if seg.kind == "text":
            parts.append(f'<span class="tok{state}" data-tokens="{seg.tokens}">{html.escape(seg.text)}</span>')
            continue
        if seg.kind == "image":
            image = images[seg.media] if seg.media < len(images) else None
            what = f"image {seg.media}" + (f" {image.size[0]}x{image.size[1]}" if image else "")
        else:
            video, block = video_block(videos, seg.media)
            what = f"video {video} block {block}" if video >= 0 else "video block"
        parts.append(f'<span class="pad {seg.kind}{state}" data-tokens="{seg.tokens}">'
                     f"[{what}: {seg.tokens} × &lt;|{seg.kind}_pad|&gt;]</span>")
    return f'<div class="chat">{"".join(parts)}</div>'


def render_sample(view: SampleView, family: Any) -> str:
    """One sample's section."""
    ref = view.ref
    where = f"{html.escape(ref.dataset)} · {html.escape(ref.annotation_path)}:{ref.index}"
    status = "bad" if view.problem else ("cut" if view.cut_tokens else "ok")
    head = (f'<section class="sample {status}"{_attrs(data_position=view.position, data_index=ref.index)}'
            f'{_attrs(data_dataset=ref.dataset, data_status=status)}><h2>#{view.position}: {where}</h2>')
    if view.problem:
        kind = html.escape(view.problem.kind)
        return (head + f'<p class="problem"{_attrs(data_kind=view.problem.kind)}>bad sample ({kind}): '
                f"{html.escape(view.problem.reason)}</p></section>")
    meta = f"{view.length} tokens"
    if view.cut_tokens:
        learned_cut = sum(s.tokens for s in view.segments if s.cut and s.learned)
        meta += (f'; <span class="flag">{view.cut_tokens} tokens cut by --model_max_length '
                 f'({learned_cut} of them answer tokens)</span>, {view.full_length} uncut')
    learned = sum(s.tokens for s in view.segments if s.learned and not s.cut)
    meta += f"; {learned} learned"
    body = [head, f'<p class="meta"{_attrs(data_length=view.length, data_full_length=view.full_length)}>{meta}</p>']
    if view.images or view.videos:
        body.append('<div class="media">' + "".join(render_image(i, family) for i in view.images)
                    + "".join(render_video(v) for v in view.videos) + "</div>")
    for text in view.unplaced:
        body.append(f'<p class="flag">grounding with no image before its answer: {html.escape(text)}</p>')
    body.append(render_chat(view.segments, view.images, view.videos))
    return "".join(body) + "</section>"


def render_page(views: Sequence[SampleView], summaries: Sequence[InputSummary], lengths: np.ndarray,
                bad: Sequence[Problem], args: argparse.Namespace, dataset: LazySupervisedDataset) -> str:
    """The whole HTML page."""
    family = dataset.family
    cfg = dataset.vision_config
    rows = ["<tr><th>input</th><th>location</th><th>records</th><th>kept (%N)</th><th>shown</th><th>bad</th>"
            "<th>cut to model_max_length</th></tr>"]
    shown_per = Counter(v.ref.dataset for v in views)
    for s, source in zip(summaries, dataset.annotations.sources):
        rows.append(f'<tr class="input"{_attrs(data_label=s.label, data_records=s.records, data_kept=s.kept)}'
                    f'{_attrs(data_bad=s.bad if s.bad is not None else "", data_shown=shown_per[source.name])}>'
                    f"<td>{html.escape(s.label)}</td><td>{html.escape(s.location)}</td><td>{s.records}</td>"
                    f"<td>{s.kept}</td><td>{shown_per[source.name]}</td><td>{'-' if s.bad is None else s.bad}</td>"
                    f"<td>{'-' if s.truncated is None else s.truncated}</td></tr>")
    counted = "every kept sample" if args.count == "all" else "the shown samples"
    stats = ""
    if len(lengths):
        stats = (f"{len(lengths)} good samples: min {int(lengths.min())}, median {int(np.median(lengths))}, "
                 f"mean {lengths.mean():.0f}, max {int(lengths.max())} tokens")
    bad_shown = sum(1 for v in views if v.problem)
    header = (
        f"<h1>Dataset preview: {html.escape(', '.join(s.label for s in summaries))}</h1>"
        f'<p class="meta" id="settings">model {html.escape(args.model_name_or_path)} ({family.model_type}); '
        f"model_max_length {args.model_max_length}; pixels per image {cfg.min_pixels}-{cfg.max_pixels} "
        f"(one token per {cfg.factor}x{cfg.factor} px); grounding frame: {html.escape(family.grounding_frame())}; "
        f"seed {args.seed}</p>"
        f'<table id="sizes">{"".join(rows)}</table>'
        f'<p id="counts"{_attrs(data_shown=len(views), data_bad_shown=bad_shown, data_bad=len(bad))}>'
        f"{len(views)} samples shown, {bad_shown} of them bad; {len(bad)} bad sample(s) among {counted}</p>"
        f"<h2>Token lengths of {counted}</h2>{histogram_svg(lengths, args.model_max_length)}"
        f'<p class="meta">{stats}</p>'
        '<p class="legend"><span class="tok learned">learned (labels != -100)</span> <span>prompt (not learned)'
        '</span> <span class="tok cut">cut by --model_max_length</span> <span class="pad">vision pads</span></p>'
    )
    samples = "".join(render_sample(v, family) for v in views)
    bad_rows = "".join(f'<tr class="bad-sample"{_attrs(data_kind=p.kind, data_index=p.index)}>'
                       f"<td>{html.escape(p.dataset)}</td><td>{html.escape(p.annotation_path)}:{p.index}</td>"
                       f"<td>{html.escape(p.kind)}</td><td>{html.escape(p.reason)}</td></tr>" for p in bad)
    kinds = Counter(p.kind for p in bad)
    bad_part = (f'<h2 id="bad">Bad samples ({len(bad)}{", " if kinds else ""}'
                f'{", ".join(f"{k}: {n}" for k, n in kinds.most_common())})</h2>')
    if bad:
        bad_part += ("<table><tr><th>dataset</th><th>sample</th><th>kind</th><th>reason</th></tr>"
                     f"{bad_rows}</table>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Dataset preview</title>"
            f"<style>{STYLE}</style></head><body>{header}{samples}{bad_part}</body></html>")


# -------------------------------------------------------------------------- main
def collect(dataset: LazySupervisedDataset, summaries: list[InputSummary], args: argparse.Namespace
            ) -> tuple[list[SampleView], np.ndarray, list[Problem]]:
    """Build the shown samples, the lengths for the histogram and the bad samples to list."""
    views = [build_view(dataset, position, args.image_format) for s in summaries
             for position in s.positions[:max(0, args.samples)]]
    bad: list[Problem] = [v.problem for v in views if v.problem is not None]
    if args.count == "shown":
        lengths = np.asarray([v.length for v in views if v.problem is None], dtype=np.int64)
        return views, lengths, bad
    counts = dataset.exact_lengths()
    shown = {v.position for v in views}
    for s in summaries:
        part = counts.length[s.positions.start:s.positions.stop]
        s.bad = int((part == BAD).sum())
        full = counts.full_length[s.positions.start:s.positions.stop]
        s.truncated = int(((part >= 0) & (full > part)).sum())
    for position in counts.bad.tolist():
        if position in shown or len(bad) >= args.max_bad:
            continue
        problem = dataset.load_sample(position)
        if isinstance(problem, Problem):
            bad.append(problem)
    bad.sort(key=lambda p: (p.dataset, p.index))
    lengths = counts.length[counts.length >= 0]
    return views, lengths, bad


def processor_family_refusal(model_name_or_path: str) -> str | None:
    """Why the page cannot be made for this checkpoint, read from its ``config.json`` alone, or None: the page
    draws Qwen-VL layouts (patch grids, ``<|image_pad|>`` blocks), not those of an HF-processor family
    (``family.uses_processor_items``: LLaVA & co.), whose samples tools/check_image.py checks instead.

    Example:
        >>> processor_family_refusal("tiny_model/llava")
        '--model_name_or_path tiny_model/llava: the llava family (LlavaForConditionalGeneration) builds ...'
    """
    config = read_json(Path(model_name_or_path) / "config.json")
    try:
        family = family_for(config) if config is not None else None
    except ValueError:
        return None  # load_checkpoint names the supported model types
    if family is None or not family.uses_processor_items:
        return None
    return (f"--model_name_or_path {model_name_or_path}: the {family.model_type} family ({family.model_class_name}) "
            f"builds its samples with its Hugging Face processor, which this page does not draw yet (it shows "
            f"Qwen-VL patch grids and image blocks); check its data with tools/check_image.py --model_name_or_path "
            f"{model_name_or_path}, which reports each image's size and tokens as that processor gives them")


def main(argv: list[str] | None = None) -> int:
    """Write the preview page; returns the exit status (0 no bad sample, 1 some)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # counting workers fork after the tokenizer was used
    parser = build_parser()
    args = parse_tool_args(parser, argv, CONFIG_KEYS, required=("model_name_or_path",))
    if args.samples < 0:
        parser.error(f"--samples should be 0 or more but found {args.samples}")
    unsupported = processor_family_refusal(args.model_name_or_path)
    if unsupported:
        parser.error(unsupported)
    try:
        load_dataset_registry(args.dataset_registry)
        data_args = preview_data_args(args)
        checkpoint = load_checkpoint(args.model_name_or_path, data_args)
        dataset = open_dataset(args, checkpoint)
    except ValueError as exc:
        parser.error(str(exc))
    labels = [spec.strip() for spec in args.inputs if spec.strip()]
    summaries = input_summaries(dataset, labels)
    views, lengths, bad = collect(dataset, summaries, args)
    page = render_page(views, summaries, lengths, bad, args, dataset)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB): {len(views)} samples shown, {len(bad)} bad sample(s) listed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
