"""Exact token counts of samples without decoding pixels: what ``LazySupervisedDataset[i]`` will hold.

``TokenCounter.count(sample).length == len(dataset[i]["input_ids"])`` by construction:

- the record goes through the dataset's own checks (``validation.check_record``), and text
  through its encoder (``ChatEncoder.encode``);
- ``model_max_length`` is applied by ``encode_sample``, which the dataset calls too;
- image grids come from the file header (``vision.image_size``, EXIF orientation
  included, as ``vision.open_image`` applies it) and ``smart_resize``, the same
  rule ``vision.process_image`` applies to the decoded image;
- video grids come from the container metadata (``video.probe_video``) and the
  frame rule (``video.video_grid_from_meta``), the plan ``video.load_video`` decodes.
  The probe also demuxes (reads, never decodes) every packet, so a header that
  promises frames the file does not hold, nonsense fps or timestamps, and a still
  image named as a video are rejected here exactly as training rejects them.

What a header cannot show (a truncated JPEG body, a video packet that does not
decode) is counted as valid; ``tools/check_image.py`` finds such files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qwenvl.data.chat import (  # noqa: F401 - SampleError, fit_max_length, encode_sample re-exported
    BadSampleError,
    ChatEncoder,
    SampleError,
    encode_sample,
    fit_max_length,
)
from qwenvl.data.validation import CheckedRecord, check_record, video_block_tokens, with_io_retries
from qwenvl.data.video import VideoError, plan_video, probe_video
from qwenvl.data.vision import (
    ImageError,
    VisionConfig,
    image_grid_thw,
    image_size,
    is_transient_io_error,
    media_file_problem,
    num_vision_tokens,
    resolve_path,
)

# Bump when the meaning of a cached count changes. Edits of the code a count runs through are
# caught without a bump: ``code_fingerprint`` hashes those modules' source.
COUNT_VERSION = 1
COUNT_MODULES = ("qwenvl.data.token_count", "qwenvl.data.chat", "qwenvl.data.data_qwen", "qwenvl.data.validation",
                 "qwenvl.data.vision", "qwenvl.data.video", "qwenvl.models.base", "qwenvl.models.qwen2_vl",
                 "qwenvl.models.qwen2_5_vl", "qwenvl.models.qwen3_vl")

# Status of a sample the dataset yields; any other kind is a ``BadSampleError`` kind.
OK, TRUNCATED = "ok", "truncated"
VIDEO_FLAGS = ("base_interval", "video_min_frames", "video_max_frames", "video_min_frame_pixels",
               "video_max_frame_pixels", "video_fps", "video_min_pixels", "video_max_pixels", "video_max_duration")


@dataclass(frozen=True)
class TokenCount:
    """The count of one sample.

    Attributes:
        length: ``len(dataset[i]["input_ids"])``; 0 when the dataset rejects the sample.
        full_length: tokens before ``model_max_length`` (0 when the sample fails before encoding).
        kind: ``"ok"``, ``"truncated"`` (cut to model_max_length), or the ``BadSampleError``
            kind the dataset raises (``over_length``, ``bad_image``, ``bad_video``,
            ``bad_conversation``, ``tag_mismatch``, ``no_labels``, ``invalid``).
        reason: why the sample is rejected ("" when it is not).
    """

    length: int
    full_length: int
    kind: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when the dataset yields this sample (possibly truncated)."""
        return self.kind in (OK, TRUNCATED)

    def to_json(self) -> list:
        """Compact form for the count cache: ``[length, full_length, kind, reason]``."""
        return [self.length, self.full_length, self.kind, self.reason]

    @classmethod
    def from_json(cls, value: Sequence) -> "TokenCount":
        """Inverse of ``to_json``."""
        length, full_length, kind, reason = value
        return cls(int(length), int(full_length), str(kind), str(reason))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides the tokenizer's ids: its full serialisation.

    Fast tokenizers hash ``backend_tokenizer.to_str()`` (vocabulary, merges,
    normaliser, pre-tokeniser and added tokens); others hash the sorted vocabulary.

    Example:
        >>> tokenizer_fingerprint(AutoTokenizer.from_pretrained("tiny_model/qwen2_5_vl"))[:12]
        '41e00eccf531'
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the source of every module a count runs through (``COUNT_MODULES``).

    Any edit there, even a comment, invalidates cached counts: recounting is cheap, a stale
    count is not. Read once per process, i.e. the code this process runs.
    """
    import importlib

    digest = hashlib.sha256()
    for name in COUNT_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None)
        if path and os.path.exists(path):
            with open(path, "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read())
    return digest.hexdigest()


def _flag(value: Any) -> float | None:
    """A video flag as a float for the cache key (None stays None: the checkpoint's default)."""
    return None if value is None else float(value)


class TokenCounter:
    """Counts tokens of samples without decoding pixels; see the module docstring.

    Args:
        tokenizer: the checkpoint's tokenizer.
        data_args: ``DataArguments`` (or any object with the video flags
            ``base_interval``, ``video_min_frames``, ``video_max_frames``,
            ``video_min_frame_pixels``, ``video_max_frame_pixels``).
        vision_config: patch geometry and image pixel limits, as in training.
        model_max_length: training's ``--model_max_length`` (None = no limit).
        io_retries: retries of transient I/O errors per sample, as the dataset's.
        io_backoff: seconds before the first retry; doubles each time.
        family: the checkpoint's ``ModelFamily`` (chat layout, video rule); None = Qwen2.5-VL.
        settings: the checkpoint's ``VisionSettings`` (defaults of the Qwen3-VL video flags).

    Example:
        >>> counter = TokenCounter(tokenizer, DataArguments(), VisionConfig(), model_max_length=4096)
        >>> counter.count({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        TokenCount(length=23, full_length=23, kind='ok', reason='')
    """

    def __init__(self, tokenizer: Any, data_args: Any, vision_config: VisionConfig,
                 model_max_length: int | None, io_retries: int = 3, io_backoff: float = 0.5,
                 family: Any = None, settings: Any = None):
        self.tokenizer = tokenizer
        self.io_retries, self.io_backoff = io_retries, io_backoff
        self.encoder = ChatEncoder(tokenizer, family)
        self.family, self.vision_settings = self.encoder.family, settings
        self.data_args = data_args
        self.vision_config = vision_config
        self.model_max_length = model_max_length

    def settings(self) -> dict[str, Any]:
        """Everything a count depends on besides the sample: the cache key material."""
        encoder = self.encoder
        return {
            "count_version": COUNT_VERSION,
            "code_sha256": code_fingerprint(),
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            "encoder": encoder.settings(),
            "video_settings": None if self.vision_settings is None else asdict(self.vision_settings),
            "vision": {k: v for k, v in asdict(self.vision_config).items()
                       if k in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels",
                                "resize_mode", "max_size")},
            "video": {name: _flag(getattr(self.data_args, name, None)) for name in VIDEO_FLAGS},
            "model_max_length": self.model_max_length,
        }

    def image_grid(self, source: Any, data_path: str = "") -> tuple[int, int, int]:
        """Grid (1, h, w) of one image, from its header.

        Raises:
            ImageError: missing file, unreadable header, or an unusable size.
        """
        height, width = image_size(source, data_path)
        return image_grid_thw(height, width, self.vision_config)

    def video_plan(self, source: Any, data_path: str = "") -> Any:
        """The sampling plan of one video (grid, timestamps), from its container metadata.

        Raises:
            VideoError: missing or unreadable file, broken metadata.
        """
        if not isinstance(source, str) or not source:
            raise VideoError(f"video reference must be a non-empty path string, got {source!r}")
        return plan_video(probe_video(source, data_path), self.data_args, self.vision_config, self.family,
                          self.vision_settings)

    def video_grid(self, source: Any, data_path: str = "") -> tuple[int, int, int]:
        """Grid (t, h, w) of one video, from its container metadata.

        Raises:
            VideoError: missing or unreadable file, broken metadata.
        """
        return tuple(int(x) for x in self.video_plan(source, data_path).grid_thw)

    def media_tokens(self, checked: CheckedRecord, data_path: str) -> tuple[list[int], list[list[int]], list[Any]]:
        """LLM tokens of each image and of each video's vision blocks, and the videos' timestamps.

        Returns:
            tuple: image token counts, per video its blocks' pad counts, per video its
            timestamps (None for families that write none).

        Raises:
            SampleError: the dataset's kind and reason for the first bad image or video.
            OSError: a transient I/O error (for ``with_io_retries``).
        """
        merge = self.vision_config.merge_size
        image_tokens, video_tokens, timestamps = [], [], []
        for number, source in enumerate(checked.images):
            try:
                image_tokens.append(num_vision_tokens(self.image_grid(source, data_path), merge))
            except ImageError as exc:
                raise SampleError(exc.kind, f"image {number}: {exc}") from None
        for number, source in enumerate(checked.videos):
            missing = media_file_problem(resolve_path(source, data_path), "video")
            if missing is not None:
                raise SampleError("missing_media", f"video {number}: {missing}")
            try:
                plan = self.video_plan(source, data_path)
            except VideoError as exc:
                raise SampleError("bad_video", f"video {number}: {exc}") from None
            video_tokens.append(video_block_tokens(plan.grid_thw, merge, self.family))
            timestamps.append(plan.timestamps)
        return image_tokens, video_tokens, timestamps

    def count(self, sample: Any, data_path: str = "", annotation_path: str = "", index: int = 0) -> TokenCount:
        """Tokens of one annotation sample as the training dataset will produce them.

        The steps and their order are ``LazySupervisedDataset.get_item``'s:
        ``validation.check_record``, images, videos (transient I/O errors retried
        as the dataset retries them), then ``encode_sample``.

        Args:
            sample: one annotation record (a dict with ``conversations`` and media keys).
            data_path: the dataset's media folder ("" = paths as written).
            annotation_path: the sample's file, for the reason of a rejected sample.
            index: the sample's position in that file, likewise.

        Returns:
            TokenCount; a sample the dataset rejects has ``length == 0`` and the
            dataset's error kind and reason. Never raises for a bad sample.
        """
        try:
            checked = check_record(sample, annotation_path, index, self.family)
        except BadSampleError as exc:
            return TokenCount(0, 0, exc.kind, exc.reason)
        try:
            image_tokens, video_tokens, timestamps = with_io_retries(lambda: self.media_tokens(checked, data_path),
                                                         self.io_retries, self.io_backoff,
                                                         f"{annotation_path}:{index}")
        except SampleError as exc:
            return TokenCount(0, 0, exc.kind, exc.reason)
        except OSError as exc:
            if not is_transient_io_error(exc):
                raise
            return TokenCount(0, 0, "io_error", f"I/O error after {self.io_retries + 1} attempts: {exc}")
        try:
            input_ids, labels = encode_sample(self.encoder, checked.conversation, image_tokens, video_tokens, None,
                                              timestamps)
        except SampleError as exc:
            return TokenCount(0, 0, exc.kind, exc.reason)
        full_length = len(input_ids)
        try:
            input_ids, _ = fit_max_length(input_ids, labels, self.encoder.vision_end_id, self.model_max_length)
        except SampleError as exc:
            return TokenCount(0, full_length, exc.kind, exc.reason)
        return TokenCount(len(input_ids), full_length, OK if len(input_ids) == full_length else TRUNCATED)
