"""Videos -> sampled frames -> pixel values and grids (SPEC 7; Qwen3-VL: SPEC 13), without torchvision.

Which frames and what size follow the checkpoint's family: Qwen2/2.5-VL sample about one frame
per ``--base_interval`` seconds within per-frame pixel limits (here); a family with its own rule
(``ModelFamily.video_frames``, Qwen3-VL: ``--video_fps`` and a pixel budget for the whole clip)
picks them itself and adds the timestamps of its temporal patches to the plan.

Flow, each step a function that can be called alone::

    probe_video (container metadata) -> sample_frame_indices -> read_frames (decord / PyAV / torchcodec)
    -> resize_frames (smart_resize within video_min/max_frame_pixels) -> patchify (shared with images)

The sampling plan (which frames, what size, the grid and ``second_per_grid_t``)
is a function of the container metadata alone, so ``video_grid_from_meta``
(used by the offline tools to count tokens without decoding) and
``load_video`` (used by training) can never disagree: ``load_video`` decodes
exactly the frames the plan names and resizes them to the planned size.

Backend: ``video_backend()`` picks, once, the first of decord, PyAV and
torchcodec that imports; ``$QWENVL_VIDEO_BACKEND`` or a ``backend=`` argument
override it. With the default choice a file the first backend cannot decode
is retried with the others; an explicit choice is used alone.

The probe demuxes every packet with PyAV (the checks of broken headers need
them). When PyAV also decodes, ``load_video`` opens the file once: the probe's
packet list is the reader's index. decord cannot take that list, and its own
numbers for broken files differ from the probe's, so with decord the file is
opened twice: by the probe, then by decord.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from qwenvl.data.vision import (
    IMAGE_MAGIC_LENGTH,
    ImageError,
    VisionConfig,
    image_format,
    media_file_problem,
    patchify,
    resize_frames,
    resolve_path,
    smart_resize,
)

logger = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav", "torchcodec")
BACKEND_ENV = "QWENVL_VIDEO_BACKEND"
_ALIASES = {"av": "pyav", "pyav": "pyav", "decord": "decord", "torchcodec": "torchcodec"}
# One decoder thread per video: training parallelises over videos with dataloader workers.
DECODER_THREADS = 1


class VideoError(ValueError):
    """A video that cannot be used (missing, unreadable, broken metadata); the message names the file."""


class VideoMeta(NamedTuple):
    """What the container says about the video stream; enough to plan sampling."""

    num_frames: int
    fps: float
    height: int
    width: int


class VideoPlan(NamedTuple):
    """Which frames to decode and how to cut them (see ``plan_video``)."""

    indices: np.ndarray  # (n,) int64 frame indices, sorted, unique
    height: int  # resized frame height, a multiple of patch_size * merge_size
    width: int
    grid_thw: tuple[int, int, int]  # (ceil(n / temporal_patch_size), height / patch, width / patch)
    second_per_grid_t: float  # seconds covered by one temporal grid step
    timestamps: tuple[float, ...] | None = None  # seconds of each temporal patch, for families that write them


# ------------------------------------------------------------------ backend
@functools.lru_cache(maxsize=None)
def _import_error(backend: str) -> str | None:
    """None when ``backend`` imports, else why not."""
    module = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}[backend]
    try:
        __import__(module)
    # Compiled extensions fail in many ways (torchcodec raises RuntimeError/OSError when
    # its FFmpeg or CUDA libraries are missing), not only with ImportError.
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def available_backends() -> list[str]:
    """The backends that import here, in preference order.

    Example:
        >>> available_backends()  # on a CPU box with decord and av installed
        ['decord', 'pyav']
    """
    return [name for name in BACKENDS if _import_error(name) is None]


_default_backend: str | None = None
_reported: set[str] = set()


def video_backend(name: str | None = None) -> str:
    """The decoder to use: ``name``, else ``$QWENVL_VIDEO_BACKEND``, else the first that imports.

    The default (first of decord, pyav, torchcodec that imports) is chosen once
    per process; every choice is logged once.

    Args:
        name: ``"decord"``, ``"pyav"`` (or ``"av"``), ``"torchcodec"``, or None.

    Returns:
        the canonical backend name.

    Raises:
        ValueError: an unknown name, or a requested backend that does not import.
        VideoError: no backend imports at all.

    Example:
        >>> video_backend("av")
        'pyav'
    """
    global _default_backend
    requested, source = name, "argument"
    if not requested:
        requested, source = os.environ.get(BACKEND_ENV) or None, f"${BACKEND_ENV}"
    if requested:
        backend = _ALIASES.get(requested.strip().lower())
        if backend is None:
            raise ValueError(f"video backend should be one of {', '.join(BACKENDS)} but found {requested!r} ({source})")
        error = _import_error(backend)
        if error is not None:
            raise ValueError(f"video backend {backend!r} was requested ({source}) but does not import: {error}")
        reason = f"set by {source}"
    else:
        if _default_backend is None:
            found = available_backends()
            if not found:
                errors = "; ".join(f"{b}: {_import_error(b)}" for b in BACKENDS)
                raise VideoError(f"no video decoder imports ({errors}); install decord or av")
            _default_backend = found[0]
        backend, reason = _default_backend, f"first that imports of {', '.join(BACKENDS)}"
    if backend not in _reported:
        _reported.add(backend)
        logger.info("video backend: %s (%s; override with $%s)", backend, reason, BACKEND_ENV)
    return backend


# ----------------------------------------------------------------- metadata
# A frame rate outside this range is a broken header (90000 is a timestamp clock mistaken for a rate;
# 1/1024 a zero time scale), not a real video: sampling by duration would be meaningless.
MIN_FPS = 0.01  # one frame per 100 s (slide shows, time lapses) is the slowest believable rate
MAX_FPS = 1000.0  # high-speed footage is stored at its playback rate, far below this
# The frames' timestamps may span a different time than frames / fps (variable frame rate): within
# this factor, or within DURATION_SLACK seconds, that is normal; beyond it the metadata lies.
DURATION_FACTOR = 2.0
DURATION_SLACK = 1.0
# A still image (vision.IMAGE_MAGIC) listed under "video" is a mistake, not a 1-frame video; GIF is the
# exception: an animated GIF is a legitimate clip.
VIDEO_IMAGE_FORMATS = ("GIF",)


def check_video_meta(path: str, meta: VideoMeta, timestamps_duration: float | None = None) -> VideoMeta:
    """Refuse metadata that would make frame sampling meaningless.

    Args:
        path: the file, for messages.
        meta: what the container says.
        timestamps_duration: seconds the frames' timestamps span (last - first + one
            frame), when known; compared with ``num_frames / fps``.

    Returns:
        ``meta`` unchanged.

    Raises:
        VideoError: no frames or no size; fps not finite, not positive, or outside
            ``[MIN_FPS, MAX_FPS]``; or a duration that disagrees with frames / fps by
            more than ``DURATION_FACTOR`` (and ``DURATION_SLACK`` seconds).

    Example:
        >>> check_video_meta("a.mp4", VideoMeta(24, 90000.0, 48, 64))
        Traceback (most recent call last):
        qwenvl.data.video.VideoError: broken video metadata in a.mp4: 90000 fps is outside [0.01, 1000] ...
    """
    if meta.num_frames < 1 or not (math.isfinite(meta.fps) and meta.fps > 0) or meta.height < 1 or meta.width < 1:
        raise VideoError(
            f"broken video metadata in {path}: expected frames >= 1, fps > 0 and a non-empty frame size but found "
            f"{meta.num_frames} frames at {meta.fps} fps, {meta.width}x{meta.height}"
        )
    if not MIN_FPS <= meta.fps <= MAX_FPS:
        raise VideoError(
            f"broken video metadata in {path}: {meta.fps:g} fps is outside [{MIN_FPS:g}, {MAX_FPS:g}] (a broken "
            f"header: the frame rate is not believable); re-encode the video with its real frame rate"
        )
    if timestamps_duration is not None:
        expected = meta.num_frames / meta.fps
        low, high = sorted((expected, timestamps_duration))
        if not math.isfinite(timestamps_duration) or (high > DURATION_FACTOR * low
                                                       and high - low > DURATION_SLACK):
            raise VideoError(
                f"inconsistent video metadata in {path}: {meta.num_frames} frames at {meta.fps:g} fps last "
                f"{expected:.3f} s but the frames' timestamps span {timestamps_duration:.3f} s; re-encode the "
                f"video at a constant frame rate"
            )
    return meta


def _still_image_format(path: str) -> str | None:
    """The still-image format ``path`` starts with (``"PNG"``, ``"JPEG"`` ...), or None (GIF: a clip)."""
    with open(path, "rb") as handle:
        found = image_format(handle.read(IMAGE_MAGIC_LENGTH))
    return None if found in VIDEO_IMAGE_FORMATS else found


class _PacketScan(NamedTuple):
    """What one demux pass of PyAV learns: the checked metadata and every frame's packet."""

    meta: VideoMeta
    stream: Any  # the container's first video stream
    packets: list[tuple[int | None, bool]]  # (pts, is_keyframe) of every non-empty packet, in file order


