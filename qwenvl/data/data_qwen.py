"""Supervised data for Qwen-VL: annotation records -> token ids, labels, position ids, pixels.

Flow (each step a function that can be called alone):
annotation file -> records -> ``parse_conversation`` -> media (``vision``/``video``)
-> ``ChatEncoder.encode`` -> ``rope2d`` -> collators.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qwenvl.data import data_list
from qwenvl.data.rope2d import get_rope_index_2, get_rope_index_25
from qwenvl.data.vision import (
    ImageError,
    VisionConfig,
    is_transient_io_error,
    media_file_problem,
    num_vision_tokens,
    open_image,
    process_image,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSampleError(ValueError):
    """A sample that cannot be trained on.

    ``str(error)`` is ``"{annotation_path}:{index}: {reason}"``; ``kind`` is a
    short machine-readable label (``missing_media``, ``over_length``, ...).
    """

    def __init__(self, path: str, index: int, reason: str, kind: str = "invalid"):
        super().__init__(f"{path}:{index}: {reason}")
        self.path, self.index, self.reason, self.kind = path, index, reason, kind


# Collators put the bad samples of a micro-batch under this key; QwenVLTrainer pops it before the model.
BAD_SAMPLES_KEY = "bad_samples"


@dataclass(frozen=True)
class Problem:
    """A bad sample as reported; ``LazySupervisedDataset[i]`` returns one under ``--bad_sample_policy skip``.

    ``message`` is ``"{annotation_path}:{index}: {reason}"``, the ``BadSampleError`` text.
    """

    dataset: str
    annotation_path: str
    index: int
    kind: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.annotation_path}:{self.index}: {self.reason}"

    @classmethod
    def from_error(cls, error: BadSampleError, dataset: str = "") -> "Problem":
        return cls(dataset, error.path, error.index, error.kind, error.reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dataset, annotation_path, index, kind, reason, message."""
        return {"dataset": self.dataset, "annotation_path": self.annotation_path, "index": self.index,
                "kind": self.kind, "reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class BadRecord:
    """Stands in for a JSONL line that did not parse, so later samples keep their index."""

    reason: str
    kind: str = "bad_json"


class ConversationError(ValueError):
    """``parse_conversation``'s error; ``kind`` labels it (``no_conversation``, ``bad_turn``, ...)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- annotations
def load_annotations(path: str, bad_lines: str = "raise") -> list[Any]:
    """Read a JSON list or a JSONL file of samples (UTF-8, a byte-order mark is fine).

    Args:
        path: a ``.jsonl`` file (one sample per line, blank lines ignored) or a
            JSON file holding a list of samples (or one sample object).
        bad_lines: what a JSONL line that does not parse becomes: ``"raise"`` an
            error, or ``"keep"`` a ``BadRecord`` in its place, so the training
            policy can skip and count it while every later sample keeps its index.

    Returns:
        the samples in file order (items are not checked here: see ``validation.check_record``).

    Raises:
        ValueError: the file is missing, empty or holds no samples, is not valid
            JSON or UTF-8 (the message gives ``path:line``), or is not a list.

    Example:
        >>> load_annotations("demo/text_only.jsonl")[0]["conversations"][1]
        {'from': 'gpt', 'value': 'Green.'}
    """
    if bad_lines not in ("raise", "keep"):
        raise ValueError(f"bad_lines should be one of 'raise' or 'keep' but found {bad_lines!r}")
    missing = media_file_problem(path, "annotation")
    if missing is not None:
        raise ValueError(missing)
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise ValueError(f"{path}: the annotation file is empty")
    if path.endswith(".jsonl"):
        records: Any = []
        # Split on "\n" only: str.splitlines() would also split inside strings holding U+2028 and friends.
        for line_no, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                records.append(json.loads(raw.decode("utf-8")))
                continue
            except UnicodeDecodeError as exc:
                detail = f"not valid UTF-8 (column {exc.start + 1})"
            except json.JSONDecodeError as exc:
                detail = f"{exc.msg} (column {exc.colno})"
            if bad_lines == "raise":
                raise ValueError(f"{path}:{line_no}: invalid JSON line: {detail}")
            records.append(BadRecord(f"line {line_no}: invalid JSON line: {detail}"))
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_no = data[:exc.start].count(b"\n") + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise ValueError(f"{path}:{line_no}: not valid UTF-8 (column {column})") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = "; one JSON object per line? name the file .jsonl" if exc.msg == "Extra data" else ""
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){hint}") from None
        if isinstance(records, dict):
            records = [records]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of samples, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: the annotation file holds no samples")
    return records


def sample_indices(num_records: int, sampling_rate: float, seed: int, name: str) -> list[int]:
    """Indices kept by ``name%N``: a seeded random subset, in file order.

    The generator is seeded from ``seed`` and the dataset name only, so every
    rank keeps the same subset.

    Example:
        >>> sample_indices(10, 1.0, 0, "x")
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if sampling_rate >= 1.0:
        return list(range(num_records))
    keep = max(1, int(num_records * sampling_rate)) if num_records else 0
    return sorted(random.Random(f"{seed}:{name}").sample(range(num_records), keep))


@dataclass(frozen=True)
class SampleRef:
    """Where a sample comes from: enough to name it in an error message."""

    dataset: str
    annotation_path: str
    data_path: str
    index: int  # position in the annotation file (0-based)


# --------------------------------------------------------------- conversation
@dataclass
class Conversation:
    """A normalised conversation: optional system prompt, then (role, text) turns."""

    system: str | None
    turns: list[tuple[str, str]]


def _media_list(sample: dict, *keys: str) -> list:
    items: list = []
    for key in keys:
        value = sample.get(key)
        if value is None:
            continue
        items.extend(value if isinstance(value, list) else [value])
    return items


def sample_images(sample: dict) -> list:
    """Images of a sample: ``image`` (string or list) then ``images``."""
    return _media_list(sample, "image", "images")


def sample_videos(sample: dict) -> list:
    """Videos of a sample: ``video`` (string or list) then ``videos``."""
    return _media_list(sample, "video", "videos")


def parse_conversation(sample: dict) -> Conversation:
    """Normalise ``conversations`` to (role, text) turns.

    Accepts ``{"from", "value"}`` and ``{"role", "content"}`` turns. A leading
    system turn replaces the default system prompt; other leading non-human
    turns are dropped (the original's behaviour).

    Raises:
        ConversationError: (a ValueError) missing/empty conversations
            (``no_conversation``), a turn that is not an object, has an unknown
            role or non-string text (``bad_turn``), turns that do not alternate
            user/assistant (``bad_roles``), media tags in answers
            (``tag_in_answer``) or in the system turn (``tag_in_system``), an empty answer (``empty_answer``), or no
            assistant answer at all (``no_answer``). Turn numbers count the
            turns as written, from 0.

    Example:
        >>> parse_conversation({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        Conversation(system=None, turns=[('user', 'hi'), ('assistant', 'yo')])
    """
    raw = sample.get("conversations", sample.get("messages"))
    if raw is None:
        raise ConversationError("no 'conversations' key", "no_conversation")
    if not isinstance(raw, list) or not raw:
        raise ConversationError("'conversations' must be a non-empty list of turns", "no_conversation")
    turns: list[tuple[int, str, str]] = []  # (turn number as written, role, text)
    for number, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise ConversationError(
                f"turn {number} is a {type(turn).__name__}, expected an object with 'from' and 'value'", "bad_turn")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = _ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise ConversationError(f"turn {number} has unknown role {speaker!r} (expected human/gpt/system)",
                                    "bad_turn")
        if not isinstance(text, str):
            raise ConversationError(f"turn {number} ({speaker}) has a {type(text).__name__} value, expected a string",
                                    "bad_turn")
        turns.append((number, role, text))
    system = None
    if turns[0][1] == "system":
        number, _, system = turns.pop(0)
        if IMAGE_TAG in system or VIDEO_TAG in system:
            # The system prompt is never expanded into vision tokens: the tag would be trained on as text.
            raise ConversationError(f"system turn {number} contains a media tag ({IMAGE_TAG} or {VIDEO_TAG}); "
                                    f"put media tags in a human turn", "tag_in_system")
    while turns and turns[0][1] != "user":
        turns.pop(0)
    if not turns:
        raise ConversationError("no human turn in the conversation", "bad_roles")
    for position, (number, role, text) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(
                f"turn {number} is {role!r} where {expected!r} was expected (turns must alternate)", "bad_roles")
        if role == "assistant" and (IMAGE_TAG in text or VIDEO_TAG in text):
            raise ConversationError(f"answer {number} contains a media tag ({IMAGE_TAG} or {VIDEO_TAG})",
                                    "tag_in_answer")
        if role == "assistant" and not text.strip():
            raise ConversationError(f"answer {number} is empty", "empty_answer")
    if len(turns) < 2:
        raise ConversationError("the conversation has no assistant answer", "no_answer")
    return Conversation(system, [(role, text) for _, role, text in turns])


class ChatEncoder:
    """Token ids and labels for a conversation, per SPEC 5.

    Every special token id is read from the tokenizer, so a tokenizer whose ids
    differ works unchanged.

    Example:
        >>> enc = ChatEncoder(tokenizer)
        >>> ids, labels = enc.encode(Conversation(None, [("user", "<image>hi"), ("assistant", "yo")]), [4], [])
        >>> int((ids == enc.image_pad_id).sum())
        4
    """

    SPECIAL_TOKENS = {
        "im_start_id": "<|im_start|>",
        "im_end_id": "<|im_end|>",
        "vision_start_id": "<|vision_start|>",
        "vision_end_id": "<|vision_end|>",
        "image_pad_id": "<|image_pad|>",
        "video_pad_id": "<|video_pad|>",
    }

    def __init__(self, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        vocab_unk = getattr(tokenizer, "unk_token_id", None)
        for attr, token in self.SPECIAL_TOKENS.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (vocab_unk is not None and token_id == vocab_unk):
                raise ValueError(f"tokenizer has no {token} token; is this a Qwen-VL tokenizer?")
            setattr(self, attr, int(token_id))
        self.image_block = "<|vision_start|><|image_pad|><|vision_end|>"
        self.video_block = "<|vision_start|><|video_pad|><|vision_end|>"
        self.assistant_prefix_len = len(self._encode_texts(["<|im_start|>assistant\n"])[0])

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(
        self,
        conversation: Conversation,
        image_token_counts: Sequence[int],
        video_token_counts: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode turns; each ``<image>``/``<video>`` expands to its pad tokens.

        Args:
            conversation: from ``parse_conversation``.
            image_token_counts: LLM tokens of each image, in order (t*h*w/merge**2).
            video_token_counts: likewise for videos.

        Returns:
            input_ids, labels: (L,) int64 arrays; labels are -100 outside the
            assistant answers (answer + ``<|im_end|>`` + ``\\n`` are learned).

        Raises:
            ValueError: tag counts differ from media counts.
        """
        system = conversation.system if conversation.system is not None else self.system_prompt
        texts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
        for role, text in conversation.turns:
            text = text.replace(IMAGE_TAG, self.image_block).replace(VIDEO_TAG, self.video_block)
            texts.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
        encoded = self._encode_texts(texts)
        ids = np.fromiter((t for turn in encoded for t in turn), dtype=np.int64)
        labels = ids.copy()
        start = 0
        for (role, _), turn_ids in zip([("system", "")] + conversation.turns, encoded):
            end = start + len(turn_ids)
            if role == "assistant":
                labels[start:start + self.assistant_prefix_len] = IGNORE_INDEX
            else:
                labels[start:end] = IGNORE_INDEX
            start = end
        repeats = np.ones(len(ids), dtype=np.int64)
        for pad_id, counts, tag in (
            (self.image_pad_id, image_token_counts, IMAGE_TAG),
            (self.video_pad_id, video_token_counts, VIDEO_TAG),
        ):
            where = np.flatnonzero(ids == pad_id)
            if len(where) != len(counts):
                raise ValueError(f"{len(where)} {tag} tag(s) in the conversation but {len(counts)} media item(s)")
            repeats[where] = counts
        return np.repeat(ids, repeats), np.repeat(labels, repeats)


# --------------------------------------------------------------------- dataset
def _rope_function(model_type: str) -> Callable:
    if model_type == "qwen2_vl":
        return get_rope_index_2
    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        if model_type == "qwen3_vl":
            from qwenvl.data.rope2d import get_rope_index_3

            return get_rope_index_3
        return get_rope_index_25
    raise ValueError(f"unsupported model_type {model_type!r}; expected qwen2_vl, qwen2_5_vl or qwen3_vl")


class LazySupervisedDataset(Dataset):
    """Samples from the registry, tokenised and processed on access.

    Args:
        tokenizer: the checkpoint's tokenizer.
        data_args: ``DataArguments`` (``dataset_use``, pixel and frame limits).
        vision_config: patch geometry and normalisation (``VisionConfig``).
        model_type: ``qwen2_vl`` / ``qwen2_5_vl`` (picks the rope rule).
        model_max_length: longer samples are truncated on text only, or rejected.
        seed: seeds the ``%N`` subsets (same subset on every rank).
        tokens_per_second: from the model's vision config (Qwen2.5-VL video rope).
        dataset_use: overrides ``data_args.dataset_use`` (e.g. for an eval set).
        bad_sample_policy: ``"error"`` raises ``BadSampleError`` for a bad sample (and
            ``ValueError`` for a JSONL line that does not parse); ``"skip"`` returns a
            ``Problem`` in its place (logged at debug level once per process; training's
            ``BadSampleMonitor`` logs it once per run) that the collators drop and
            report, never another sample. Training passes ``--bad_sample_policy``.
        io_retries: retries of transient I/O errors (EIO, ESTALE, timeouts) per sample
            before it counts as bad (``io_error``).
        io_backoff: seconds before the first retry; doubles each time.
    """

    def __init__(
        self,
        tokenizer: Any,
        data_args: Any,
        vision_config: VisionConfig,
        model_type: str = "qwen2_5_vl",
        model_max_length: int = 512,
        seed: int = 42,
        tokens_per_second: float = 2,
        dataset_use: str | None = None,
        bad_sample_policy: str = "error",
        io_retries: int = 3,
        io_backoff: float = 0.5,
    ):
        super().__init__()
        if bad_sample_policy not in ("error", "skip"):
            raise ValueError(f"bad_sample_policy should be one of 'error' or 'skip' but found {bad_sample_policy!r}")
        self.bad_sample_policy = bad_sample_policy
        self.io_retries, self.io_backoff = io_retries, io_backoff
        self._logged_bad: set[int] = set()  # samples already logged by this process
        self.data_args = data_args
        self.vision_config = vision_config
        self.encoder = ChatEncoder(tokenizer)
        self.model_type = model_type
        self.rope_fn = _rope_function(model_type)
        self.tokens_per_second = tokens_per_second
        self.model_max_length = model_max_length
        names = (dataset_use if dataset_use is not None else data_args.dataset_use).split(",")
        self.records: list[dict] = []
        self.refs: list[SampleRef] = []
        for config in data_list(names):
            records = load_annotations(config["annotation_path"],
                                       bad_lines="keep" if bad_sample_policy == "skip" else "raise")
            kept = sample_indices(len(records), config["sampling_rate"], seed, config["name"])
            for index in kept:
                self.records.append(records[index])
                self.refs.append(SampleRef(config["name"], config["annotation_path"], config["data_path"], index))
            logger.info("dataset %s: %d of %d samples (%s)", config["name"], len(kept), len(records),
                        config["annotation_path"])
        if not self.records:
            raise ValueError(f"--dataset_use {','.join(names)} holds no samples")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Rough length of every sample (text words + a guess for media), for length grouping."""
        out = []
        for record in self.records:
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not isinstance(turns, list):  # a bad sample: reported when it is loaded
                out.append(1)
                continue
            words = sum(len(str(t.get("value", t.get("content", ""))).split()) for t in turns if isinstance(t, dict))
            out.append(words + 256 * len(sample_images(record)) + 512 * len(sample_videos(record)))
        return out

    def bad(self, i: int, reason: str, kind: str = "invalid") -> BadSampleError:
        ref = self.refs[i]
        return BadSampleError(ref.annotation_path, ref.index, reason, kind)

    # ------------------------------------------------------------- media
    def load_images(self, i: int, images: list) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """Decode and patchify a sample's images."""
        pixels, grids = [], []
        for number, source in enumerate(images):
            try:
                pv, grid = process_image(open_image(source, self.refs[i].data_path), self.vision_config)
            except ImageError as exc:
                raise self.bad(i, f"image {number}: {exc}", exc.kind) from None
            pixels.append(pv)
            grids.append(grid)
        return pixels, grids

    def load_videos(self, i: int, videos: list) -> tuple[list[np.ndarray], list[tuple[int, int, int]], list[float]]:
        """Decode, sample and patchify a sample's videos."""
        from qwenvl.data.validation import load_video_checked

        pixels, grids, seconds = [], [], []
        ref = self.refs[i]
        for number, source in enumerate(videos):
            try:
                pv, grid, second_per_grid_t = load_video_checked(source, number, ref.data_path, self.data_args,
                                                                 self.vision_config, ref.annotation_path, ref.index)
            except BadSampleError as exc:
                raise self.bad(i, exc.reason, exc.kind) from None
            pixels.append(pv)
            grids.append(grid)
            seconds.append(second_per_grid_t)
        return pixels, grids, seconds

    # ------------------------------------------------------------- items
    def __getitem__(self, i: int) -> dict[str, Any] | Problem:
        return self.load_sample(i)

    def load_sample(self, i: int) -> dict[str, Any] | Problem:
        """``get_item`` with transient I/O retries and the bad-sample policy.

        Returns:
            the item; under ``skip`` a ``Problem`` for a bad sample (never another sample).

        Any other exception (a bug, or an input no check foresaw) is, under ``skip``, the
        sample's ``unexpected_error`` (type and message; the traceback is logged once), so one
        odd sample cannot kill one rank of a distributed run; under ``error`` it propagates
        with a note naming the file and index.

        Raises:
            BadSampleError: a bad sample under ``error``; an I/O error that outlived
                the retries is kind ``io_error``.
        """
        from qwenvl.data.validation import unexpected_reason, with_io_retries

        ref = self.refs[i]
        try:
            try:
                return with_io_retries(lambda: self.get_item(i), self.io_retries, self.io_backoff,
                                       f"{ref.annotation_path}:{ref.index}")
            except (BadSampleError, MemoryError):
                raise
            except Exception as exc:
                if isinstance(exc, OSError) and is_transient_io_error(exc):
                    raise self.bad(i, f"I/O error after {self.io_retries + 1} attempts: {exc}", "io_error") from None
                if self.bad_sample_policy == "error":
                    exc.add_note(f"while loading sample {ref.annotation_path}:{ref.index}")
                    raise
                if i not in self._logged_bad:
                    logger.warning("unexpected error on %s:%s", ref.annotation_path, ref.index, exc_info=True)
                raise self.bad(i, unexpected_reason(exc), "unexpected_error") from None
        except BadSampleError as exc:
            if self.bad_sample_policy == "error":
                raise
            problem = Problem.from_error(exc, ref.dataset)
            if i not in self._logged_bad:  # the Trainer's BadSampleMonitor logs it once for the whole run
                self._logged_bad.add(i)
                logger.debug("skipping bad sample (%s): %s", problem.kind, problem.message)
            return problem

    def get_item(self, i: int) -> dict[str, Any]:
        """The training example for sample ``i``.

        Returns:
            dict with ``input_ids`` (L,), ``labels`` (L,), ``position_ids`` (3, L),
            and when present ``pixel_values`` (N, 1176), ``image_grid_thw`` (n, 3),
            ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``
            (one float per video).

        Raises:
            BadSampleError: the message names the annotation file and index.
        """
        from qwenvl.data.validation import check_record

        ref = self.refs[i]
        try:
            checked = check_record(self.records[i], ref.annotation_path, ref.index)
        except BadSampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None
        conversation, images, videos = checked.conversation, checked.images, checked.videos
        image_pixels, image_grids = self.load_images(i, images)
        video_pixels, video_grids, seconds = self.load_videos(i, videos) if videos else ([], [], [])
        merge = self.vision_config.merge_size
        # Shared with tools/pack_data.py's token counter, so its counts equal len(input_ids) here.
        from qwenvl.data.token_count import SampleError, encode_sample

        try:
            input_ids, labels = encode_sample(
                self.encoder,
                conversation,
                [num_vision_tokens(g, merge) for g in image_grids],
                [num_vision_tokens(g, merge) for g in video_grids],
                self.model_max_length,
            )
        except SampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None

        ids = torch.from_numpy(input_ids)
        item: dict[str, Any] = {"input_ids": ids, "labels": torch.from_numpy(labels)}
        image_grid = torch.tensor(image_grids, dtype=torch.long) if image_grids else None
        video_grid = torch.tensor(video_grids, dtype=torch.long) if video_grids else None
        rope_kwargs = dict(
            image_token_id=self.encoder.image_pad_id,
            video_token_id=self.encoder.video_pad_id,
            vision_start_token_id=self.encoder.vision_start_id,
        )
        if self.model_type != "qwen2_vl":
            rope_kwargs["tokens_per_second"] = self.tokens_per_second
        position_ids, _ = self.rope_fn(
            merge, ids[None], image_grid_thw=image_grid, video_grid_thw=video_grid,
            second_per_grid_ts=seconds or None, **rope_kwargs,
        )
        item["position_ids"] = position_ids[:, 0]  # (3, L)
        if image_pixels:
            item["pixel_values"] = torch.from_numpy(np.concatenate(image_pixels))
            item["image_grid_thw"] = image_grid
        if video_pixels:
            item["pixel_values_videos"] = torch.from_numpy(np.concatenate(video_pixels))
            item["video_grid_thw"] = video_grid
            if self.model_type != "qwen2_vl":
                item["second_per_grid_ts"] = seconds
        return item

    def truncate(self, i: int, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut a too-long sample on text only; refuse to cut through a vision block (``token_count.fit_max_length``)."""
        from qwenvl.data.token_count import SampleError, fit_max_length

        try:
            return fit_max_length(input_ids, labels, self.encoder.vision_end_id, self.model_max_length)
        except SampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None


# ------------------------------------------------------------------ collators
def split_bad(instances: Sequence[Any]) -> tuple[list[dict], list[Problem]]:
    """Separate real items from the ``Problem`` (or None) entries of skipped bad samples.

    Example:
        >>> split_bad([item, Problem("d", "d.json", 3, "missing_media", "..."), None])
        ([item], [Problem(dataset='d', annotation_path='d.json', index=3, kind='missing_media', reason='...')])
    """
    good = [x for x in instances if isinstance(x, dict)]
    problems = [x for x in instances if isinstance(x, Problem)]
    return good, problems


def placeholder_batch(pad_token_id: int, flattened: bool) -> dict[str, Any]:
    """Stand-in for a micro-batch whose samples were all bad: one pad token, nothing to learn.

    Every rank must still run forward and backward (DDP/ZeRO collectives), so an
    empty micro-batch cannot simply be dropped. Its loss must be exactly 0: the
    model's mean cross-entropy over zero labels is NaN, so the batch carries
    ``num_items_in_batch=1`` and the model's loss becomes ``sum over no tokens / 1``,
    0 with zero gradients (the Trainer's own count, when it passes one, wins).

    Returns:
        input_ids (1, 1), labels (1, 1) = -100, position_ids (3, 1, 1) padded or
        (4, 1, 1) flattened, attention_mask (1, 1) when padded, num_items_in_batch 1.
    """
    batch: dict[str, Any] = {
        "input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long),
        "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((4 if flattened else 3, 1, 1), dtype=torch.long),
        "num_items_in_batch": 1,
    }
    if not flattened:
        batch["attention_mask"] = torch.ones((1, 1), dtype=torch.long)
    return batch


def _with_problems(batch: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    if problems:
        batch[BAD_SAMPLES_KEY] = problems
    return batch


def _collate_vision(instances: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate pixels and grids of all samples, in batch order."""
    batch: dict[str, torch.Tensor] = {}
    for pixels_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        present = [x for x in instances if x.get(pixels_key) is not None]
        if present:
            batch[pixels_key] = torch.cat([x[pixels_key] for x in present], dim=0)
            batch[grid_key] = torch.cat([x[grid_key] for x in present], dim=0)
    seconds = [s for x in instances for s in (x.get("second_per_grid_ts") or [])]
    if seconds:
        batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return batch


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of samples into one batch (right padding).

    input_ids are padded with the pad id, labels with -100, position_ids with 1;
    ``attention_mask`` marks real tokens. Nothing is truncated here: the dataset
    already enforced ``model_max_length`` without cutting vision blocks.
    Skipped bad samples (``Problem`` entries) are dropped and listed under
    ``batch["bad_samples"]``; when all are bad the batch is ``placeholder_batch``.
    """

    pad_token_id: int

    def __call__(self, instances: Sequence[dict | Problem]) -> dict[str, torch.Tensor]:
        instances, problems = split_bad(instances)
        if not instances:
            return _with_problems(placeholder_batch(self.pad_token_id, flattened=False), problems)
        longest = max(len(x["input_ids"]) for x in instances)
        size = len(instances)
        input_ids = torch.full((size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((size, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.ones((3, size, longest), dtype=torch.long)
        attention_mask = torch.zeros((size, longest), dtype=torch.long)
        for row, x in enumerate(instances):
            length = len(x["input_ids"])
            input_ids[row, :length] = x["input_ids"]
            labels[row, :length] = x["labels"]
            position_ids[:, row, :length] = x["position_ids"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,  # (3, B, L)
                 "attention_mask": attention_mask}
        batch.update(_collate_vision(instances))
        return _with_problems(batch, problems)


def flatten_instances(instances: Sequence[dict | Problem], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate samples into one row with 4-row position ids (no padding, no mask).

    Row 0 of ``position_ids`` restarts at 0 for every sample: transformers finds
    the sequence boundaries from it (flash-attention varlen, or a block-diagonal
    mask for sdpa/eager). Rows 1-3 are the mrope ids. The first label of every
    sample is -100 so the shifted loss never predicts across a boundary.
    Skipped bad samples are dropped and listed as in ``DataCollatorForSupervisedDataset``
    (``pad_token_id`` fills the placeholder when all are bad).

    Returns:
        input_ids (1, T), labels (1, T), position_ids (4, 1, T), plus vision keys.
    """
    instances, problems = split_bad(instances)
    if not instances:
        return _with_problems(placeholder_batch(pad_token_id, flattened=True), problems)
    input_ids = torch.cat([x["input_ids"] for x in instances])[None]
    labels = torch.cat([x["labels"] for x in instances]).clone()
    starts = np.cumsum([0] + [len(x["input_ids"]) for x in instances[:-1]])
    labels[torch.from_numpy(starts)] = IGNORE_INDEX
    text_positions = torch.cat([torch.arange(len(x["input_ids"])) for x in instances])[None]  # (1, T)
    mrope = torch.cat([x["position_ids"] for x in instances], dim=1)  # (3, T)
    position_ids = torch.cat([text_positions, mrope], dim=0)[:, None]  # (4, 1, T)
    batch = {"input_ids": input_ids, "labels": labels[None], "position_ids": position_ids}
    batch.update(_collate_vision(instances))
    return _with_problems(batch, problems)


@dataclass
class FlattenedDataCollatorForSupervisedDataset:
    """All samples of a micro-batch in one row; see ``flatten_instances``."""

    pad_token_id: int = 0  # only fills the placeholder of an all-bad micro-batch

    def __call__(self, instances: Sequence[dict | Problem]) -> dict[str, torch.Tensor]:
        return flatten_instances(instances, self.pad_token_id)


def make_supervised_data_module(
    tokenizer: Any,
    data_args: Any,
    vision_config: VisionConfig,
    model_type: str = "qwen2_5_vl",
    model_max_length: int = 512,
    seed: int = 42,
    tokens_per_second: float = 2,
) -> dict[str, Any]:
    """Train dataset, optional eval dataset and the collator the flags ask for.

    Returns:
        ``{"train_dataset", "eval_dataset", "data_collator"}`` for ``Trainer(**module)``.
    """
    common = dict(
        tokenizer=tokenizer, data_args=data_args, vision_config=vision_config, model_type=model_type,
        model_max_length=model_max_length, seed=seed, tokens_per_second=tokens_per_second,
    )
    policy = getattr(data_args, "bad_sample_policy", "error")  # --bad_sample_policy (default skip)
    if getattr(data_args, "data_packing", False):
        from qwenvl.data.data_qwen_packed import PackedSupervisedDataset

        train_dataset: Dataset = PackedSupervisedDataset(**common, bad_sample_policy=policy)
    else:
        train_dataset = LazySupervisedDataset(**common, bad_sample_policy=policy)
    eval_use = getattr(data_args, "eval_dataset_use", None)
    eval_dataset = LazySupervisedDataset(**common, dataset_use=eval_use, bad_sample_policy=policy) if eval_use else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flatten = getattr(data_args, "data_flatten", False) or getattr(data_args, "data_packing", False)
    collator_cls = FlattenedDataCollatorForSupervisedDataset if flatten else DataCollatorForSupervisedDataset
    if getattr(data_args, "data_packing", False):  # items are groups: flattens each group's samples
        from qwenvl.data.data_qwen_packed import PackedDataCollatorForSupervisedDataset as collator_cls
    return {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "data_collator": collator_cls(pad_id)}
