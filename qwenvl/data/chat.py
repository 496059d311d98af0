"""One record -> token ids and labels: the step training, the token counter, the validator and inference share.

Flow: annotation record -> ``parse_conversation`` -> ``ChatEncoder.encode`` (the family's chat
layout; each ``<image>``/``<video>`` expanded per its grid) -> ``encode_sample``
(``model_max_length``). Nothing here spells a special token or compares ``model_type``: the
family (``qwenvl.models``) owns both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qwenvl.data.vision import media_file_problem
from qwenvl.models import DEFAULT_MODEL_TYPE, ModelFamily, TokenIds, family_for

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

UTF8_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors put first; not part of the data
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
    if path.endswith(".jsonl"):
        records: Any = []
        for line_no, _, record, detail in iter_jsonl(path):  # one line in memory at a time
            if detail is None:
                records.append(record)
            elif bad_lines == "raise":
                raise jsonl_line_error(path, line_no, detail)
            else:
                records.append(jsonl_bad_record(line_no, detail))
        if not records:  # no line holds anything but whitespace
            raise ValueError(f"{path}: the annotation file is empty")
        return records
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    if not data.strip():
        raise ValueError(f"{path}: the annotation file is empty")
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


def parse_jsonl_line(raw: bytes) -> tuple[Any, str | None]:
    """One JSONL line -> (record, None), or (None, why it is not a JSON value).

    The one rule for a bad line, shared by ``load_annotations`` and the annotation store.

    Example:
        >>> parse_jsonl_line(b'{"a": 1}'), parse_jsonl_line(b'{"a": }')
        (({'a': 1}, None), (None, 'Expecting value (column 7)'))
    """
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (column {exc.start + 1})"
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} (column {exc.colno})"


def iter_jsonl(path: str) -> Iterator[tuple[int, bytes, Any, str | None]]:
    """(line number, line, record, bad-line reason) for every non-blank line of a JSONL file, one line at a time.

    Lines end at ``b"\\n"`` only (U+2028 inside a string does not end one); a byte-order mark
    before the first line is dropped; a line of only whitespace is skipped. ``line`` is the
    line's bytes without its ``\\n``; ``record`` is None and ``reason`` says why for a line that
    does not parse (``parse_jsonl_line``).

    Raises:
        OSError: the file cannot be read.

    Example:
        >>> next(iter_jsonl("demo/text_only.jsonl"))[0]
        1
    """
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):  # a binary file splits on b"\n" only
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            raw = raw.rstrip(b"\n")
            if not raw.strip():
                continue
            record, detail = parse_jsonl_line(raw)
            yield line_no, raw, record, detail


def jsonl_line_error(path: str, line_no: int, detail: str) -> ValueError:
    """The error for a JSONL line that does not parse: ``"{path}:{line_no}: invalid JSON line: {detail}"``."""
    return ValueError(f"{path}:{line_no}: invalid JSON line: {detail}")


def jsonl_bad_record(line_no: int, detail: str) -> BadRecord:
    """What a JSONL line that does not parse becomes under ``bad_lines="keep"`` (keeps later indices)."""
    return BadRecord(f"line {line_no}: invalid JSON line: {detail}")


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



def _default_family() -> ModelFamily:
    """The family a caller that names none gets: Qwen2.5-VL (the behaviour before families existed)."""
    return family_for(DEFAULT_MODEL_TYPE)


class ChatEncoder:
    """Token ids and labels for a conversation in the family's released chat layout (SPEC 5, 13).

    Every special token id is read from the tokenizer, so a tokenizer whose ids differ works
    unchanged. The system turn, the turn layout and how an image or a video is written come
    from ``family`` (Qwen2/2.5-VL: a default system prompt, one block per video; Qwen3-VL: no
    default system prompt, one timestamped block per temporal patch).

    Args:
        tokenizer (Any): the checkpoint's tokenizer.
        family (ModelFamily | None): the checkpoint's family; None = Qwen2.5-VL.
        train_on_prompt (bool): learn the system and user turns too (``--train_on_prompt``); image and
            video tokens (pads and their start/end markers) are never learned.

    Raises:
        ValueError: the tokenizer lacks one of the family's special tokens.

    Example:
        >>> enc = ChatEncoder(tokenizer, family_for("qwen3_vl"))
        >>> ids, labels = enc.encode(Conversation(None, [("user", "<image>hi"), ("assistant", "yo")]), [4], [])
        >>> int((ids == enc.image_pad_id).sum())
        4
    """

    def __init__(self, tokenizer: Any, family: ModelFamily | None = None, train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.train_on_prompt = bool(train_on_prompt)
        self.family = family if family is not None else _default_family()
        self.token_ids: TokenIds = self.family.token_ids(tokenizer)
        self.system_prompt = self.family.default_system_prompt
        self.image_block = self.family.image_text((1, 1, 1), 1)  # one pad, repeated after tokenising
        self.assistant_prefix_len = len(self._encode_texts([self.family.generation_prompt()])[0])

    # The ids under the names callers used before families existed.
    im_start_id = property(lambda self: self.token_ids.im_start)
    im_end_id = property(lambda self: self.token_ids.im_end)
    vision_start_id = property(lambda self: self.token_ids.vision_start)
    vision_end_id = property(lambda self: self.token_ids.vision_end)
    image_pad_id = property(lambda self: self.token_ids.image_pad)
    video_pad_id = property(lambda self: self.token_ids.video_pad)

    def settings(self) -> dict[str, Any]:
        """What the encoding depends on besides the tokenizer's vocabulary (cache key material)."""
        return {"model_type": self.family.model_type, "token_ids": asdict(self.token_ids),
                "system_prompt": self.system_prompt, "train_on_prompt": self.train_on_prompt}

    def vision_token_ids(self) -> list[int]:
        """Ids that stand for images and videos (pads, start/end markers): never learned."""
        ids = self.token_ids
        return [ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def video_text(self, blocks: int, timestamps: Sequence[float] | None) -> str:
        """A video's text with one pad per vision block (``np.repeat`` expands the pads later)."""
        return self.family.video_text((blocks, 1, 1), 1, timestamps)

    def encode(
        self,
        conversation: Conversation,
        image_token_counts: Sequence[int],
        video_token_counts: Sequence[int | Sequence[int]],
        video_timestamps: Sequence[Sequence[float] | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode turns; each ``<image>``/``<video>`` expands to its pad tokens.

        Args:
            conversation (Conversation): from ``parse_conversation``.
            image_token_counts (Sequence[int]): LLM tokens of each image, in order (t*h*w/merge**2).
            video_token_counts (Sequence[int | Sequence[int]]): per video, its pads: one count
                (one block) or one count per vision block (``family.video_block_lengths``).
            video_timestamps (Sequence[Sequence[float] | None] | None): per video, the seconds
                of each block, for families that write them (Qwen3-VL); None otherwise.

        Returns:
            tuple[np.ndarray, np.ndarray]: input_ids and labels, (L,) int64; labels are -100
            outside the assistant answers (answer + ``<|im_end|>`` + ``\\n`` are learned); with
            ``train_on_prompt`` every token is learned except the image and video tokens.

        Raises:
            ValueError: tag counts differ from media counts, or a family that writes
                timestamps gets none for a video.
        """
        blocks = [[int(c)] if isinstance(c, (int, np.integer)) else [int(x) for x in c] for c in video_token_counts]
        stamps = list(video_timestamps) if video_timestamps is not None else [None] * len(blocks)
        if len(stamps) != len(blocks):
            raise ValueError(f"{len(blocks)} video(s) but timestamps for {len(stamps)}")
        video_texts = [self.video_text(len(b), s) for b, s in zip(blocks, stamps)]
        texts = [self.family.system_text(conversation.system)]
        videos_seen = 0
        for role, text in conversation.turns:
            text = text.replace(IMAGE_TAG, self.image_block)
            if VIDEO_TAG in text:
                parts = text.split(VIDEO_TAG)
                used = video_texts[videos_seen:videos_seen + len(parts) - 1]
                if len(used) != len(parts) - 1:
                    raise ValueError(f"{sum(t.count(VIDEO_TAG) for _, t in conversation.turns)} {VIDEO_TAG} tag(s) "
                                     f"in the conversation but {len(blocks)} media item(s)")
                videos_seen += len(used)
                text = "".join(p + v for p, v in zip(parts, used + [""]))
            texts.append(self.family.turn_text(role, text))
        encoded = self._encode_texts(texts)
        ids = np.fromiter((t for turn in encoded for t in turn), dtype=np.int64)
        labels = ids.copy()
        if self.train_on_prompt:
            labels[np.isin(ids, self.vision_token_ids())] = IGNORE_INDEX
        else:
            start = 0
            for (role, _), turn_ids in zip([("system", "")] + conversation.turns, encoded):
                end = start + len(turn_ids)
                if role == "assistant":
                    labels[start:start + self.assistant_prefix_len] = IGNORE_INDEX
                else:
                    labels[start:end] = IGNORE_INDEX
                start = end
        repeats = np.ones(len(ids), dtype=np.int64)
        for pad_id, counts, tag, items in (
            (self.image_pad_id, list(image_token_counts), IMAGE_TAG, len(image_token_counts)),
            (self.video_pad_id, [c for b in blocks for c in b], VIDEO_TAG, len(blocks)),
        ):
            where = np.flatnonzero(ids == pad_id)
            if len(where) != len(counts):
                tags = sum(t.count(tag) for _, t in conversation.turns)
                raise ValueError(f"{tags} {tag} tag(s) in the conversation but {items} media item(s)")
            repeats[where] = counts
        return np.repeat(ids, repeats), np.repeat(labels, repeats)


class SampleError(ValueError):
    """A sample the dataset rejects; ``kind`` is the ``BadSampleError`` kind (``over_length``, ...)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def fit_max_length(
    input_ids: np.ndarray, labels: np.ndarray, vision_end_id: int, model_max_length: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``model_max_length`` (cut text at the end, never a vision block; SPEC 9), then
    check that some answer token is still learned.

    Args:
        input_ids (np.ndarray): (L,) token ids of one sample.
        labels (np.ndarray): (L,) labels.
        vision_end_id (int): id of ``<|vision_end|>``.
        model_max_length (int | None): longest allowed sample; None = no limit.

    Returns:
        tuple[np.ndarray, np.ndarray]: input_ids, labels: the first ``min(L, model_max_length)`` tokens.

    Raises:
        SampleError: kind ``over_length`` when the cut would split a vision block,
            ``no_labels`` when no label other than -100 is left.

    Example:
        >>> ids, labels = fit_max_length(np.arange(10), np.arange(10), vision_end_id=99, model_max_length=4)
        >>> ids.tolist()
        [0, 1, 2, 3]
    """
    limit = model_max_length
    if limit is not None and len(input_ids) > limit:
        vision = np.flatnonzero(input_ids == vision_end_id)
        if len(vision) and vision[-1] >= limit:
            raise SampleError(
                "over_length",
                f"over-length: {len(input_ids)} tokens > model_max_length {limit} and the cut would split a "
                f"vision block (last vision token at {int(vision[-1])})",
            )
        input_ids, labels = input_ids[:limit], labels[:limit]
    if not (labels != IGNORE_INDEX).any():
        raise SampleError("no_labels", "no answer token survives (empty answers or truncated away)")
    return input_ids, labels


def encode_sample(
    encoder: ChatEncoder,
    conversation: Conversation,
    image_token_counts: Sequence[int],
    video_token_counts: Sequence[int | Sequence[int]],
    model_max_length: int | None,
    video_timestamps: Sequence[Sequence[float] | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels of one sample, exactly as training sees them.

    ``ChatEncoder.encode``, then ``fit_max_length``. ``LazySupervisedDataset.get_item``,
    ``TokenCounter.count``, ``SampleValidator.check`` and ``tools/infer.py`` all call this,
    so they cannot disagree on text.

    Args:
        encoder (ChatEncoder): the dataset's encoder.
        conversation (Conversation): from ``parse_conversation``.
        image_token_counts (Sequence[int]): LLM tokens of each image (``num_vision_tokens`` of its grid).
        video_token_counts (Sequence[int | Sequence[int]]): per video, its pads per vision block.
        model_max_length (int | None): see ``fit_max_length``.
        video_timestamps (Sequence[Sequence[float] | None] | None): per video, seconds per block (Qwen3-VL).

    Returns:
        tuple[np.ndarray, np.ndarray]: input_ids, labels: (L,) int64 arrays, L <= model_max_length.

    Raises:
        SampleError: kind ``tag_mismatch``, ``over_length`` or ``no_labels``.
    """
    try:
        input_ids, labels = encoder.encode(conversation, image_token_counts, video_token_counts, video_timestamps)
    except ValueError as exc:
        raise SampleError("tag_mismatch", str(exc)) from None
    return fit_max_length(input_ids, labels, encoder.vision_end_id, model_max_length)