def _scan_pyav(container: Any, path: str) -> _PacketScan:
    """Header numbers of an open container, checked against the packets the file really holds.

    Every packet is demuxed (read, not decoded): a header that promises more frames than the
    file holds (a truncated download, an edited header), timestamps shared by several frames,
    or timestamps that span a different time than frames / fps are refused here, before any
    backend would silently repeat or substitute frames. The packets come back, so that a
    PyAV decode of the same container needs no second pass (``_load_pyav``).

    Args:
        container (Any): ``av.open(path)``, not yet demuxed.
        path (str): the file, for messages.

    Returns:
        _PacketScan: the metadata (checked by ``check_video_meta``), the video stream, its packets.

    Raises:
        VideoError: a still image, no video stream or packets, or broken metadata (see above).
    """
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise VideoError(f"{path} is a still image ({fmt}), not a video: list it under 'image' with an <image> "
                         f"tag")
    if not container.streams.video:
        raise VideoError(f"{path} has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    header_frames = int(stream.frames or 0)
    packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
    time_base = float(stream.time_base) if stream.time_base else None
    height, width = stream.codec_context.height, stream.codec_context.width
    pts = [number for number, _ in packets]
    if not pts:
        raise VideoError(f"{path} has no video packets")
    # No frame count in the header (Matroska, WebM, some AVI): count the packets, as decord does.
    meta = VideoMeta(header_frames or len(pts), fps, int(height), int(width))
    check_video_meta(path, meta)  # a nonsense rate or size first: it is the root cause of what follows
    if header_frames > len(pts):
        raise VideoError(
            f"broken video {path}: the header promises {header_frames} frames but the file holds only {len(pts)} "
            f"(a truncated file or an edited header); its frames cannot be sampled as planned"
        )
    span = None
    if None not in pts:
        unique = len(set(pts))
        if unique < len(pts):
            raise VideoError(f"broken timestamps in {path}: {len(pts)} frames share {unique} timestamps, so frames "
                             f"cannot be told apart; re-encode the video")
        if time_base and fps > 0:
            span = (max(pts) - min(pts)) * time_base + 1 / fps
    return _PacketScan(check_video_meta(path, meta, span), stream, packets)


def _probe_pyav(path: str) -> VideoMeta:
    """Header numbers, checked against the packets the file really holds (``_scan_pyav``); nothing is decoded."""
    import av

    with av.open(path) as container:
        return _scan_pyav(container, path).meta


def _probe_torchcodec(path: str) -> VideoMeta:
    from torchcodec.decoders import VideoDecoder

    metadata = VideoDecoder(path, device="cpu").metadata
    return VideoMeta(int(metadata.num_frames or 0), float(metadata.average_fps or 0.0),
                     int(metadata.height), int(metadata.width))


def _probe_decord(path: str) -> VideoMeta:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECODER_THREADS)
    height, width = reader[0].shape[:2]  # decord has no size accessor: this decodes frame 0
    return VideoMeta(len(reader), float(reader.get_avg_fps()), int(height), int(width))


