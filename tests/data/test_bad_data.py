"""Bad data (issue 5): every malformed input of the catalog under both policies, annotation files,
images (EXIF, modes, decompression bombs), transient I/O errors, truncation and the collators.

The expected messages are written out by hand in tests/data/bad_catalog.py.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl.data as registry
import qwenvl.data.data_qwen as data_qwen
from qwenvl.data.data_qwen import (
    BAD_SAMPLES_KEY,
    IGNORE_INDEX,
    BadRecord,
    BadSampleError,
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    Problem,
    load_annotations,
    placeholder_batch,
)
from qwenvl.data.validation import PROBLEM_KINDS, SampleValidator, with_io_retries
from qwenvl.data.video import VideoError, VideoMeta, check_video_meta
from qwenvl.data.vision import ImageError, VisionConfig, image_size, open_image, to_rgb
from qwenvl.train.argument import DataArguments
from tests.data.bad_catalog import ANSWER, CASES, MODEL_MAX_LENGTH, good_record, make_media, write_case


@pytest.fixture(autouse=True)
def no_hang():
    """Every test here must finish within 60 s: a hang is a failure, not a stuck CI job."""
    def fail(signum, frame):
        raise TimeoutError("test took more than 60 s (hang?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("bad_media"))


@pytest.fixture(scope="module")
def vision_config(image_processor) -> VisionConfig:
    return VisionConfig.from_image_processor(image_processor, 16 * 28 * 28, 64 * 28 * 28)


@pytest.fixture
def register():
    names = []

    def add(name: str, annotation_path: Path | str, data_path: Path | str) -> str:
        registry.data_dict[name] = {"annotation_path": str(annotation_path), "data_path": str(data_path)}
        names.append(name)
        return name

    yield add
    for name in names:
        registry.data_dict.pop(name, None)


def make_dataset(tokenizer, vision_config, name: str, policy: str, **kwargs) -> LazySupervisedDataset:
    kwargs.setdefault("model_max_length", MODEL_MAX_LENGTH)
    return LazySupervisedDataset(tokenizer, DataArguments(dataset_use=name), vision_config, bad_sample_policy=policy,
                                 io_backoff=0.0, **kwargs)


def answer_of(tokenizer, item: dict) -> str:
    """The learned text of one item (its answer), decoded from the labels."""
    labels = item["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX]).removesuffix("<|im_end|>\n")


def assert_reason(case, media: Path, annotation: Path, message: str) -> None:
    if case.regex:
        expected = f"{re.escape(str(annotation))}:1: " + case.reason.format(D=re.escape(str(media)))
        assert re.fullmatch(expected, message, flags=re.DOTALL), message
    else:
        assert message == f"{annotation}:1: " + case.reason.format(D=media)


# ---------------------------------------------------------------------- catalog
def test_catalog_is_large_and_distinct():
    assert len(CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)
    assert len({json.dumps(case.record, sort_keys=True) if case.line is None else case.line.decode("latin-1")
                for case in CASES}) == len(CASES)
    assert {case.kind for case in CASES} <= set(PROBLEM_KINDS)
    # every kind training can report is exercised, except io_error (see test_transient_errors_outliving_retries)
    # and unexpected_error (see test_unexpected_errors_are_the_samples_problem)
    assert set(PROBLEM_KINDS) - {case.kind for case in CASES} == {"io_error", "too_small", "unexpected_error"}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case_under_error_policy(case, media, register, tokenizer, vision_config):
    """``error`` stops at once with ``file:index: reason``; the neighbours are untouched."""
    annotation = write_case(case, media)
    name = register(f"catalog_{case.name}", annotation, media)
    if case.load_error is not None:
        with pytest.raises(ValueError) as info:
            make_dataset(tokenizer, vision_config, name, "error")
        assert str(info.value) == case.load_error.format(A=annotation)
        return
    dataset = make_dataset(tokenizer, vision_config, name, "error")
    with pytest.raises(BadSampleError) as info:
        dataset[1]
    assert_reason(case, media, annotation, str(info.value))
    assert info.value.kind == case.kind and info.value.index == 1 and info.value.path == str(annotation)
    assert answer_of(tokenizer, dataset[0]) == ANSWER.format(k=0)
    assert answer_of(tokenizer, dataset[2]) == ANSWER.format(k=2)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case_under_skip_policy(case, media, register, tokenizer, vision_config, caplog):
    """``skip`` returns the Problem (never another sample), logs it once, and the collator drops and lists it."""
    annotation = write_case(case, media)
    name = register(f"catalog_{case.name}", annotation, media)
    dataset = make_dataset(tokenizer, vision_config, name, "skip")
    with caplog.at_level(logging.DEBUG, logger="qwenvl.data.data_qwen"):
        items = [dataset[0], dataset[1], dataset[2], dataset[1]]
    problem = items[1]
    assert isinstance(problem, Problem), f"{case.name}: got {type(problem).__name__} instead of a Problem"
    assert items[3] == problem
    assert (problem.dataset, problem.annotation_path, problem.index, problem.kind) == (name, str(annotation), 1,
                                                                                        case.kind)
    assert_reason(case, media, annotation, problem.message)
    logged = [r.getMessage() for r in caplog.records if problem.message in r.getMessage()]
    assert logged == [f"skipping bad sample ({case.kind}): {problem.message}"], "logged once per process"

    assert [answer_of(tokenizer, items[i]) for i in (0, 2)] == [ANSWER.format(k=0), ANSWER.format(k=2)]
    for collator in (DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
                     FlattenedDataCollatorForSupervisedDataset(tokenizer.pad_token_id)):
        batch = collator(items[:3])
        assert batch.pop(BAD_SAMPLES_KEY) == [problem]
        clean = collator([items[0], items[2]])
        assert batch.keys() == clean.keys()
        assert all(torch.equal(batch[key], clean[key]) for key in clean)

    # the validation layer (tools/check_image.py) finds the same problem
    validator = SampleValidator(vision_config, tokenizer=tokenizer, model_max_length=MODEL_MAX_LENGTH, io_backoff=0)
    assert validator.validate(dataset.records[1], dataset.refs[1]) == problem
    assert validator.validate(dataset.records[0], dataset.refs[0]) is None


def test_validator_without_tokenizer_skips_only_the_token_checks(media, register, tokenizer, vision_config):
    validator = SampleValidator(vision_config, io_backoff=0)
    for case in CASES:
        annotation = write_case(case, media)
        records = load_annotations(str(annotation), bad_lines="keep")
        problem = validator.validate(records[1], data_qwen.SampleRef("x", str(annotation), str(media), 1))
        if case.kind in ("over_length", "no_labels"):
            assert problem is None, case.name
        else:
            assert problem is not None and problem.kind == case.kind, case.name
            assert_reason(case, media, annotation, problem.message)


# ------------------------------------------------------------ annotation files
@pytest.mark.parametrize("content, message", [
    (b"", "{A}: the annotation file is empty"),
    (b"  \n\n ", "{A}: the annotation file is empty"),
    (b"[]", "{A}: the annotation file holds no samples"),
    (b"42", "{A}: expected a list of samples, got int"),
    (b'[\n  {"conversations": []},\n  {"conversations": [}\n]',
     "{A}:3: invalid JSON: Expecting value (column 22)"),
    (b'{"conversations": []}\n{"conversations": []}\n',
     "{A}:2: invalid JSON: Extra data (column 1); one JSON object per line? name the file .jsonl"),
    (b'[\n{"conversations": "caf\xe9"}]', "{A}:2: not valid UTF-8 (column 23)"),
], ids=["empty", "whitespace", "empty_list", "number", "broken_json", "jsonl_named_json", "latin1"])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unreadable_annotation_file_stops_under_both_policies(content, message, policy, tmp_path, register,
                                                              tokenizer, vision_config):
    """A file that cannot be read as samples is a configuration error: both policies stop, naming file and line."""
    annotation = tmp_path / "broken.json"
    annotation.write_bytes(content)
    name = register("broken_file", annotation, tmp_path)
    with pytest.raises(ValueError) as info:
        make_dataset(tokenizer, vision_config, name, policy)
    assert str(info.value) == message.format(A=annotation)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"annotation file not found: {tmp_path}/nope.jsonl")):
        load_annotations(str(tmp_path / "nope.jsonl"))


def test_bom_blank_lines_and_line_separators_are_fine(tmp_path):
    """A UTF-8 BOM is accepted; blank JSONL lines are skipped; U+2028 inside a string does not split a line."""
    sample = {"conversations": [{"from": "human", "value": "a\u2028b\u0085c"}, {"from": "gpt", "value": "d"}]}
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(sample, ensure_ascii=False).encode() + b"\n\n \n"
                      + json.dumps(text := {"x": 1}).encode() + b"\n")
    assert load_annotations(str(jsonl)) == [sample, text]
    listing = tmp_path / "bom.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps([sample]).encode())
    assert load_annotations(str(listing)) == [sample]


def test_bad_jsonl_line_keeps_later_indices(tmp_path):
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b'{"a": 0}\n\n{"a": \n{"a": 2}\n')
    assert load_annotations(str(jsonl), bad_lines="keep") == [
        {"a": 0}, BadRecord("line 3: invalid JSON line: Expecting value (column 7)"), {"a": 2}]
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}:3: invalid JSON line: Expecting value (column 7)")):
        load_annotations(str(jsonl))


def test_lengths_survive_malformed_records(media, register, tokenizer, vision_config):
    """``--group_by_length`` reads every record up front: malformed ones must not crash it."""
    annotation = media / "lengths.json"
    annotation.write_text(json.dumps([good_record(0), None, {"conversations": "x"}, {"conversations": [1, 2]}]))
    dataset = make_dataset(tokenizer, vision_config, register("lengths", annotation, media), "skip")
    assert dataset.lengths == [len(dataset[0]["input_ids"]), 1, 1, 1]  # exact; a rejected record weighs 1


# ------------------------------------------------------------------ images
def test_exif_orientation_is_applied(tmp_path):
    array = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "rot.png", exif=exif.tobytes())
    image = open_image("rot.png", str(tmp_path))
    assert image.size == (40, 60)
    np.testing.assert_array_equal(np.asarray(image), np.rot90(array, k=-1))
    assert image_size("rot.png", str(tmp_path)) == (60, 40)


def test_every_mode_becomes_rgb(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 255, 0, 128]]], dtype=np.uint8)
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    white_composite = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")), dtype=int), white_composite, atol=1)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 1  # palette entry 1 is transparent -> white
    palette.save(tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(np.asarray(open_image("p.png", str(tmp_path))), [[[10, 20, 30], [255, 255, 255]]])

    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(la)), [[[100] * 3, [255] * 3]])

    grey = np.array([[0, 77, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(grey, "L"))), np.repeat(grey[..., None], 3, -1))

    deep = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit PNG opens as I;16 or I
    expected = np.rint(deep / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(open_image("deep.png", str(tmp_path)))[..., 0], expected)

    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [51, 102, 153, 51]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    reference = (255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:4].astype(float)) / 255  # naive CMYK -> RGB
    got = np.asarray(open_image("cmyk.jpg", str(tmp_path)), dtype=float)
    assert got.shape == (1, 4, 3)
    np.testing.assert_allclose(got, reference, atol=6)  # JPEG rounding


def test_decompression_bomb_is_refused_from_the_header(media):
    """Both the decoder and the header reader (used by tools/pack_data.py) refuse it before decoding."""
    for name in ("bomb.png", "big_header.png"):
        with pytest.raises(ImageError) as info:
            image_size(name, str(media))
        assert info.value.kind == "decompression_bomb"
        assert str(media / name) in str(info.value)


# ------------------------------------------------------------ transient I/O
@pytest.fixture
def flaky_open(monkeypatch):
    """open_image that raises EIO for flaky.png the first ``failures`` times (a network file system hiccup)."""
    calls = {"flaky.png": 0}
    real = data_qwen.open_image

    def install(failures: int, error_number: int = errno.EIO):
        def fake(source, data_path=""):
            if source == "flaky.png":
                calls["flaky.png"] += 1
                if calls["flaky.png"] <= failures:
                    raise OSError(error_number, "Input/output error" if error_number == errno.EIO else "x",
                                  f"{data_path}/{source}")
            return real(source, data_path)

        monkeypatch.setattr(data_qwen, "open_image", fake)
        return calls

    return install


def test_transient_errors_are_retried_and_return_the_same_sample(flaky_open, media, register, tokenizer,
                                                                 vision_config):
    annotation = media / "flaky.json"
    annotation.write_text(json.dumps([good_record(5, image="flaky.png")]))
    name = register("flaky", annotation, media)
    reference = make_dataset(tokenizer, vision_config, name, "error")[0]
    calls = flaky_open(failures=2)
    calls["flaky.png"] = 0
    item = make_dataset(tokenizer, vision_config, name, "error")[0]
    assert calls["flaky.png"] == 3
    assert item.keys() == reference.keys() and all(torch.equal(item[k], reference[k]) for k in reference)


def test_transient_errors_outliving_retries(flaky_open, media, register, tokenizer, vision_config):
    annotation = media / "flaky.json"
    annotation.write_text(json.dumps([good_record(5, image="flaky.png")]))
    name = register("flaky", annotation, media)
    calls = flaky_open(failures=100)
    message = f"{annotation}:0: I/O error after 4 attempts: [Errno 5] Input/output error: '{media}/flaky.png'"
    problem = make_dataset(tokenizer, vision_config, name, "skip")[0]
    assert calls["flaky.png"] == 4
    assert (problem.kind, problem.message) == ("io_error", message)
    with pytest.raises(BadSampleError) as info:
        make_dataset(tokenizer, vision_config, name, "error")[0]
    assert (info.value.kind, str(info.value)) == ("io_error", message)


def test_only_transient_errors_are_retried():
    attempts = []

    def load(error):
        attempts.append(error)
        raise error

    with pytest.raises(FileNotFoundError):
        with_io_retries(lambda: load(FileNotFoundError(errno.ENOENT, "gone")), retries=3, backoff=0)
    assert len(attempts) == 1
    for number in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT):
        attempts.clear()
        with pytest.raises(OSError):
            with_io_retries(lambda: load(OSError(number, "flaky")), retries=2, backoff=0)
        assert len(attempts) == 3
    attempts.clear()
    with pytest.raises(TimeoutError):
        with_io_retries(lambda: load(TimeoutError("read timed out")), retries=1, backoff=0)
    assert len(attempts) == 2


# ------------------------------------------------------- truncation, collators
def test_text_overflow_is_cut_at_the_end_and_vision_never(media, register, tokenizer, vision_config):
    long_answer = " ".join(f"w{i}" for i in range(300))
    annotation = media / "long.json"
    annotation.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Count."}, {"from": "gpt", "value": long_answer}]},
        {"image": "good.png", "conversations": [{"from": "human", "value": "<image>\nCount."},
                                                {"from": "gpt", "value": long_answer}]},
    ]))
    name = register("long", annotation, media)
    full = make_dataset(tokenizer, vision_config, name, "error", model_max_length=100_000)
    cut = make_dataset(tokenizer, vision_config, name, "error", model_max_length=MODEL_MAX_LENGTH)
    for index in (0, 1):
        whole, item = full[index], cut[index]
        assert len(whole["input_ids"]) > MODEL_MAX_LENGTH and len(item["input_ids"]) == MODEL_MAX_LENGTH
        assert torch.equal(item["input_ids"], whole["input_ids"][:MODEL_MAX_LENGTH])
        assert torch.equal(item["labels"], whole["labels"][:MODEL_MAX_LENGTH])
        assert torch.equal(item["position_ids"], whole["position_ids"][:, :MODEL_MAX_LENGTH])
    assert torch.equal(cut[1]["pixel_values"], full[1]["pixel_values"])  # the image block is whole


def test_padded_collator_never_slices(tokenizer, vision_config, media, register):
    annotation = media / "long.json"
    annotation.write_text(json.dumps([good_record(0), {"conversations": [
        {"from": "human", "value": "Count."}, {"from": "gpt", "value": " ".join(map(str, range(400)))}]}]))
    dataset = make_dataset(tokenizer, vision_config, register("long", annotation, media), "error",
                           model_max_length=100_000)
    items = [dataset[0], dataset[1]]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    assert batch["input_ids"].shape[1] == len(items[1]["input_ids"]) > 512  # the old blind slice would cut at 512
    assert torch.equal(batch["labels"][1], items[1]["labels"])


def test_all_bad_micro_batch_becomes_a_placeholder(tokenizer):
    problems = [Problem("d", "d.json", 3, "missing_media", "image 0: gone"),
                Problem("d", "d.json", 4, "bad_image", "image 0: broken")]
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(problems + [None])
    assert padded.pop(BAD_SAMPLES_KEY) == problems
    expected = placeholder_batch(tokenizer.pad_token_id, flattened=False)
    assert padded.keys() == expected.keys() == {"input_ids", "labels", "position_ids", "attention_mask",
                                                "num_items_in_batch"}
    assert padded["input_ids"].tolist() == [[tokenizer.pad_token_id]] and padded["labels"].tolist() == [[-100]]
    assert padded["position_ids"].shape == (3, 1, 1) and padded["num_items_in_batch"] == 1
    flat = FlattenedDataCollatorForSupervisedDataset(tokenizer.pad_token_id)(problems)
    assert flat.pop(BAD_SAMPLES_KEY) == problems
    assert "attention_mask" not in flat and flat["position_ids"].shape == (4, 1, 1)
    assert flat["labels"].tolist() == [[-100]]


# ------------------------------------------------------------------ flags
def test_policy_flags():
    args = DataArguments()
    assert (args.bad_sample_policy, args.bad_sample_threshold) == ("skip", 0.01)
    with pytest.raises(ValueError, match="bad_sample_policy should be one of 'error' or 'skip' but found 'ignore'"):
        DataArguments(bad_sample_policy="ignore")
    with pytest.raises(ValueError, match=re.escape("bad_sample_threshold must be a fraction in [0, 1], got 1.5")):
        DataArguments(bad_sample_threshold=1.5)


# ------------------------------------------------------------------ issue 9
@pytest.mark.parametrize("fps, found", [(0.0, "0.0"), (-12.0, "-12.0"), (float("nan"), "nan"), (float("inf"), "inf"),
                                        (float("-inf"), "-inf")])
def test_non_positive_or_non_finite_fps_is_refused(fps, found):
    with pytest.raises(VideoError) as info:
        check_video_meta("clip.mp4", VideoMeta(24, fps, 48, 64))
    assert str(info.value) == ("broken video metadata in clip.mp4: expected frames >= 1, fps > 0 and a non-empty "
                               f"frame size but found 24 frames at {found} fps, 64x48")


@pytest.mark.parametrize("fps, shown", [(90000.0, "90000"), (1e6, "1e+06"), (0.001, "0.001")])
def test_unbelievable_fps_is_refused(fps, shown):
    with pytest.raises(VideoError) as info:
        check_video_meta("clip.mp4", VideoMeta(24, fps, 48, 64))
    assert str(info.value) == (f"broken video metadata in clip.mp4: {shown} fps is outside [0.01, 1000] (a broken "
                               "header: the frame rate is not believable); re-encode the video with its real frame rate")


def test_duration_must_agree_with_frames_and_fps():
    meta = VideoMeta(24, 12.0, 48, 64)  # 2 s
    for span in (2.0, 2.9, 1.1, 3.0):  # within 1 s: variable frame rates and rounding are normal
        assert check_video_meta("clip.mp4", meta, span) == meta
    assert check_video_meta("long.mp4", VideoMeta(600, 12.0, 48, 64), 90.0) == VideoMeta(600, 12.0, 48, 64)
    for span, shown in ((600.083, "600.083"), (0.4, "0.400"), (float("nan"), "nan"), (float("inf"), "inf")):
        with pytest.raises(VideoError) as info:
            check_video_meta("clip.mp4", meta, span)
        assert str(info.value) == ("inconsistent video metadata in clip.mp4: 24 frames at 12 fps last 2.000 s but the "
                                   f"frames' timestamps span {shown} s; re-encode the video at a constant frame rate")
    with pytest.raises(VideoError, match=re.escape("120.000 s but the frames' timestamps span 20.000 s")):
        check_video_meta("long.mp4", VideoMeta(1440, 12.0, 48, 64), 20.0)


@pytest.mark.parametrize("dataset_use, first, second", [
    ("dup_a,dup_a", "dup_a", "dup_a"),
    ("dup_a%50,dup_a%50", "dup_a%50", "dup_a%50"),
    ("dup_b,dup_a%50, dup_a", "dup_a%50", "dup_a"),
])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_dataset_named_twice_is_an_error(dataset_use, first, second, policy, media, register, tokenizer,
                                         vision_config):
    """Both policies: naming a dataset twice is a configuration error, not something to skip."""
    register("dup_a", write_case(CASES[0], media), media)
    register("dup_b", write_case(CASES[1], media), media)  # another file (one file under two names: also an error)
    with pytest.raises(ValueError) as info:
        make_dataset(tokenizer, vision_config, dataset_use, policy)
    assert str(info.value) == (f"dataset 'dup_a' is named twice in --dataset_use ({first!r} and {second!r}): each of "
                               "its samples would be trained twice; name it once (use dup_a%N to keep N percent)")


class FailsUnexpectedly(LazySupervisedDataset):
    """Stands in for a failure no check foresees (the tokenizer's TypeError on a surrogate, before issue 9):
    sample 1 raises inside ``get_item``, where the real tokenizer call is."""

    def get_item(self, i):
        if i == 1:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return super().get_item(i)


def test_unexpected_errors_are_the_samples_problem(media, register, tokenizer, vision_config):
    annotation = write_case(CASES[0], media)
    name = register("unexpected", annotation, media)
    reason = ("unexpected error: TypeError: TextEncodeInput must be Union[TextInputSequence, "
              "Tuple[InputSequence, InputSequence]]")
    skipping = FailsUnexpectedly(tokenizer, DataArguments(dataset_use=name), vision_config,
                                   model_max_length=MODEL_MAX_LENGTH, bad_sample_policy="skip", io_backoff=0.0)
    assert skipping[1] == Problem(name, str(annotation), 1, "unexpected_error", reason)
    assert answer_of(tokenizer, skipping[2]) == ANSWER.format(k=2)
    stopping = FailsUnexpectedly(tokenizer, DataArguments(dataset_use=name), vision_config,
                                   model_max_length=MODEL_MAX_LENGTH, bad_sample_policy="error", io_backoff=0.0)
    with pytest.raises(TypeError) as info:
        stopping[1]
    assert info.value.__notes__ == [f"while loading sample {annotation}:1"]

    class BrokenValidator(SampleValidator):
        def check(self, record, ref):
            if ref.index == 1:
                raise KeyError("boom")
            super().check(record, ref)

    validator = BrokenValidator(vision_config, io_backoff=0)
    assert validator.validate(skipping.records[1], skipping.refs[1]) == Problem(
        name, str(annotation), 1, "unexpected_error", "unexpected error: KeyError: 'boom'")
    assert validator.validate(skipping.records[0], skipping.refs[0]) is None


def test_surrogate_reaches_neither_the_tokenizer_nor_a_writer(media, register, tokenizer, vision_config):
    """The issue-9 crash: json.loads gives a lone surrogate that the tokenizer rejects with a TypeError."""
    record = {"conversations": [{"from": "human", "value": "Why \ud800?"}, {"from": "gpt", "value": "A square."}]}
    with pytest.raises(TypeError):  # what training used to hit at step 0
        tokenizer(["Why \ud800?"], add_special_tokens=False)
    annotation = media / "surrogate.json"
    annotation.write_text(json.dumps([good_record(0), record]))
    assert '"Why \\ud800?"' in annotation.read_text()  # the escape as a JSON file holds it
    dataset = make_dataset(tokenizer, vision_config, register("surrogate", annotation, media), "skip")
    problem = dataset[1]
    assert problem.kind == "invalid_unicode"
    assert problem.reason == ("conversations[0].value holds an unpaired surrogate \\ud800 at character 4: not valid "
                              "Unicode (a broken \\u escape in the JSON); fix the text")
    problem.message.encode("utf-8")  # printable and writable as it is
