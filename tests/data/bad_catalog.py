"""Malformed inputs seen in real datasets, with the outcome each must produce (issues 5 and 9).

Shared by tests/data/test_bad_data.py (every case under both policies),
tests/tools/test_check_image.py and tests/train/test_bad_data_training.py.
Expected reasons are written out by hand here, not taken from the code under test.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Every good sample has a unique answer, so the sample a batch holds can be read back from its labels.
ANSWER = "Sample {k}: a green square."
MODEL_MAX_LENGTH = 256  # the catalog's over_length / no_labels cases are built against it


def good_record(k: int, image: str = "good.png") -> dict:
    return {"image": image, "conversations": [
        {"from": "human", "value": f"<image>\nWhat is shown in picture {k}?"},
        {"from": "gpt", "value": ANSWER.format(k=k)}]}


def text_record(k: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Say sample {k}."},
                              {"from": "gpt", "value": ANSWER.format(k=k)}]}


def _conv(*turns: tuple[str, Any]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in turns]


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height (the pixel data is a few bytes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _frames(count: int) -> np.ndarray:
    """``count`` flat grey 64x48 frames, frame i at level 4 * i."""
    return np.stack([np.full((48, 64, 3), 4 * i, dtype=np.uint8) for i in range(count)])


def _encode(path: Path, count: int, rate: int, container_format: str | None = None, codec: str = "libx264",
            pts: list[int] | None = None, time_base: Fraction | None = None) -> bytes:
    """Encode ``count`` frames with PyAV (x264 without B-frames: one timestamp per frame); returns the file's bytes."""
    import av

    with av.open(str(path), mode="w", format=container_format) as container:
        options = {"threads": "1", "bf": "0"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if time_base is not None:
            stream.time_base = time_base
        for number, array in enumerate(_frames(count)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[number], time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


def _patch(data: bytes, box: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with the field at ``offset`` bytes after the first ``box`` tag set to ``value`` (struct ``fmt``)."""
    at = data.index(box) + offset
    size = struct.calcsize(fmt)
    return data[:at] + struct.pack(fmt, value) + data[at + size:]


def make_bad_videos(folder: Path) -> None:
    """The broken videos of issue 9, made with PyAV and by editing container header fields.

    - ``good.mp4``: 24 frames at 12 fps (the control).
    - ``more_frames.avi``: an AVI whose header (avih dwTotalFrames, strh dwLength) promises 48 frames; 24 exist.
    - ``more_frames.mp4``: an MP4 whose time-to-sample table (stts) promises 48 frames; 24 exist.
    - ``fps_90000.mp4``: 24 frames at a 90000 fps rate (a timestamp clock taken for a frame rate).
    - ``zero_time_scale.mp4``: the media header's time scale (mdhd) set to 0: 1/1024 fps.
    - ``zero_frame_delta.mp4``: every frame lasts 0 ticks (stts delta 0): all frames share a timestamp.
    - ``gap.mkv``: 24 frames said to be 12 fps, the last one stamped at 600 s (duration != frames / fps).
    - ``jpeg.mp4`` / ``png.mp4``: still images renamed .mp4.
    """
    good = _encode(folder / "good.mp4", 24, 12)
    avi = _encode(folder / "good_avi.avi", 24, 12, codec="mpeg4")
    avi = _patch(avi, b"avih", 8 + 16, "<I", 48)  # dwTotalFrames
    (folder / "more_frames.avi").write_bytes(_patch(avi, b"strh", 8 + 32, "<I", 48))  # dwLength
    (folder / "good_avi.avi").unlink()
    (folder / "more_frames.mp4").write_bytes(_patch(good, b"stts", 12, ">I", 48))  # first entry's sample count
    _encode(folder / "fps_90000.mp4", 24, 90000)
    (folder / "zero_time_scale.mp4").write_bytes(_patch(good, b"mdhd", 16, ">I", 0))  # version 0: scale at +16
    (folder / "zero_frame_delta.mp4").write_bytes(_patch(good, b"stts", 16, ">I", 0))  # first entry's delta
    _encode(folder / "gap.mkv", 24, 12, pts=[83 * i for i in range(23)] + [600_000], time_base=Fraction(1, 1000))
    Image.new("RGB", (64, 48), (1, 2, 3)).save(folder / "jpeg.mp4", format="JPEG")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(folder / "png.mp4", format="PNG")


def make_bad_links_and_checksums(folder: Path) -> None:
    """Symlink loops (image and video), a dangling link, and PNGs with a wrong CRC byte (issue 9)."""
    for name, other in (("loop_a.png", "loop_b.png"), ("loop_b.png", "loop_a.png"),
                        ("loop_a.mp4", "loop_b.mp4"), ("loop_b.mp4", "loop_a.mp4"), ("dangling.png", "gone.png")):
        if not os.path.lexists(folder / name):
            os.symlink(folder / other, folder / name)
    png = (folder / "good.png").read_bytes()
    # bytes 29-32 are IHDR's CRC (after 8 signature + 8 length/type + 13 data bytes): flip the last one
    (folder / "bad_crc.png").write_bytes(png[:32] + bytes([png[32] ^ 0xFF]) + png[33:])


def make_media(folder: Path) -> Path:
    """Write the good and the broken media files the cases refer to; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (20, 180, 40)).save(folder / "good.png")
    rng = random.Random(5)
    (folder / "garbage.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
    buffer = folder / "whole.jpg"
    Image.new("RGB", (200, 200), (200, 30, 30)).save(buffer, quality=95)
    data = buffer.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    buffer.unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are not pixels\n")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    Image.new("RGB", (500, 2), (0, 0, 255)).save(folder / "thin.png")
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (folder / "big_header.png").write_bytes(_png_header(12_000, 12_000))
    (folder / "corrupt.mp4").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    Image.new("RGB", (56, 56), (20, 180, 40)).save(folder / "flaky.png")
    make_bad_videos(folder)
    make_bad_links_and_checksums(folder)
    return folder


@dataclass(frozen=True)
class Case:
    """One malformed sample: ``record`` (or a raw JSONL ``line``) and what training must report.

    ``reason`` is exact after ``.format(D=media folder)``; with ``regex`` it is a regular
    expression (only where a third-party library writes part of the text).
    ``load_error``: for JSONL lines, the ``ValueError`` ``bad_sample_policy=error`` raises
    at load time (``{A}`` = annotation file), since the line cannot become a sample.
    """

    name: str
    kind: str
    reason: str
    record: Any = None
    line: bytes | None = None
    regex: bool = False
    load_error: str | None = None

    @property
    def jsonl(self) -> bool:
        return self.line is not None


_WORDS = "word " * 400
_GOOD = _conv(("human", "<image>\nWhat is it?"), ("gpt", "A square."))
_VIDEO = _conv(("human", "<video>\nWhat moves?"), ("gpt", "A square."))

CASES: list[Case] = [
    # ---- the record itself
    Case("null_sample", "not_object", "sample is a NoneType, expected an object", None),
    Case("list_sample", "not_object", "sample is a list, expected an object", ["good.png", "What is it?", "A square."]),
    Case("string_sample", "not_object", "sample is a str, expected an object", "What is it? A square."),
    Case("misspelt_image_key", "unknown_key",
         "unknown key 'img' holds media paths that would be ignored (did you mean 'image'?)",
         {"img": "good.png", "conversations": _conv(("human", "What is it?"), ("gpt", "A square."))}),
    # ---- conversations
    Case("no_conversations", "no_conversation", "no 'conversations' key", {"image": "good.png"}),
    Case("empty_conversations", "no_conversation", "'conversations' must be a non-empty list of turns",
         {"conversations": []}),
    Case("string_conversations", "no_conversation", "'conversations' must be a non-empty list of turns",
         {"conversations": "What is it? A square."}),
    Case("turn_not_object", "bad_turn", "turn 0 is a str, expected an object with 'from' and 'value'",
         {"conversations": ["What is it?", "A square."]}),
    Case("unknown_role", "bad_turn", "turn 0 has unknown role 'bot' (expected human/gpt/system)",
         {"conversations": _conv(("bot", "hi"), ("gpt", "A square."))}),
    Case("missing_role", "bad_turn", "turn 0 has unknown role None (expected human/gpt/system)",
         {"conversations": [{"value": "What is it?"}, {"from": "gpt", "value": "A square."}]}),
    Case("number_value", "bad_turn", "turn 1 (gpt) has a int value, expected a string",
         {"conversations": _conv(("human", "How many?"), ("gpt", 3))}),
    Case("null_value", "bad_turn", "turn 1 (gpt) has a NoneType value, expected a string",
         {"conversations": _conv(("human", "What is it?"), ("gpt", None))}),
    Case("two_human_turns", "bad_roles", "turn 1 is 'user' where 'assistant' was expected (turns must alternate)",
         {"conversations": _conv(("human", "What"), ("human", "is it?"), ("gpt", "A square."))}),
    Case("system_then_gpt_only", "bad_roles", "no human turn in the conversation",
         {"conversations": _conv(("system", "Be brief."), ("gpt", "A square."))}),
    Case("no_answer", "no_answer", "the conversation has no assistant answer",
         {"conversations": _conv(("human", "What is it?"))}),
    Case("empty_answer", "empty_answer", "answer 1 is empty",
         {"conversations": _conv(("human", "What is it?"), ("gpt", ""))}),
    Case("whitespace_answer", "empty_answer", "answer 3 is empty",
         {"conversations": _conv(("human", "Hi"), ("gpt", "Hello."), ("human", "And?"), ("gpt", " \n\t"))}),
    Case("image_tag_in_answer", "tag_in_answer", "answer 1 contains a media tag (<image> or <video>)",
         {"image": "good.png", "conversations": _conv(("human", "<image>\nWhat is it?"), ("gpt", "It is <image>"))}),
    Case("video_tag_in_answer", "tag_in_answer", "answer 1 contains a media tag (<image> or <video>)",
         {"conversations": _conv(("human", "What is it?"), ("gpt", "See <video>"))}),
    Case("im_end_in_question", "special_token_in_text",
         "user text contains <|im_end|>, a token that structures the chat; remove it from the data",
         {"conversations": _conv(("human", "What is it?<|im_end|>"), ("gpt", "A square."))}),
    Case("image_pad_in_answer", "special_token_in_text",
         "assistant text contains <|image_pad|>, a token that structures the chat; remove it from the data",
         {"conversations": _conv(("human", "What is it?"), ("gpt", "A <|image_pad|> square."))}),
    # ---- tags versus media
    Case("two_tags_one_image", "tag_mismatch", "2 <image> tag(s) in the conversation but 1 media item(s)",
         {"image": "good.png", "conversations": _conv(("human", "<image><image>\nSame?"), ("gpt", "Yes."))}),
    Case("image_without_tag", "tag_mismatch", "0 <image> tag(s) in the conversation but 1 media item(s)",
         {"image": "good.png", "conversations": _conv(("human", "What is it?"), ("gpt", "A square."))}),
    Case("tag_without_image", "tag_mismatch", "1 <image> tag(s) in the conversation but 0 media item(s)",
         {"conversations": _GOOD}),
    Case("empty_image_list", "tag_mismatch", "1 <image> tag(s) in the conversation but 0 media item(s)",
         {"images": [], "conversations": _GOOD}),
    Case("video_tag_without_video", "tag_mismatch", "1 <video> tag(s) in the conversation but 0 media item(s)",
         {"conversations": _conv(("human", "<video>\nWhat moves?"), ("gpt", "A square."))}),
    # ---- media references
    Case("image_is_number", "bad_media_ref", "image 0: reference must be a non-empty string, got 7",
         {"image": 7, "conversations": _GOOD}),
    Case("image_is_object", "bad_media_ref",
         "image 0: reference must be a non-empty string, got {{'path': 'good.png'}}",
         {"image": {"path": "good.png"}, "conversations": _GOOD}),
    Case("image_is_empty_string", "bad_media_ref", "image 0: reference must be a non-empty string, got ''",
         {"image": "", "conversations": _GOOD}),
    # ---- media files
    Case("missing_image", "missing_media", "image 0: image file not found: {D}/nope.jpg",
         {"image": "nope.jpg", "conversations": _GOOD}),
    Case("second_image_missing", "missing_media", "image 1: image file not found: {D}/gone.png",
         {"image": ["good.png", "gone.png"],
          "conversations": _conv(("human", "<image><image>\nSame?"), ("gpt", "Yes."))}),
    Case("garbage_image", "bad_image", "image 0: cannot decode {D}/garbage.jpg: not an image format PIL can identify",
         {"image": "garbage.jpg", "conversations": _GOOD}),
    Case("truncated_jpeg", "bad_image", r"image 0: cannot decode {D}/truncated\.jpg: .*[Tt]runcated.*",
         {"image": "truncated.jpg", "conversations": _GOOD}, regex=True),
    Case("zero_byte_image", "bad_image", "image 0: cannot decode {D}/empty.png: not an image format PIL can identify",
         {"image": "empty.png", "conversations": _GOOD}),
    Case("text_file_as_image", "bad_image",
         "image 0: cannot decode {D}/notes.png: not an image format PIL can identify",
         {"image": "notes.png", "conversations": _GOOD}),
    Case("directory_as_image", "bad_image",
         "image 0: cannot decode {D}/folder.jpg: [Errno 21] Is a directory: '{D}/folder.jpg'",
         {"image": "folder.jpg", "conversations": _GOOD}),
    Case("broken_data_uri", "bad_image", "image 0: cannot decode inline image: not an image format PIL can identify",
         {"image": "data:image/png;base64,bm90IGFuIGltYWdl", "conversations": _GOOD}),
    Case("aspect_ratio_250", "bad_aspect_ratio", "image 0: aspect ratio must be at most 200, got 250.0 (500x2)",
         {"image": "thin.png", "conversations": _GOOD}),
    Case("decompression_bomb", "decompression_bomb",
         "image 0: {D}/bomb.png is a decompression bomb: Image size (10000000000 pixels) exceeds limit of "
         "178956970 pixels, could be decompression bomb DOS attack.",
         {"image": "bomb.png", "conversations": _GOOD}),
    Case("over_pixel_limit", "decompression_bomb",
         "image 0: {D}/big_header.png is 12000x12000 = 144,000,000 pixels, more than the 89,478,485-pixel limit "
         "(a decompression bomb?); shrink it offline or raise qwenvl.data.vision.MAX_IMAGE_PIXELS",
         {"image": "big_header.png", "conversations": _GOOD}),
    Case("missing_video", "missing_media", "video 0: video file not found: {D}/nope.mp4",
         {"video": "nope.mp4", "conversations": _conv(("human", "<video>\nWhat moves?"), ("gpt", "A square."))}),
    Case("corrupt_video", "bad_video", r"video 0: .*{D}/corrupt\.mp4.*",
         {"video": "corrupt.mp4", "conversations": _conv(("human", "<video>\nWhat moves?"), ("gpt", "A square."))},
         regex=True),
    # ---- length (MODEL_MAX_LENGTH)
    Case("over_length_cuts_image", "over_length",
         rf"over-length: \d+ tokens > model_max_length {MODEL_MAX_LENGTH} and the cut would split a vision block "
         r"\(last vision token at \d+\)",
         {"image": "good.png", "conversations": _conv(("human", _WORDS + "<image>"), ("gpt", "A square."))},
         regex=True),
    Case("answer_truncated_away", "no_labels", "no answer token survives (empty answers or truncated away)",
         {"conversations": _conv(("human", _WORDS), ("gpt", "A square."))}),
    # ---- issue 9: (a) a header that promises more frames than the file holds
    Case("avi_header_promises_more_frames", "bad_video",
         "video 0: broken video {D}/more_frames.avi: the header promises 48 frames but the file holds only 24 "
         "(a truncated file or an edited header); its frames cannot be sampled as planned",
         {"video": "more_frames.avi", "conversations": _VIDEO}),
    Case("mp4_header_promises_more_frames", "bad_video",
         "video 0: broken video {D}/more_frames.mp4: the header promises 48 frames but the file holds only 24 "
         "(a truncated file or an edited header); its frames cannot be sampled as planned",
         {"video": "more_frames.mp4", "conversations": _VIDEO}),
    # ---- (b) nonsense frame rates and timing
    Case("fps_90000", "bad_video",
         "video 0: broken video metadata in {D}/fps_90000.mp4: 90000 fps is outside [0.01, 1000] (a broken header: "
         "the frame rate is not believable); re-encode the video with its real frame rate",
         {"video": "fps_90000.mp4", "conversations": _VIDEO}),
    Case("zero_time_scale", "bad_video",
         "video 0: broken video metadata in {D}/zero_time_scale.mp4: 0.000976562 fps is outside [0.01, 1000] (a "
         "broken header: the frame rate is not believable); re-encode the video with its real frame rate",
         {"video": "zero_time_scale.mp4", "conversations": _VIDEO}),
    Case("zero_frame_delta", "bad_video",
         r"video 0: broken timestamps in {D}/zero_frame_delta\.mp4: 24 frames share \d+ timestamps, so frames cannot "
         r"be told apart; re-encode the video",
         {"video": "zero_frame_delta.mp4", "conversations": _VIDEO}, regex=True),
    Case("duration_disagrees_with_frames_and_fps", "bad_video",
         "video 0: inconsistent video metadata in {D}/gap.mkv: 24 frames at 12 fps last 2.000 s but the frames' "
         "timestamps span 600.083 s; re-encode the video at a constant frame rate",
         {"video": "gap.mkv", "conversations": _VIDEO}),
    # ---- (c) still images given as videos
    Case("jpeg_named_mp4", "bad_video",
         "video 0: {D}/jpeg.mp4 is a JPEG image, not a video: list it under 'image' with an <image> tag",
         {"video": "jpeg.mp4", "conversations": _VIDEO}),
    Case("png_named_mp4", "bad_video",
         "video 0: {D}/png.mp4 is a PNG image, not a video: list it under 'image' with an <image> tag",
         {"video": "png.mp4", "conversations": _VIDEO}),
    # ---- (d) media tags in the system turn
    Case("image_tag_in_system", "tag_in_system",
         "system turn 0 contains a media tag (<image> or <video>); put media tags in a human turn",
         {"image": "good.png", "conversations": _conv(("system", "Look at <image> first."),
                                                      ("human", "What is it?"), ("gpt", "A square."))}),
    Case("video_tag_in_system", "tag_in_system",
         "system turn 0 contains a media tag (<image> or <video>); put media tags in a human turn",
         {"conversations": _conv(("system", "<video>"), ("human", "What moves?"), ("gpt", "A square."))}),
    # ---- (e) unpaired surrogates (json.loads accepts "\ud800"; no UTF-8 encoder does)
    Case("surrogate_in_question", "invalid_unicode",
         "conversations[0].value holds an unpaired surrogate \\ud800 at character 4: not valid Unicode (a broken "
         "\\u escape in the JSON); fix the text",
         {"conversations": _conv(("human", "Why \ud800?"), ("gpt", "A square."))}),
    Case("low_surrogate_in_answer", "invalid_unicode",
         "conversations[1].value holds an unpaired surrogate \\udc00 at character 2: not valid Unicode (a broken "
         "\\u escape in the JSON); fix the text",
         {"conversations": _conv(("human", "Why?"), ("gpt", "A \udc00 square."))}),
    Case("surrogate_in_metadata", "invalid_unicode",
         "id holds an unpaired surrogate \\udbff at character 0: not valid Unicode (a broken \\u escape in the "
         "JSON); fix the text",
         {"id": "\udbff", "conversations": _conv(("human", "Why?"), ("gpt", "A square."))}),
    # ---- (g) the real cause of a link or checksum problem
    Case("image_symlink_loop", "missing_media",
         "image 0: image file {D}/loop_a.png is a symlink loop (too many levels of symbolic links)",
         {"image": "loop_a.png", "conversations": _GOOD}),
    Case("video_symlink_loop", "missing_media",
         "video 0: video file {D}/loop_a.mp4 is a symlink loop (too many levels of symbolic links)",
         {"video": "loop_a.mp4", "conversations": _VIDEO}),
    Case("dangling_symlink", "missing_media",
         "image 0: image file {D}/dangling.png is a broken symbolic link (to '{D}/gone.png')",
         {"image": "dangling.png", "conversations": _GOOD}),
    Case("png_checksum_error", "bad_image",
         "image 0: cannot decode {D}/bad_crc.png: PNG checksum (CRC) error in the IHDR chunk at byte 8 (stored "
         "0x27e4acb6, computed 0x27e4ac49): the file is corrupt",
         {"image": "bad_crc.png", "conversations": _GOOD}),
    # ---- JSONL lines
    Case("unparseable_jsonl_line", "bad_json",
         "line 2: invalid JSON line: Expecting value (column 20)", line=b'{"conversations": [',
         load_error="{A}:2: invalid JSON line: Expecting value (column 20)"),
    Case("single_quoted_jsonl_line", "bad_json",
         "line 2: invalid JSON line: Expecting property name enclosed in double quotes (column 2)",
         line=b"{'conversations': []}",
         load_error="{A}:2: invalid JSON line: Expecting property name enclosed in double quotes (column 2)"),
    Case("latin1_jsonl_line", "bad_json", "line 2: invalid JSON line: not valid UTF-8 (column 21)",
         line=b'{"conversations": ["\xe9t\xe9"]}',
         load_error="{A}:2: invalid JSON line: not valid UTF-8 (column 21)"),
    Case("array_jsonl_line", "not_object", "sample is a list, expected an object", line=b'["good.png", "A square."]'),
    Case("surrogate_jsonl_line", "invalid_unicode",
         "conversations[0].value holds an unpaired surrogate \\ud83d at character 3: not valid Unicode (a broken "
         "\\u escape in the JSON); fix the text",
         line=b'{"conversations": [{"from": "human", "value": "Hi \\ud83d?"}, {"from": "gpt", "value": "Yo."}]}'),
]


def write_case(case: Case, folder: Path) -> Path:
    """``[good 0, the case, good 2]`` as ``{name}.json`` (or ``.jsonl``) in ``folder``; returns its path."""
    if case.jsonl:
        path = folder / f"{case.name}.jsonl"
        lines = [json.dumps(good_record(0)).encode(), case.line, json.dumps(good_record(2)).encode()]
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path = folder / f"{case.name}.json"
        path.write_text(json.dumps([good_record(0), case.record, good_record(2)]))
    return path


def expected_reason(case: Case, media: Path) -> str:
    return case.reason.format(D=media)


# ---- the 10 %-bad training set: (registry name, file, bad index -> kind)
def write_training_set(folder: Path) -> dict[str, dict]:
    """Two datasets, 30 samples, 3 bad (10 %): an image set (20, 2 bad) and a JSONL text set (10, 1 bad line).

    Returns:
        ``{name: {"annotation_path", "data_path", "bad": {index: kind}, "good": {index: k}}}``;
        good sample ``k`` answers ``ANSWER.format(k=k)``.
    """
    make_media(folder)
    images, image_bad = [], {7: "missing_media", 13: "bad_image"}
    for index in range(20):
        if index == 7:
            images.append({"image": "nope.jpg", "conversations": _GOOD})
        elif index == 13:
            images.append({"image": "garbage.jpg", "conversations": _GOOD})
        else:
            images.append(good_record(index))
    (folder / "mix_images.json").write_text(json.dumps(images))
    lines = []
    for index in range(10):
        lines.append(b'{"conversations": [' if index == 4 else json.dumps(text_record(100 + index)).encode())
    (folder / "mix_text.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {
        "bad_mix_images": {"annotation_path": str(folder / "mix_images.json"), "data_path": str(folder),
                           "bad": image_bad, "good": {i: i for i in range(20) if i not in image_bad}},
        "bad_mix_text": {"annotation_path": str(folder / "mix_text.jsonl"), "data_path": "",
                         "bad": {4: "bad_json"}, "good": {i: 100 + i for i in range(10) if i != 4}},
    }


# ---- issue 9: one sample of each new class among good ones, for training runs
ISSUE9_CASES = ("avi_header_promises_more_frames", "fps_90000", "jpeg_named_mp4", "image_tag_in_system",
                "surrogate_in_question", "image_symlink_loop", "png_checksum_error", "surrogate_jsonl_line")


def write_issue9_set(folder: Path) -> dict[str, dict]:
    """Two datasets, 18 samples, 8 bad: one of each issue-9 class (``ISSUE9_CASES``) between good samples.

    ``issue9_json`` (14 samples: good at even indices, the 7 record cases at odd ones) and
    ``issue9_jsonl`` (4 lines: good, the surrogate line, good, good).

    Returns:
        ``{name: {"annotation_path", "data_path", "bad": {index: (kind, message)}, "good": {index: k}}}``
        with messages written out from the catalog's hand-written reasons.
    """
    make_media(folder)
    by_name = {case.name: case for case in CASES}
    record_cases = [by_name[name] for name in ISSUE9_CASES if not by_name[name].jsonl]
    records, bad, good = [], {}, {}
    for case in record_cases:
        good[len(records)] = 200 + len(records)
        records.append(good_record(200 + len(records)))
        bad[len(records)] = case
        records.append(case.record)
    json_path = folder / "issue9.json"
    json_path.write_text(json.dumps(records))
    line_case = by_name["surrogate_jsonl_line"]
    lines = [json.dumps(text_record(300)).encode(), line_case.line, json.dumps(text_record(302)).encode(),
             json.dumps(text_record(303)).encode()]
    jsonl_path = folder / "issue9.jsonl"
    jsonl_path.write_bytes(b"\n".join(lines) + b"\n")

    def message(path: Path, index: int, case: Case) -> tuple[str, str]:
        return case.kind, f"{path}:{index}: " + case.reason.format(D=folder)

    return {
        "issue9_json": {"annotation_path": str(json_path), "data_path": str(folder),
                        "bad": {i: message(json_path, i, c) for i, c in bad.items()}, "good": good},
        "issue9_jsonl": {"annotation_path": str(jsonl_path), "data_path": "",
                         "bad": {1: message(jsonl_path, 1, line_case)}, "good": {0: 300, 2: 302, 3: 303}},
    }