def _check_video_file(path: str) -> None:
    """Refuse a path that cannot be a video before any decoder opens it.

    Raises:
        VideoError: missing (or a broken link, a symlink loop), a directory, or a still image.
    """
    missing = media_file_problem(path, "video")
    if missing is not None:
        raise VideoError(missing)
    if os.path.isdir(path):
        raise VideoError(f"video file {path} is a directory")
    still = _still_image_format(path)
    if still is not None:
        raise VideoError(f"{path} is a {still} image, not a video: list it under 'image' with an <image> tag")


def probe_video(path: str, data_path: str = "") -> VideoMeta:
    """(num_frames, fps, height, width) of a video from its container, without decoding frames.

    The numbers follow decord's rule, which the original framework sampled
    with: frames = the stream's frame count from the header, or the number of
    packets when the header has none; fps = the stream's average frame rate.
    PyAV reads them from the header; without PyAV, torchcodec's metadata or
    decord (which decodes frame 0 for the size) are used.

    Args:
        path: video file, relative to ``data_path`` unless absolute.
        data_path: folder of the dataset's media ("" = as written).

    Returns:
        VideoMeta(num_frames, fps, height, width).

    Raises:
        VideoError: the file is missing or unreadable, or its metadata is broken.

    Example:
        >>> probe_video("videos/red_square.mp4", "demo")
        VideoMeta(num_frames=12, fps=12.0, height=84, width=112)
    """
    path = resolve_path(path, data_path)
    _check_video_file(path)
    probes = {"pyav": _probe_pyav, "torchcodec": _probe_torchcodec, "decord": _probe_decord}
    order = [name for name in ("pyav", "torchcodec", "decord") if _import_error(name) is None]
    if not order:
        video_backend()  # raises the "no decoder" error
    errors = []
    for name in order:
        try:
            return check_video_meta(path, probes[name](path))
        except VideoError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise library-specific errors
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise VideoError(f"cannot read video {path} ({'; '.join(errors)})")


