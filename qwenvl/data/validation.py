"""The checks every sample passes, shared by training (``LazySupervisedDataset``) and ``tools/check_image.py``.

A problem is reported as ``{annotation file}:{index}: what is wrong`` with a
short ``kind`` label. Checks run in this order and the first failing one is
the sample's problem, for training and the tool alike:

1. record (no I/O): ``bad_json``, ``not_object``, ``invalid_unicode``, ``unknown_key``, the
   conversation kinds (``no_conversation``, ``bad_turn``, ``bad_roles``,
   ``no_answer``, ``empty_answer``, ``tag_in_answer``, ``tag_in_system``),
   ``special_token_in_text``, ``bad_media_ref``, ``tag_mismatch``;
2. media, decoded exactly as training decodes them: ``missing_media``,
   ``bad_image``, ``decompression_bomb``, ``bad_aspect_ratio``, ``too_small``,
   ``bad_video``, ``io_error`` (transient I/O errors that outlived the retries);
3. tokens (needs the tokenizer): ``tag_mismatch``, ``over_length``, ``no_labels``.

``PROBLEM_KINDS`` documents every kind. ``SampleValidator.validate`` reports any other
exception raised while checking a sample as that sample's ``unexpected_error``.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from qwenvl.data.chat import (
    IMAGE_TAG,
    VIDEO_TAG,
    BadRecord,
    BadSampleError,
    ChatEncoder,
    Conversation,
    ConversationError,
    Problem,
    SampleError,
    SampleRef,
    encode_sample,
    parse_conversation,
    sample_images,
    sample_videos,
)
from qwenvl.data.hf_items import ProcessorItemBuilder
from qwenvl.data.video import VideoError, VideoPlan, load_video_plan
from qwenvl.data.vision import (
    ImageError,
    VisionConfig,
    is_transient_io_error,
    media_file_problem,
    num_vision_tokens,
    open_image,
    resolve_path,
    smart_resize,
)
from qwenvl.models import ModelFamily, SpecialTokens, VisionSettings
from qwenvl.train.argument import DataArguments

logger = logging.getLogger(__name__)

PROBLEM_KINDS: dict[str, str] = {
    "bad_json": "a JSONL line that does not parse (or is not UTF-8)",
    "not_object": "the sample is not a JSON object",
    "invalid_unicode": "a string holds an unpaired surrogate (a broken \\uD800-\\uDFFF escape in the JSON)",
    "unknown_key": "a key the loader ignores holds media paths (a misspelt 'image'/'video'/'conversations')",
    "no_conversation": "'conversations' is missing, empty or not a list",
    "bad_turn": "a turn is not an object, has an unknown role or a non-string value",
    "bad_roles": "turns do not alternate human/gpt after the optional system turn",
    "no_answer": "no assistant answer",
    "empty_answer": "an assistant answer is empty or whitespace",
    "tag_in_answer": "an answer contains <image> or <video>",
    "tag_in_system": "the system turn contains <image> or <video>",
    "special_token_in_text": "a turn contains a chat-structure token such as <|im_end|> or <|image_pad|>",
    "bad_media_ref": "an image/video reference is not a non-empty string",
    "tag_mismatch": "the number of <image>/<video> tags differs from the number of images/videos",
    "missing_media": "a media file does not exist (or is a broken symbolic link or a symlink loop)",
    "bad_image": "an image does not decode",
    "decompression_bomb": "an image has more pixels than vision.MAX_IMAGE_PIXELS",
    "bad_aspect_ratio": "an image's long side is more than 200 times its short side",
    "too_small": "an image leaves no 28x28 patch after resizing",
    "bad_video": "a video does not decode, its header promises frames the file does not hold, its fps or "
                 "timestamps are nonsense, it is a still image, or its frames cannot be resized",
    "io_error": "transient I/O errors (EIO, ESTALE, timeouts) outlived the retries",
    "over_length": "longer than model_max_length and the cut would split a vision block",
    "no_labels": "no answer token is left to learn (after truncation)",
    "unexpected_error": "checking the sample raised an exception no check expected (a bug or an unforeseen input)",
}

# Keys the loader reads; any other key is metadata and ignored (``id``, ``source`` ...).
KNOWN_KEYS = ("conversations", "messages", "image", "images", "video", "videos")
MEDIA_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic",
                    ".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpeg", ".mpg")
# Tokens that structure the chat or the vision blocks: inside a turn's text they would shift
# the label mask or the image-token count. Grounding tokens (<|box_start|> ...) are fine.
# ``check_record`` takes them from the sample's family (``family.tokens``); these, the same strings
# for every Qwen-VL family so far, are for callers without one.
STRUCTURE_TOKENS = SpecialTokens().structure()

T = TypeVar("T")


@dataclass(frozen=True)
class ImageInfo:
    """One image of a valid sample as training gives it to the model (``tools/check_image.py`` reports it).

    Attributes:
        number (int): its position among the sample's images.
        width (int): width of the file, in pixels.
        height (int): height of the file, in pixels.
        processed_width (int): width of its pixel values (Qwen: after ``smart_resize``; HF-processor families: the
            processor's output, e.g. LLaVA's 336 crop).
        processed_height (int): height of its pixel values.
        tokens (int | None): LLM tokens it becomes (None: the family writes an image in several runs).
    """

    number: int
    width: int
    height: int
    processed_width: int
    processed_height: int
    tokens: int | None


@dataclass(frozen=True)
class CheckedRecord:
    """A record that passed the structural checks."""

    conversation: Conversation
    images: list[str]
    videos: list[str]


_SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value: Any, field: str = "") -> str | None:
    """Where an unpaired surrogate hides in a parsed JSON value, described; None when there is none.

    ``json.loads`` accepts ``"\\ud800"`` and returns a string no UTF-8 encoder (the
    tokenizer, a log, a JSON writer) can take. Keys and values are searched.

    Example:
        >>> find_surrogate({"conversations": [{"from": "human", "value": "hi \\ud800"}]})
        'conversations[0].value holds an unpaired surrogate \\ud800 at character 3'
    """
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        if match is None:
            return None
        return (f"{field or 'the sample'} holds an unpaired surrogate \\u{ord(match.group()):04x} at character "
                f"{match.start()}")
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return find_surrogate(key, f"a key of {field or 'the sample'}")
            found = find_surrogate(item, name)
            if found:
                return found
    elif isinstance(value, list):
        for number, item in enumerate(value):
            found = find_surrogate(item, f"{field}[{number}]")
            if found:
                return found
    return None


def _looks_like_media(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_looks_like_media(v) for v in value)
    return isinstance(value, str) and (value.lower().endswith(MEDIA_EXTENSIONS) or value.startswith("data:image/"))


def check_record(record: Any, annotation_path: str, index: int, family: ModelFamily | None = None) -> CheckedRecord:
    """Structural checks of one annotation record; no file is opened.

    Args:
        record: one item of the annotation file (a ``BadRecord`` for a JSONL line that did not parse).
        annotation_path: the file, for messages.
        index: the sample's position in the file, for messages.
        family: the checkpoint's family, whose special tokens (``family.tokens.structure()``) may not
            appear in a turn's text; None = ``STRUCTURE_TOKENS`` (those of every Qwen-VL family so far).

    Returns:
        the parsed conversation and the sample's image and video references.

    Raises:
        BadSampleError: ``"{annotation_path}:{index}: {reason}"`` with one of the
            record kinds of ``PROBLEM_KINDS``.

    Example:
        >>> check_record({"image": "a.jpg", "conversations": [{"from": "human", "value": "hi"},
        ...               {"from": "gpt", "value": "yo"}]}, "d.json", 3)
        Traceback (most recent call last):
        BadSampleError: d.json:3: 0 <image> tag(s) in the conversation but 1 media item(s)
    """
    def bad(reason: str, kind: str) -> BadSampleError:
        return BadSampleError(annotation_path, index, reason, kind)

    if isinstance(record, BadRecord):
        raise bad(record.reason, record.kind)
    if not isinstance(record, dict):
        raise bad(f"sample is a {type(record).__name__}, expected an object", "not_object")
    surrogate = find_surrogate(record)
    if surrogate is not None:
        raise bad(f"{surrogate}: not valid Unicode (a broken \\u escape in the JSON); fix the text",
                  "invalid_unicode")
    for key, value in record.items():
        if key not in KNOWN_KEYS and _looks_like_media(value):
            guess = difflib.get_close_matches(str(key).lower(), KNOWN_KEYS, n=1, cutoff=0.4)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise bad(f"unknown key {key!r} holds media paths that would be ignored{hint}", "unknown_key")
    try:
        conversation = parse_conversation(record)
    except ConversationError as exc:
        raise bad(str(exc), exc.kind) from None
    structure = STRUCTURE_TOKENS if family is None else family.tokens.structure()
    texts = ([("system", conversation.system)] if conversation.system is not None else []) + conversation.turns
    for role, text in texts:
        found = [token for token in structure if token in text]
        if found:
            raise bad(f"{role} text contains {', '.join(found)}, a token that structures the chat; remove it "
                      f"from the data", "special_token_in_text")
    images, videos = sample_images(record), sample_videos(record)
    for what, items in (("image", images), ("video", videos)):
        for number, source in enumerate(items):
            if not isinstance(source, str) or not source.strip():
                raise bad(f"{what} {number}: reference must be a non-empty string, got {source!r}", "bad_media_ref")
    for tag, items in ((IMAGE_TAG, images), (VIDEO_TAG, videos)):
        tags = sum(text.count(tag) for role, text in conversation.turns if role == "user")
        if tags != len(items):
            # Same wording as ChatEncoder.encode, which checks the token ids again.
            raise bad(f"{tags} {tag} tag(s) in the conversation but {len(items)} media item(s)", "tag_mismatch")
    return CheckedRecord(conversation, images, videos)


def with_io_retries(load: Callable[[], T], retries: int = 3, backoff: float = 0.5, what: str = "") -> T:
    """Call ``load``, retrying transient I/O errors (``is_transient_io_error``) with exponential backoff.

    Args:
        load: reads the files (e.g. ``lambda: dataset.get_item(i)``).
        retries: extra attempts after the first one.
        backoff: seconds before the first retry; doubles each time.
        what: names the sample in the log line of each retry.

    Returns:
        what ``load`` returns.

    Raises:
        OSError: the last transient error, once ``retries`` retries failed too.
            Any other exception of ``load`` propagates at once.
    """
    for attempt in range(retries + 1):
        try:
            return load()
        except OSError as exc:
            if not is_transient_io_error(exc) or attempt == retries:
                raise
            delay = backoff * 2 ** attempt
            logger.warning("%s: transient I/O error (%s), retry %d of %d in %.1fs", what, exc, attempt + 1,
                           retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def io_error(exc: OSError, annotation_path: str, index: int, attempts: int) -> BadSampleError:
    """The ``io_error`` problem for a transient error that outlived ``attempts`` attempts."""
    return BadSampleError(annotation_path, index, f"I/O error after {attempts} attempts: {exc}", "io_error")


def load_image_checked(source: str, number: int, data_path: str, annotation_path: str, index: int):
    """``vision.open_image`` with its ``ImageError`` turned into this sample's ``BadSampleError``.

    Returns:
        the RGB PIL image.

    Raises:
        BadSampleError: ``"{file}:{index}: image {number}: {why}"``, kind from the ``ImageError``.
        OSError: transient I/O errors, for ``with_io_retries``.
    """
    try:
        return open_image(source, data_path)
    except ImageError as exc:
        raise BadSampleError(annotation_path, index, f"image {number}: {exc}", exc.kind) from None


def load_video_checked(source: str, number: int, data_path: str, data_args: Any, vision_config: VisionConfig,
                       annotation_path: str, index: int, family: ModelFamily | None = None,
                       settings: VisionSettings | None = None) -> tuple[Any, VideoPlan]:
    """``video.load_video_plan`` with a missing file (``missing_media``) and ``VideoError`` (``bad_video``) as problems.

    Args:
        source (str): the video reference as written.
        number (int): its position among the sample's videos, for messages.
        data_path (str): the dataset's media folder.
        data_args (Any): the video flags.
        vision_config (VisionConfig): patch geometry and normalisation.
        annotation_path (str): the sample's file, for messages.
        index (int): the sample's index, for messages.
        family (ModelFamily | None): the checkpoint's family (its video rule); None = Qwen2/2.5-VL's.
        settings (VisionSettings | None): the checkpoint's processor settings.

    Returns:
        tuple[Any, VideoPlan]: pixel_values_videos and the plan (grid, seconds, timestamps).

    Raises:
        BadSampleError: ``"{file}:{index}: video {number}: {why}"``.
    """
    path = resolve_path(source, data_path)
    missing = media_file_problem(path, "video")
    if missing is not None:
        raise BadSampleError(annotation_path, index, f"video {number}: {missing}", "missing_media")
    try:
        return load_video_plan(source, data_path, data_args, vision_config, family=family, settings=settings)
    except VideoError as exc:
        raise BadSampleError(annotation_path, index, f"video {number}: {exc}", "bad_video") from None


class SampleValidator:
    """Runs training's checks on annotation records, without building training tensors.

    Images are decoded with ``open_image`` and sized with ``smart_resize`` (what
    ``process_image`` does before patchifying), videos decoded with
    ``load_video``; with a tokenizer the sample is also encoded with the same
    ``encode_sample`` the dataset calls, which finds ``over_length`` and
    ``no_labels``.

    Args:
        vision_config: patch geometry and image pixel limits, as in training.
        data_args: frame sampling flags for videos (``DataArguments``); None = defaults.
        tokenizer: the checkpoint's tokenizer, or None to skip the token checks.
        model_max_length: training's ``--model_max_length`` (token checks only).
        io_retries: retries of transient I/O errors per sample.
        io_backoff: seconds before the first retry.

    Example:
        >>> validator = SampleValidator(VisionConfig())
        >>> ref = SampleRef("demo", "demo/single_image.json", "demo", 0)
        >>> validator.validate({"image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>"},
        ...                     {"from": "gpt", "value": "x"}]}, ref).kind
        'missing_media'
    """

    def __init__(self, vision_config: VisionConfig, data_args: Any = None, tokenizer: Any = None,
                 model_max_length: int | None = None, io_retries: int = 3, io_backoff: float = 0.5,
                 family: ModelFamily | None = None, settings: VisionSettings | None = None):
        if data_args is None:
            data_args = DataArguments()
        self.family, self.settings = family, settings
        self.vision_config = vision_config
        self.data_args = data_args
        self.model_max_length = model_max_length
        self.io_retries, self.io_backoff = io_retries, io_backoff
        self.encoder = None
        if tokenizer is not None:
            self.encoder = ChatEncoder(tokenizer, family)

    def check(self, record: Any, ref: SampleRef) -> list[ImageInfo]:
        """All checks of one record, in training's order.

        Returns:
            list[ImageInfo]: each image's size as training gives it to the model and its tokens.

        Raises:
            BadSampleError: the sample's first problem.
        """
        path, index = ref.annotation_path, ref.index
        checked = check_record(record, path, index, self.family)
        cfg = self.vision_config
        image_tokens, video_tokens, timestamps, infos = [], [], [], []
        for number, source in enumerate(checked.images):
            image = self._retrying(lambda: load_image_checked(source, number, ref.data_path, path, index), ref)
            try:
                height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            except ImageError as exc:
                raise BadSampleError(path, index, f"image {number}: {exc}", exc.kind) from None
            image_tokens.append(num_vision_tokens((1, height // cfg.patch_size, width // cfg.patch_size),
                                                  cfg.merge_size))
            infos.append(ImageInfo(number, image.width, image.height, width, height, image_tokens[-1]))
        for number, source in enumerate(checked.videos):
            _, plan = self._retrying(lambda: load_video_checked(source, number, ref.data_path, self.data_args, cfg,
                                                                path, index, self.family, self.settings), ref)
            video_tokens.append(video_block_tokens(plan.grid_thw, cfg.merge_size, self.family))
            timestamps.append(plan.timestamps)
        if self.encoder is not None:
            try:
                encode_sample(self.encoder, checked.conversation, image_tokens, video_tokens, self.model_max_length,
                              timestamps)
            except SampleError as exc:
                raise BadSampleError(path, index, exc.reason, exc.kind) from None
        return infos

    def validate(self, record: Any, ref: SampleRef) -> Problem | None:
        """The sample's first problem, or None when training would use it.

        Any exception other than ``BadSampleError`` is this sample's ``unexpected_error``
        (with the exception's type and message), so one odd sample never stops a check.
        """
        return self.inspect(record, ref)[0]

    def inspect(self, record: Any, ref: SampleRef) -> tuple[Problem | None, list[ImageInfo]]:
        """``validate`` plus the images of a valid sample as training sizes them (``check``'s ``ImageInfo``).

        Returns:
            tuple[Problem | None, list[ImageInfo]]: the first problem (then no images), or None and the images.
        """
        try:
            infos = self.check(record, ref)
        except BadSampleError as exc:
            return Problem.from_error(exc, ref.dataset), []
        except Exception as exc:  # noqa: BLE001 - reported as the sample's problem, see validate's docstring
            logger.debug("unexpected error on %s:%s", ref.annotation_path, ref.index, exc_info=True)
            return Problem(ref.dataset, ref.annotation_path, ref.index, "unexpected_error",
                           unexpected_reason(exc)), []
        return None, list(infos or [])  # a subclass's check may return None

    def _retrying(self, load: Callable[[], T], ref: SampleRef) -> T:
        try:
            return with_io_retries(load, self.io_retries, self.io_backoff, f"{ref.annotation_path}:{ref.index}")
        except OSError as exc:
            raise io_error(exc, ref.annotation_path, ref.index, self.io_retries + 1) from None


class ProcessorSampleValidator(SampleValidator):
    """Training's checks for an HF-processor family (``family.uses_processor_items``, e.g. LLaVA).

    The record checks and image decoding are ``SampleValidator``'s; the sample is then built by the same
    ``ProcessorItemBuilder.build`` ``LazySupervisedDataset`` calls for these families (the checkpoint's chat
    template and processor), which finds ``tag_mismatch``, ``over_length`` and ``no_labels``, and gives each
    image's processed size and tokens exactly as training feeds them.

    Args:
        processor (Any): the checkpoint's ``AutoProcessor``.
        family (ModelFamily): its family.
        model_max_length (int | None): training's ``--model_max_length``.
        train_on_prompt (bool): training's ``--train_on_prompt``.
        io_retries (int): retries of transient I/O errors per sample.
        io_backoff (float): seconds before the first retry.
    """

    def __init__(self, processor: Any, family: ModelFamily, model_max_length: int | None = None,
                 train_on_prompt: bool = False, io_retries: int = 3, io_backoff: float = 0.5):
        super().__init__(family.vision_defaults.image_config(), model_max_length=model_max_length,
                         io_retries=io_retries, io_backoff=io_backoff, family=family)
        self.builder = ProcessorItemBuilder(processor, family, train_on_prompt)
        self.encoder = self.builder  # the token checks run (check_image reports whether they did)
        # The token the model puts image features at (Gemma 3: its soft token, not the <start_of_image> a record's
        # tag becomes); processors name it image_token_id.
        self.feature_id = int(getattr(processor, "image_token_id", None) or self.builder.image_id)

    def check(self, record: Any, ref: SampleRef) -> list[ImageInfo]:
        """Record checks, image decoding, then ``ProcessorItemBuilder.build`` (see the class docstring).

        Returns:
            list[ImageInfo]: each image's original size, the size of its pixel values and its tokens.

        Raises:
            BadSampleError: the sample's first problem.
        """
        path, index = ref.annotation_path, ref.index
        checked = check_record(record, path, index, self.family)
        if checked.videos and "pixel_values_videos" not in self.family.media_keys:
            raise BadSampleError(path, index, f"{len(checked.videos)} video(s), but the {self.family.model_type} "
                                 f"family takes images only", "unsupported_media")
        images = [self._retrying(lambda: load_image_checked(source, number, ref.data_path, path, index), ref)
                  for number, source in enumerate(checked.images)]
        try:
            item = self.builder.build(checked.conversation, images, self.model_max_length)
        except SampleError as exc:
            raise BadSampleError(path, index, exc.reason, exc.kind) from None
        return processor_image_infos(item, images, self.feature_id)


def processor_image_infos(item: dict[str, Any], images: Sequence[Any], image_id: int) -> list[ImageInfo]:
    """Each image of a processor-built item: original size, the size of its pixel values (the last two dims of
    ``pixel_values``, a tile for tiling families) and its tokens: the length of its run of ``image_id`` (the token
    the model puts image features at) in ``input_ids`` when the item has one run per image, else None (a family
    that splits an image into several runs; ``ImageInfo.tokens`` then stays unknown rather than guessed).

    Example:
        >>> [i.tokens for i in processor_image_infos(llava_item_of_two_images, two_images, image_id)]
        [576, 576]
    """
    ids = item["input_ids"].numpy() if hasattr(item["input_ids"], "numpy") else item["input_ids"]
    where = [int(k) for k in range(len(ids)) if int(ids[k]) == image_id]
    runs: list[int] = []
    for position, k in enumerate(where):
        if position and where[position - 1] == k - 1:
            runs[-1] += 1
        else:
            runs.append(1)
    pixels = item.get("pixel_values")
    height, width = (int(pixels.shape[-2]), int(pixels.shape[-1])) if pixels is not None else (0, 0)
    return [ImageInfo(number, image.width, image.height, width, height,
                      runs[number] if len(runs) == len(images) else None)
            for number, image in enumerate(images)]


def video_block_tokens(grid_thw: Sequence[int], merge_size: int, family: ModelFamily | None) -> list[int]:
    """Pads of each vision block a video is written as (``family.video_block_lengths``; one block without a family).

    Example:
        >>> video_block_tokens((2, 4, 4), 2, None), video_block_tokens((2, 4, 4), 2, family_for("qwen3_vl"))
        ([8], [4, 4])
    """
    if family is None:
        return [num_vision_tokens(grid_thw, merge_size)]
    return family.video_block_lengths(grid_thw, merge_size)


def unexpected_reason(exc: BaseException) -> str:
    """The reason reported for an exception no check expected: its type and message.

    Example:
        >>> unexpected_reason(TypeError("bad input"))
        'unexpected error: TypeError: bad input'
    """
    return f"unexpected error: {type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")


def summarize(problems: Sequence[Problem], total: int) -> dict[str, Any]:
    """Counts for a report: total, valid, and problems per kind (most frequent first).

    Example:
        >>> summarize([Problem("d", "d.json", 0, "missing_media", "...")], 10)
        {'total': 10, 'valid': 9, 'problems': 1, 'kinds': {'missing_media': 1}}
    """
    kinds: dict[str, int] = {}
    for problem in problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
    ordered = dict(sorted(kinds.items(), key=lambda item: (-item[1], item[0])))
    return {"total": total, "valid": total - len(problems), "problems": len(problems), "kinds": ordered}