# ----------------------------------------------------------------- sampling
def sample_frame_indices(
    total_frames: int, fps: float, base_interval: float, min_frames: int, max_frames: int
) -> np.ndarray:
    """Frame indices to decode, per SPEC 7 (the original framework's rule).

    ``duration = total_frames / fps``; ``n = round(duration / base_interval)``
    (Python's round, halves to even) clamped to ``[min_frames, max_frames]``;
    indices ``= unique(linspace(0, total_frames - 1, n).astype(int))``. A clip
    with fewer frames than ``n`` yields fewer (unique) indices.

    Args:
        total_frames: frames in the video (``probe_video``).
        fps: average frame rate.
        base_interval: seconds between sampled frames (``--base_interval``).
        min_frames: ``--video_min_frames``.
        max_frames: ``--video_max_frames``.

    Returns:
        (n_unique,) int64, sorted.

    Raises:
        ValueError: non-positive frames, fps or interval, or min_frames > max_frames.

    Example:
        >>> sample_frame_indices(12, 12.0, 2, 4, 8).tolist()  # 1 s: round(0.5) = 0 -> 4 frames
        [0, 3, 7, 11]
        >>> sample_frame_indices(3, 6.0, 2, 4, 8).tolist()  # 3 frames cannot give 4
        [0, 1, 2]
    """
    if total_frames < 1 or not fps > 0 or not base_interval > 0:
        raise ValueError(
            "expected total_frames >= 1, fps > 0 and base_interval > 0 but found "
            f"{total_frames}, {fps}, {base_interval}"
        )
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"expected 1 <= min_frames <= max_frames but found {min_frames}, {max_frames}")
    duration = total_frames / fps
    n = min(max(round(duration / base_interval), min_frames), max_frames)
    return np.unique(np.linspace(0, total_frames - 1, n).astype(np.int64))


def clip_frames(total_frames: int, fps: float, max_duration: float | None) -> int:
    """Frames of a clip that sampling sees: the first ``max_duration`` seconds (``--video_max_duration``).

    Example:
        >>> clip_frames(120, 12.0, 2.5), clip_frames(120, 12.0, None)
        (30, 120)
    """
    if max_duration is None:
        return total_frames
    return max(1, min(total_frames, int(math.floor(max_duration * fps + 1e-9))))


def second_per_grid_t(num_sampled: int, duration: float, temporal_patch_size: int) -> float:
    """Seconds covered by one temporal grid step: ``temporal_patch_size / (num_sampled / duration)``.

    ``num_sampled`` is the number of frames actually decoded, i.e. counted after
    ``unique`` (the original computes ``fps = len(frame_idx) / video_length``
    from the de-duplicated indices). Fractions are kept: never truncated to int.

    Example:
        >>> second_per_grid_t(4, 1.0, 2), second_per_grid_t(8, 1.0, 2)
        (0.5, 0.25)
    """
    sampled_fps = num_sampled / duration
    return float(temporal_patch_size / sampled_fps)


def plan_video(meta: VideoMeta | Sequence, data_args: Any, cfg: VisionConfig, family: Any = None,
               settings: Any = None) -> VideoPlan:
    """Which frames, what size, which grid: everything ``load_video`` will do, from metadata alone.

    Qwen2/2.5-VL (``family`` None or one without its own rule): SPEC 7, ``base_interval``
    and the frame-pixel flags. A family with its own rule (``family.video_frames``, Qwen3-VL:
    ``--video_fps`` and the clip pixel budget) picks the frames and size and gives the
    timestamps of its temporal patches.

    Args:
        meta (VideoMeta | Sequence): (num_frames, fps, height, width), e.g. from ``probe_video``.
        data_args (Any): has ``base_interval``, ``video_min_frames``, ``video_max_frames``,
            ``video_min_frame_pixels`` and ``video_max_frame_pixels`` (and ``video_fps``,
            ``video_min_pixels``, ``video_max_pixels`` for Qwen3-VL).
        cfg (VisionConfig): patch geometry.
        family (Any): the checkpoint's ``ModelFamily``; None = the Qwen2/2.5-VL rule.
        settings (Any): the checkpoint's ``VisionSettings`` (defaults of the video flags).

    Returns:
        VideoPlan: indices, height, width, grid_thw, second_per_grid_t, timestamps.

    Raises:
        VideoError: the frame size cannot be resized (aspect ratio over 200).
    """
    num_frames, fps, height, width = meta
    num_frames = clip_frames(num_frames, fps, getattr(data_args, "video_max_duration", None))
    try:
        own = family.video_frames(num_frames, fps, height, width, data_args, settings) if family is not None else None
    except ValueError as exc:  # the family's rule refusing the frame size
        raise VideoError(f"video frames cannot be resized: {exc}") from None
    if own is not None:
        indices, timestamps = own[0], tuple(own[3])
        resized_h, resized_w = own[1], own[2]
    else:
        indices = sample_frame_indices(num_frames, fps, data_args.base_interval, data_args.video_min_frames,
                                       data_args.video_max_frames)
        timestamps = None
        try:
            resized_h, resized_w = smart_resize(height, width, cfg.factor, data_args.video_min_frame_pixels,
                                                data_args.video_max_frame_pixels)
        except ImageError as exc:
            raise VideoError(f"video frames cannot be resized: {exc}") from None
    grid_t = -(-len(indices) // cfg.temporal_patch_size)  # odd counts are padded with the last frame
    grid = (grid_t, resized_h // cfg.patch_size, resized_w // cfg.patch_size)
    seconds = second_per_grid_t(len(indices), num_frames / fps, cfg.temporal_patch_size)
    return VideoPlan(indices, resized_h, resized_w, grid, seconds, timestamps)


def video_grid_from_meta(
    num_frames: int, fps: float, height: int, width: int, data_args: Any, cfg: VisionConfig, family: Any = None,
    settings: Any = None,
) -> tuple[tuple[int, int, int], float]:
    """Grid (t, h, w) and seconds per temporal grid step of a video, without decoding it.

    Equals what ``load_video`` returns for a file whose ``probe_video`` gives
    these numbers (both go through ``plan_video``).

    Example:
        >>> args = DataArguments()  # base_interval 2, 4-8 frames, 4-32 x 28*28 pixels per frame
        >>> video_grid_from_meta(12, 12.0, 84, 112, args, VisionConfig())
        ((2, 6, 8), 0.5)
    """
    plan = plan_video((num_frames, fps, height, width), data_args, cfg, family, settings)
    return plan.grid_thw, plan.second_per_grid_t


# ----------------------------------------------------------------- decoding
def _read_decord(path: str, indices: np.ndarray) -> np.ndarray:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECODER_THREADS)
    _check_in_range(path, indices, len(reader))
    return reader.get_batch(indices.tolist()).asnumpy()


def _check_in_range(path: str, indices: np.ndarray, num_frames: int) -> None:
    """Refuse frame numbers past the last frame the decoder has (never read the last frame instead)."""
    if int(indices.max()) >= num_frames:
        raise VideoError(f"{path}: frame {int(indices.max())} was planned but only {num_frames} frames decode "
                         f"(the header promises more frames than the file holds)")


def _read_torchcodec(path: str, indices: np.ndarray) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, device="cpu", seek_mode="exact", num_ffmpeg_threads=DECODER_THREADS)
    _check_in_range(path, indices, len(decoder))
    frames = decoder.get_frames_at(indices=indices.tolist()).data  # (n, 3, H, W) uint8
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _read_pyav(path: str, indices: np.ndarray) -> np.ndarray:
    """Frame ``i`` is the frame with the i-th smallest packet pts (decord's numbering); see ``_decode_pyav``."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
        return _decode_pyav(path, container, stream, packets, indices)


def _decode_pyav(path: str, container: Any, stream: Any, packets: list[tuple[int | None, bool]],
                 indices: np.ndarray) -> np.ndarray:
    """Decode the frames at ``indices`` from an open container whose packets were already demuxed.

    Frame ``i`` is the frame with the i-th smallest packet pts (decord's numbering). Seeks to
    the keyframe before each wanted frame unless it is cheaper to keep decoding, so a long
    video costs about one GOP per sampled frame.

    Args:
        path (str): the file, for messages.
        container (Any): the open ``av`` container (any read position: every decode starts with a seek).
        stream (Any): its video stream, not yet decoded from.
        packets (list[tuple[int | None, bool]]): (pts, is_keyframe) of the stream's non-empty packets.
        indices (np.ndarray): (n,) frame numbers.

    Returns:
        np.ndarray: (n, H, W, 3) uint8 RGB.

    Raises:
        VideoError: no packets, a frame past the last one, or a frame that does not decode.
    """
    stream.thread_count = DECODER_THREADS
    if not packets:
        raise VideoError(f"{path} has no video packets")
    if any(pts is None for pts, _ in packets):
        return _read_pyav_in_order(container, stream, indices)
    frame_pts = sorted(pts for pts, _ in packets)
    keyframes = sorted(pts for pts, key in packets if key) or frame_pts[:1]
    _check_in_range(path, indices, len(frame_pts))
    slots: dict[int, list[int]] = {}
    number_of = {}
    for slot, index in enumerate(indices.tolist()):
        slots.setdefault(frame_pts[index], []).append(slot)
        number_of[frame_pts[index]] = index
    out: list[np.ndarray | None] = [None] * len(indices)
    decoded, last_pts, frame = None, None, None
    for target in sorted(slots):
        keyframe = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
        if decoded is None or last_pts is None or target <= last_pts or keyframe > last_pts:
            container.seek(keyframe, stream=stream, backward=True)
            decoded = container.decode(stream)
        # Decode up to the frame whose pts is `target`; any other frame in its place (the stream
        # ended first, or that frame was lost) would be a silent substitute: refuse it.
        for frame in decoded:
            last_pts = frame.pts
            if frame.pts is not None and frame.pts >= target:
                break
        if frame is None:
            raise VideoError(f"{path}: no frame decodes")
        if frame.pts != target:
            found = "the stream ended before it" if frame.pts is None or frame.pts < target else \
                f"the decoder went on to pts {frame.pts}"
            raise VideoError(f"{path}: frame {number_of[target]} (pts {target}) does not decode ({found})")
        array = _rgb(frame)
        for slot in slots[target]:
            out[slot] = array
    return np.stack(out)


def _rgb(frame: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded PyAV frame.

    One conversion thread: swscale's default (one per core) spends more time starting threads
    than converting a frame, and training parallelises over videos anyway (``DECODER_THREADS``).
    """
    return frame.to_ndarray(format="rgb24", threads=DECODER_THREADS)


def _read_pyav_in_order(container: Any, stream: Any, indices: np.ndarray) -> np.ndarray:
    """Fallback for streams without timestamps: frame i is the i-th decoded frame."""
    container.seek(0)
    wanted = set(indices.tolist())
    frames: dict[int, np.ndarray] = {}
    last = None
    for number, frame in enumerate(container.decode(stream)):
        if number in wanted:
            frames[number] = _rgb(frame)
        last = frame
        if number >= indices.max():
            break
    if last is None:
        raise VideoError("no frame decodes")
    lost = [i for i in indices.tolist() if i not in frames]
    if lost:
        raise VideoError(f"frame {lost[0]} was planned but only {number + 1} frames decode")
    return np.stack([frames[i] for i in indices.tolist()])


_READERS = {"decord": _read_decord, "pyav": _read_pyav, "torchcodec": _read_torchcodec}


def _first_decoder(backend: str | None) -> str | None:
    """The decoder ``read_frames`` would try first; None when the choice itself fails.

    The failure is left to ``read_frames``, which reports it where it always did: after the probe.
    """
    try:
        return video_backend(backend)
    except (ValueError, VideoError):
        return None


def read_frames(path: str, indices: Sequence[int] | np.ndarray, backend: str | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (0-based, presentation order) as uint8 RGB.

    Every index must decode to its own frame: an index past the last frame, or a
    frame that does not decode, is an error (never the last frame read twice).

    Args:
        path: video file.
        indices: frame indices, e.g. from ``sample_frame_indices``.
        backend: ``decord`` / ``pyav`` / ``torchcodec``; None = ``video_backend()``,
            retrying with the other available backends when it fails on this file.

    Returns:
        (len(indices), H, W, 3) uint8.

    Raises:
        VideoError: the file is missing or no backend decodes it; the message names the file.

    Example:
        >>> read_frames("demo/videos/red_square.mp4", [0, 11]).shape
        (2, 84, 112, 3)
    """
    missing = media_file_problem(path, "video")
    if missing is not None:
        raise VideoError(missing)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or not len(indices) or indices.min() < 0:
        raise ValueError(f"indices should be a non-empty list of frame numbers >= 0 but found {indices.tolist()}")
    order = _decoder_order(backend)
    errors = []
    for name in order:
        try:
            frames = _READERS[name](path, indices)
        except Exception as exc:  # noqa: BLE001 - decoders raise library-specific errors
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            if len(order) > 1:
                logger.warning("cannot decode %s (%s)%s", path, errors[-1],
                               "; trying the next backend" if name != order[-1] else "")
            continue
        problem = _frames_problem(frames, len(indices))
        if problem is not None:
            errors.append(f"{name}: {problem}")
            continue
        return np.ascontiguousarray(frames, dtype=np.uint8)
    raise VideoError(f"cannot decode video {path} ({'; '.join(errors)})")


def _decoder_order(backend: str | None) -> list[str]:
    """The decoders ``read_frames`` tries, in order: a named one (argument or environment) alone, else all."""
    first = video_backend(backend)
    if backend or os.environ.get(BACKEND_ENV):
        return [first]
    return [first] + [name for name in available_backends() if name != first]


def _frames_problem(frames: np.ndarray, count: int) -> str | None:
    """Why a decoder's output is not ``count`` RGB frames (None when it is)."""
    if frames.ndim != 4 or frames.shape[0] != count or frames.shape[-1] != 3:
        return f"decoded shape {frames.shape}, expected ({count}, H, W, 3)"
    return None


def _load_pyav(path: str, plan_for: Callable[[VideoMeta], VideoPlan]) -> tuple[np.ndarray, VideoPlan] | None:
    """Probe, plan and decode with PyAV in one open and one demux pass of the file.

    The probe's packet scan (``_scan_pyav``, what ``probe_video`` runs) already lists every
    packet the reader needs (``_decode_pyav``, what ``read_frames`` runs), so neither the file
    nor its packets are read twice. The metadata, the plan, the frames and every refusal of a
    broken file are those of ``probe_video`` + ``read_frames``.

    Args:
        path (str): the video file, already through ``_check_video_file``.
        plan_for (Callable[[VideoMeta], VideoPlan]): the sampling plan of the metadata.

    Returns:
        tuple[np.ndarray, VideoPlan] | None: frames (n, H, W, 3) uint8 and the plan; None when
        PyAV fails on this file in a way ``probe_video`` / ``read_frames`` report with the other
        decoders' reasons (or retry with them): the caller then takes that path.

    Raises:
        VideoError: broken metadata, as ``probe_video`` words it, or a frame size ``plan_for`` refuses.
    """
    import av

    try:
        container = av.open(path)
    except Exception:  # noqa: BLE001 - probe_video words it, with the other decoders' reasons
        return None
    with container:
        try:
            scan = _scan_pyav(container, path)
        except VideoError:
            raise
        except Exception:  # noqa: BLE001 - as above
            return None
        plan = plan_for(scan.meta)
        try:
            frames = _decode_pyav(path, container, scan.stream, scan.packets, plan.indices)
        except Exception:  # noqa: BLE001 - read_frames words it, or decodes with the next backend
            return None
    if _frames_problem(frames, len(plan.indices)) is not None:
        return None
    return np.ascontiguousarray(frames, dtype=np.uint8), plan


def load_video_plan(
    source: str,
    data_path: str,
    data_args: Any,
    vision_config: VisionConfig,
    backend: str | None = None,
    family: Any = None,
    settings: Any = None,
) -> tuple[np.ndarray, VideoPlan]:
    """Probe, sample, decode, resize and patchify one video; the plan it followed comes back too.

    The result and the errors are those of ``probe_video`` -> ``plan_video`` -> ``read_frames``.
    When PyAV decodes, the file is opened and demuxed once (``_load_pyav``): the probe's packet
    list is the reader's index.

    Args:
        source (str): video path, relative to ``data_path`` unless absolute.
        data_path (str): the dataset's media folder.
        data_args (Any): frame sampling and pixel limits (see ``plan_video``).
        vision_config (VisionConfig): patch geometry and normalisation.
        backend (str | None): decoder override (see ``read_frames``).
        family (Any): the checkpoint's ``ModelFamily`` (see ``plan_video``).
        settings (Any): the checkpoint's ``VisionSettings``.

    Returns:
        tuple[np.ndarray, VideoPlan]: pixel_values_videos (t * h * w, 3 * temporal_patch_size *
        patch_size**2) float32, and the plan (``grid_thw``, ``second_per_grid_t``, ``timestamps``).

    Raises:
        VideoError: missing, unreadable or broken file; the message names the path.
    """
    if not isinstance(source, str) or not source:
        raise VideoError(f"video reference must be a non-empty path string, got {source!r}")
    path = resolve_path(source, data_path)

    def plan_for(meta: VideoMeta) -> VideoPlan:
        return plan_video(meta, data_args, vision_config, family, settings)

    loaded = None
    if _first_decoder(backend) == "pyav":  # PyAV probes too: one open and one demux pass (_load_pyav)
        _check_video_file(path)
        loaded = _load_pyav(path, plan_for)
    if loaded is None:  # probe with PyAV (or what imports), decode with the first decoder that can
        plan = plan_for(probe_video(path))
        frames = read_frames(path, plan.indices, backend)  # (n, H, W, 3) uint8
    else:
        frames, plan = loaded
    frames = resize_frames(frames, plan.height, plan.width)  # (n, height, width, 3)
    pixel_values, grid = patchify(frames, vision_config)  # (t * h * w, 1176)
    if grid != plan.grid_thw:
        raise RuntimeError(f"{path}: patchified grid {grid} differs from the planned grid {plan.grid_thw}")
    return pixel_values, plan


def load_video(
    source: str,
    data_path: str,
    data_args: Any,
    vision_config: VisionConfig,
    backend: str | None = None,
    family: Any = None,
    settings: Any = None,
) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Probe, sample, decode, resize and patchify one video (``load_video_plan`` without the plan).

    Returns:
        pixel_values_videos: (t * h * w, 3 * temporal_patch_size * patch_size**2) float32,
        grid_thw: (t, h, w) ints, equal to ``video_grid_from_meta(*probe_video(source, data_path), ...)``,
        second_per_grid_t: float seconds per temporal grid step.

    Raises:
        VideoError: missing, unreadable or broken file; the message names the path.

    Example:
        >>> pv, grid, seconds = load_video("videos/red_square.mp4", "demo", DataArguments(), VisionConfig())
        >>> pv.shape, grid, seconds
        ((96, 1176), (2, 6, 8), 0.5)
    """
    pixel_values, plan = load_video_plan(source, data_path, data_args, vision_config, backend, family, settings)
    return pixel_values, plan.grid_thw, plan.second_per_grid_t
