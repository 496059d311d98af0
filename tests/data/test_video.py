"""qwenvl/data/video.py: frame sampling (SPEC 7), decoding backends, the patchifier, and video samples end to end.

References are written independently of the code: the SPEC 7 sampling rule and
the SPEC 8 position rule are spelled out here, the patchifier is checked
against transformers' image processor, and decoded frames against the frame
numbers painted into a generated clip.
"""

from __future__ import annotations

import json
import logging
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import qwenvl.data as registry
import qwenvl.data.video as video
from qwenvl.data.data_qwen import (
    BadSampleError,
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
    LazySupervisedDataset,
)
from qwenvl.data.video import (
    VideoError,
    VideoMeta,
    load_video,
    probe_video,
    read_frames,
    sample_frame_indices,
    video_backend,
    video_grid_from_meta,
)
from qwenvl.data.vision import VisionConfig, patchify, resize_frames, smart_resize
from qwenvl.train.argument import DataArguments
from tests.conftest import REPO_ROOT
from tools.make_demo_videos import DEMO_CLIPS, write_video

DEMO = REPO_ROOT / "demo"
CFG = VisionConfig()
HAS_DECORD = "decord" in video.available_backends()
BACKENDS = [b for b in ("decord", "pyav") if b in video.available_backends()]


# ------------------------------------------------------------ references
def spec7_indices(total_frames, fps, base_interval, min_frames, max_frames):
    """SPEC 7, spelled out: n from the duration, clamped; linspace(0, frames - 1, n) truncated, de-duplicated."""
    duration = total_frames / fps
    n = round(duration / base_interval)  # Python rounds halves to even, like the original
    n = max(min_frames, min(max_frames, n))
    if n == 1:
        points = [0.0]
    else:
        step = (total_frames - 1) / (n - 1)
        points = [k * step for k in range(n - 1)] + [float(total_frames - 1)]
    return sorted({int(p) for p in points})


def spec8_positions(input_ids, video_pad_id, image_pad_id, image_grids, video_grids, seconds, tokens_per_second=2):
    """SPEC 8 for one sample, token by token: (3, L) position ids."""
    rows, next_pos, i = [[], [], []], 0, 0
    images, videos, secs = iter(image_grids), iter(video_grids), iter(seconds)
    ids = list(input_ids)
    while i < len(ids):
        if ids[i] not in (video_pad_id, image_pad_id):
            for r in rows:
                r.append(next_pos)
            next_pos, i = next_pos + 1, i + 1
            continue
        is_video = ids[i] == video_pad_id
        t, h, w = next(videos) if is_video else next(images)
        second = next(secs) if is_video else 0.0
        start, largest = next_pos, next_pos
        for ti in range(t):
            t_index = math.floor(ti * second * tokens_per_second) if is_video else 0
            for hi in range(h // 2):
                for wi in range(w // 2):
                    assert ids[i] == (video_pad_id if is_video else image_pad_id)
                    position = (start + t_index, start + hi, start + wi)
                    for r, p in zip(rows, position):
                        r.append(p)
                    largest = max(largest, *position)
                    i += 1
        next_pos = largest + 1
    return torch.tensor(rows)


# ------------------------------------------------------------ fixtures
def painted_frames(num_frames, height=48, width=64):
    """Frame i is flat grey 4 * i (frame numbers survive H.264 to within a few levels)."""
    return np.stack([np.full((height, width, 3), 4 * i, dtype=np.uint8) for i in range(num_frames)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Generated clips: name -> (path, frames, fps)."""
    folder = tmp_path_factory.mktemp("clips")
    specs = {
        "gop7.mp4": (60, 20, 7),  # 3 s, a keyframe every 7 frames: decoding has to seek
        "three_frames.mp4": (3, 6, None),  # 0.5 s: 4 wanted, 3 exist; 2 / (3 / 0.5) = 1/3 s per grid step
        "ntsc.mp4": (45, Fraction(30000, 1001), None),  # 29.97 fps
        "no_count.mkv": (20, 10, None),  # Matroska has no frame count in its header
    }
    out = {}
    for name, (frames, fps, gop) in specs.items():
        path = write_video(folder / name, painted_frames(frames), fps, keyframe_interval=gop)
        out[name] = (str(path), frames, fps)
    return out


@pytest.fixture(scope="module")
def reference_processor():
    return Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=32 * 28 * 28)


def make_dataset(tokenizer, dataset_use, **data_kwargs):
    args = DataArguments(dataset_use=dataset_use, **data_kwargs)
    vision = VisionConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    return LazySupervisedDataset(tokenizer, args, vision, model_max_length=8192)


# ------------------------------------------------------------ sampling
@pytest.mark.parametrize("total_frames,fps", [
    (12, 12), (24, 8), (33, 6), (3, 6), (1, 30), (150, 30), (210, 30), (270, 30), (330, 30), (600, 30),
    (901, 29.97), (7, 2.5), (125, 25),
])
@pytest.mark.parametrize("base_interval,min_frames,max_frames", [(2, 4, 8), (0.5, 2, 16), (1, 8, 8), (3, 1, 5)])
def test_frame_indices_follow_spec7(total_frames, fps, base_interval, min_frames, max_frames):
    indices = sample_frame_indices(total_frames, fps, base_interval, min_frames, max_frames)
    assert indices.dtype == np.int64
    assert indices.tolist() == spec7_indices(total_frames, fps, base_interval, min_frames, max_frames)


def test_round_halves_to_even_like_the_original():
    # 9 s / 2 = 4.5 -> 4; 11 s / 2 = 5.5 -> 6 (Python round); 5 s / 2 = 2.5 -> 2 -> clamped to 4
    assert len(sample_frame_indices(270, 30, 2, 1, 8)) == 4
    assert len(sample_frame_indices(330, 30, 2, 1, 8)) == 6
    assert len(sample_frame_indices(150, 30, 2, 4, 8)) == 4


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        sample_frame_indices(10, 10, 2, 8, 4)
    with pytest.raises(ValueError, match="fps > 0"):
        sample_frame_indices(10, 0, 2, 4, 8)


@pytest.mark.parametrize("num_frames,fps,base_interval,min_frames,max_frames", [
    (12, 12.0, 2, 4, 8), (12, 12.0, 2, 8, 8), (3, 6.0, 2, 4, 8), (45, 30000 / 1001, 2, 4, 8), (600, 30.0, 2, 4, 8),
    (600, 30.0, 2, 5, 5), (7, 2.5, 1, 1, 8),
])
def test_grid_and_seconds_per_grid_step_from_metadata(num_frames, fps, base_interval, min_frames, max_frames):
    args = DataArguments(base_interval=base_interval, video_min_frames=min_frames, video_max_frames=max_frames)
    (t, h, w), seconds = video_grid_from_meta(num_frames, fps, 84, 112, args, CFG)
    sampled = len(spec7_indices(num_frames, fps, base_interval, min_frames, max_frames))
    assert t == math.ceil(sampled / 2)
    assert (h, w) == (6, 8)
    assert type(seconds) is float
    # temporal_patch_size / sampled fps, with the sampled fps = frames actually decoded / duration
    assert seconds == pytest.approx(2 / (sampled / (num_frames / fps)), rel=1e-12)


def test_fractional_seconds_are_kept():
    args = DataArguments()
    assert video_grid_from_meta(12, 12.0, 84, 112, args, CFG)[1] == 0.5
    assert video_grid_from_meta(12, 12.0, 84, 112, DataArguments(video_min_frames=8), CFG)[1] == 0.25
    assert video_grid_from_meta(3, 6.0, 84, 112, args, CFG)[1] == pytest.approx(1 / 3)


def test_frame_size_follows_video_pixel_limits():
    args = DataArguments(video_min_frame_pixels=4 * 28 * 28, video_max_frame_pixels=32 * 28 * 28)
    for height, width in [(168, 224), (120, 160), (1080, 1920), (20, 30), (84, 112)]:
        (_, h, w), _ = video_grid_from_meta(30, 10.0, height, width, args, CFG)
        expected = smart_resize(height, width, 28, 4 * 28 * 28, 32 * 28 * 28)
        assert (h * 14, w * 14) == expected
        assert 4 * 28 * 28 <= h * w * 14 * 14 <= 32 * 28 * 28


# ------------------------------------------------------------ patchifier
@pytest.mark.parametrize("size", [(112, 84), (160, 120), (224, 168), (50, 30)])
def test_two_identical_frames_equal_the_image_processor(reference_processor, size):
    width, height = size
    frame = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = reference_processor(images=[Image.fromarray(frame)], return_tensors="np")
    h, w = smart_resize(height, width, 28, 4 * 28 * 28, 32 * 28 * 28)
    pixel_values, grid = patchify(resize_frames(np.stack([frame, frame]), h, w), CFG)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 8])
def test_patchify_shapes_for_odd_and_even_frame_counts(num_frames):
    frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 56, 84, 3), dtype=np.uint8)
    pixel_values, grid = patchify(frames, CFG)
    t = math.ceil(num_frames / 2)
    assert grid == (t, 4, 6)
    assert pixel_values.shape == (t * 4 * 6, 1176)
    if num_frames % 2:  # the last frame is repeated to fill the temporal patch
        padded, _ = patchify(np.concatenate([frames, frames[-1:]]), CFG)
        np.testing.assert_array_equal(pixel_values, padded)


# ------------------------------------------------------------ decoding
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoded_frames_are_the_sampled_ones(clips, backend):
    path, total, _ = clips["gop7.mp4"]
    for indices in ([0, 1, 2], [59, 0, 30, 30, 7, 8, 13, 14], list(range(0, 60, 9))):
        frames = read_frames(path, indices, backend)
        expected = [4 * i for i in indices]
        assert np.abs(frames.reshape(len(indices), -1).mean(axis=1) - expected).max() < 2
    # past the end: an error, never the last frame again (issue 9: frames were silently repeated)
    with pytest.raises(VideoError, match=re.escape(f"{path}: frame 70 was planned but only 60 frames decode")):
        read_frames(path, [5, 70], backend)


@pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
def test_decord_and_pyav_give_the_same_frames(clips):
    paths = [str(DEMO / "videos" / clip.name) for clip in DEMO_CLIPS] + [c[0] for c in clips.values()]
    for path in paths:
        total = probe_video(path).num_frames
        rng = np.random.default_rng(total)
        for indices in (np.arange(total), np.sort(rng.choice(total, min(total, 5), replace=False))[::-1]):
            np.testing.assert_array_equal(read_frames(path, indices, "decord"), read_frames(path, indices, "pyav"))


@pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
def test_probe_agrees_with_decords_own_numbers(clips):
    import decord

    paths = [str(DEMO / "videos" / clip.name) for clip in DEMO_CLIPS] + [c[0] for c in clips.values()]
    for path in paths:
        reader = decord.VideoReader(path)
        height, width = reader[0].shape[:2]
        assert probe_video(path) == VideoMeta(len(reader), reader.get_avg_fps(), height, width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_grid_equals_probe_grid(clips, backend):
    args = DataArguments(video_min_frame_pixels=4 * 28 * 28, video_max_frame_pixels=32 * 28 * 28)
    sources = [(f"videos/{clip.name}", str(DEMO)) for clip in DEMO_CLIPS] + [(c[0], "") for c in clips.values()]
    for source, data_path in sources:
        for sampling in ({}, {"video_min_frames": 5, "video_max_frames": 5}, {"base_interval": 0.25}):
            args_i = DataArguments(**{**vars(args), **sampling})
            pixel_values, grid, seconds = load_video(source, data_path, args_i, CFG, backend=backend)
            meta = probe_video(source, data_path)
            assert (grid, seconds) == video_grid_from_meta(*meta, args_i, CFG)
            assert pixel_values.shape == (grid[0] * grid[1] * grid[2], 1176) and pixel_values.dtype == np.float32
            assert type(seconds) is float and all(type(x) is int for x in grid)


class _Counted:
    """Calls the real function and counts the calls (how often a decoder opens a file)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def _all_clips(clips):
    return [(f"videos/{clip.name}", str(DEMO)) for clip in DEMO_CLIPS] + [(c[0], "") for c in clips.values()]


def test_pyav_opens_each_video_once_and_gives_what_decord_gives(clips, monkeypatch):
    """Review finding: the probe demuxed every packet, then the reader opened and demuxed the file again.

    With PyAV decoding, the probe's packet list is the reader's index: one ``av.open`` per video.
    The pixels, grid and seconds equal those of the two-pass path and of decord.
    """
    import av

    args = DataArguments(video_min_frame_pixels=4 * 28 * 28, video_max_frame_pixels=32 * 28 * 28)
    for source, data_path in _all_clips(clips):
        counted = _Counted(av.open)
        monkeypatch.setattr(av, "open", counted)
        pixel_values, plan = video.load_video_plan(source, data_path, args, CFG, backend="pyav")
        monkeypatch.undo()
        assert counted.calls == 1, source
        # the two passes the training path used to make, spelled out
        meta = probe_video(source, data_path)
        two_pass = video.plan_video(meta, args, CFG)
        frames = read_frames(video.resolve_path(source, data_path), two_pass.indices, "pyav")
        expected, grid = patchify(resize_frames(frames, two_pass.height, two_pass.width), CFG)
        np.testing.assert_array_equal(pixel_values, expected)
        assert (plan.grid_thw, plan.second_per_grid_t) == (grid, two_pass.second_per_grid_t)
        assert plan.indices.tolist() == two_pass.indices.tolist()
        if HAS_DECORD:
            decord_values, decord_plan = video.load_video_plan(source, data_path, args, CFG, backend="decord")
            np.testing.assert_array_equal(pixel_values, decord_values)
            assert decord_plan.grid_thw == plan.grid_thw


@pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
def test_decord_path_probes_with_pyav_then_opens_with_decord(monkeypatch):
    """decord cannot take the probe's packet list: the file is opened once by each (see the module docstring)."""
    import av
    import decord

    monkeypatch.delenv(video.BACKEND_ENV, raising=False)
    opened, readers = _Counted(av.open), _Counted(decord.VideoReader)
    monkeypatch.setattr(av, "open", opened)
    monkeypatch.setattr(decord, "VideoReader", readers)
    video.load_video_plan(f"videos/{DEMO_CLIPS[0].name}", str(DEMO), DataArguments(), CFG)
    assert (video.video_backend(), opened.calls, readers.calls) == ("decord", 1, 1)


def test_one_pass_reports_unreadable_files_as_the_probe_does(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError) as probed:
        probe_video("noise.mp4", str(tmp_path))
    assert str(probed.value).startswith(f"cannot read video {tmp_path / 'noise.mp4'} (pyav: ")
    with pytest.raises(VideoError) as loaded:
        load_video("noise.mp4", str(tmp_path), DataArguments(), CFG, backend="pyav")
    assert str(loaded.value) == str(probed.value)


def test_generated_clips_metadata(clips):
    for name, (path, frames, fps) in clips.items():
        meta = probe_video(path)
        assert meta.num_frames == frames, name
        assert meta.fps == pytest.approx(float(fps)), name
        assert (meta.height, meta.width) == (48, 64)
    _, grid, seconds = load_video(clips["three_frames.mp4"][0], "", DataArguments(), CFG)
    assert grid[0] == 2 and seconds == pytest.approx(1 / 3)  # 3 frames: the last one repeated


def test_docstring_examples(monkeypatch):
    import doctest

    monkeypatch.chdir(REPO_ROOT)
    globs = {"DataArguments": DataArguments, "VisionConfig": VisionConfig, "np": np}
    results = doctest.testmod(video, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 8 and results.failed == 0


# ------------------------------------------------------------ backend choice
def test_backend_override_by_argument_and_environment(monkeypatch, caplog):
    monkeypatch.delenv(video.BACKEND_ENV, raising=False)
    assert video_backend() == video.available_backends()[0]
    assert video_backend("av") == "pyav"
    monkeypatch.setenv(video.BACKEND_ENV, "pyav")
    assert video_backend() == "pyav"
    assert video_backend(BACKENDS[0]) == BACKENDS[0]  # the argument wins over the environment
    with pytest.raises(ValueError, match="video backend should be one of decord, pyav, torchcodec but found 'opencv'"):
        video_backend("opencv")


def test_default_backend_is_reported_once(monkeypatch, caplog):
    monkeypatch.delenv(video.BACKEND_ENV, raising=False)
    monkeypatch.setattr(video, "_default_backend", None)
    monkeypatch.setattr(video, "_reported", set())
    with caplog.at_level(logging.INFO, logger="qwenvl.data.video"):
        for _ in range(3):
            video_backend()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"video backend: {BACKENDS[0]}"]


# ------------------------------------------------------------ errors
def test_missing_and_corrupt_videos_name_the_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match=re.escape(f"video file not found: {missing}")):
        load_video("nope.mp4", str(tmp_path), DataArguments(), CFG)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes((DEMO / "videos" / DEMO_CLIPS[0].name).read_bytes()[:400])
    # Header first (faststart), frames cut: the probe sees the header promise 12 frames and finds fewer.
    import av

    with av.open(str(tmp_path / "faststart.mp4"), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=6, options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in np.random.default_rng(1).integers(0, 256, (12, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = (tmp_path / "faststart.mp4").read_bytes()
    (tmp_path / "cut_frames.mp4").write_bytes(data[:len(data) // 2])
    with pytest.raises(VideoError, match=re.escape(
            f"broken video {tmp_path / 'cut_frames.mp4'}: the header promises 12 frames but the file holds only ")):
        probe_video(str(tmp_path / "cut_frames.mp4"))
    for name in ("noise.mp4", "empty.mp4", "cut.mp4", "cut_frames.mp4"):
        for backend in BACKENDS:
            with pytest.raises(VideoError, match=re.escape(str(tmp_path / name))):
                load_video(name, str(tmp_path), DataArguments(), CFG, backend=backend)


def test_dataset_error_names_annotation_file_and_sample(tokenizer, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    good = str(DEMO / "videos" / DEMO_CLIPS[0].name)
    conversations = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]
    annotation = tmp_path / "videos.json"
    annotation.write_text(json.dumps([{"video": good, "conversations": conversations},
                                      {"video": "missing.mp4", "conversations": conversations},
                                      {"video": [good, "broken.mp4"], "conversations": [
                                          {"from": "human", "value": "<video><video>"}, conversations[1]]}]))
    registry.data_dict["tmp_bad_video"] = {"annotation_path": str(annotation), "data_path": str(tmp_path)}
    try:
        dataset = make_dataset(tokenizer, "tmp_bad_video")
        assert "pixel_values_videos" in dataset[0]
        with pytest.raises(BadSampleError, match=re.escape(
                f"{annotation}:1: video 0: video file not found: {tmp_path / 'missing.mp4'}")) as info:
            dataset[1]
        assert info.value.kind == "missing_media"
        with pytest.raises(BadSampleError, match=re.escape(f"{annotation}:2: video 1: cannot read video "
                                                           f"{tmp_path / 'broken.mp4'}")) as info:
            dataset[2]
        assert info.value.kind == "bad_video"
    finally:
        del registry.data_dict["tmp_bad_video"]


# ------------------------------------------------------------ dataset
@pytest.fixture(scope="module")
def demo_items(tokenizer):
    return [make_dataset(tokenizer, "demo_video")[i] for i in range(4)]


def test_demo_video_items(tokenizer, demo_items):
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = json.loads((DEMO / "video.json").read_text())
    for sample, item in zip(samples, demo_items):
        videos = sample["video"] if isinstance(sample["video"], list) else [sample["video"]]
        grids = item["video_grid_thw"].tolist()
        assert len(grids) == len(videos)
        assert int((item["input_ids"] == video_pad).sum()) == sum(t * h * w // 4 for t, h, w in grids)
        assert item["pixel_values_videos"].shape == (sum(t * h * w for t, h, w in grids), 1176)
        seconds = item["second_per_grid_ts"]
        assert isinstance(seconds, list) and len(seconds) == len(videos) and all(type(s) is float for s in seconds)
        for source, grid, second in zip(videos, grids, seconds):
            assert (tuple(grid), second) == video_grid_from_meta(*probe_video(source, str(DEMO)), DataArguments(), CFG)
    assert [item["second_per_grid_ts"] for item in demo_items] == [[0.5], [2.75], [1.5, 2.75], [0.5]]
    # Image and video together: both kept, each block where its tag is (the video tag comes first here).
    mixed = demo_items[3]
    assert mixed["image_grid_thw"].shape == (1, 3) and mixed["pixel_values"].shape[0] == mixed["image_grid_thw"].prod()
    ids = mixed["input_ids"].tolist()
    assert ids.index(video_pad) < ids.index(image_pad)
    assert int((mixed["input_ids"] == image_pad).sum()) == int(mixed["image_grid_thw"].prod()) // 4


@pytest.mark.parametrize("min_frames,expected_seconds", [(4, 0.5), (8, 0.25)])
def test_video_position_ids_follow_spec8(tokenizer, min_frames, expected_seconds):
    dataset = make_dataset(tokenizer, "demo_video", video_min_frames=min_frames, video_max_frames=8)
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for index in range(len(dataset)):
        item = dataset[index]
        image_grids = item["image_grid_thw"].tolist() if "image_grid_thw" in item else []
        expected = spec8_positions(item["input_ids"].tolist(), video_pad, image_pad, image_grids,
                                   item["video_grid_thw"].tolist(), item["second_per_grid_ts"])
        torch.testing.assert_close(item["position_ids"], expected, rtol=0, atol=0)
        if index in (0, 3):  # red_square.mp4: 1 s
            assert item["second_per_grid_ts"] == [expected_seconds]


def test_video_position_ids_match_transformers_where_time_stays_inside_space(tiny_model_dir, tokenizer, demo_items):
    from transformers import AutoConfig, Qwen2_5_VLModel

    with torch.device("meta"):
        model = Qwen2_5_VLModel(AutoConfig.from_pretrained(tiny_model_dir))
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for item in demo_items:
        ids = item["input_ids"][None]
        token_types = (ids == image_pad).int() + 2 * (ids == video_pad).int()
        expected, _ = model.get_rope_index(ids, token_types, image_grid_thw=item.get("image_grid_thw"),
                                           video_grid_thw=item["video_grid_thw"],
                                           second_per_grid_ts=torch.tensor(item["second_per_grid_ts"]))
        torch.testing.assert_close(item["position_ids"], expected[:, 0], rtol=0, atol=0)


# ------------------------------------------------------------ training step
def test_mixed_batch_trains_alike_padded_and_flattened(tiny_model_dir, tokenizer, demo_items):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    text_only = make_dataset(tokenizer, "demo_text_only")[0]
    image_only = make_dataset(tokenizer, "demo_single_image", max_pixels=64 * 28 * 28)[0]
    items = [demo_items[3], text_only, demo_items[0], image_only]  # image+video, text, video, image
    results = []
    for collator in (DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
                     FlattenedDataCollatorForSupervisedDataset()):
        batch = collator(items)
        assert batch["second_per_grid_ts"].dtype == torch.float32
        assert batch["second_per_grid_ts"].tolist() == [0.5, 0.5]
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grad = model.model.visual.patch_embed.proj.weight.grad.clone()
        results.append((loss.item(), grad))
    (padded_loss, padded_grad), (flat_loss, flat_grad) = results
    assert math.isfinite(padded_loss)
    assert flat_loss == pytest.approx(padded_loss, abs=1e-5)
    torch.testing.assert_close(flat_grad, padded_grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ issue 9: never repeat or substitute frames
@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    from tests.data.bad_catalog import make_bad_videos

    folder = tmp_path_factory.mktemp("bad_videos")
    make_bad_videos(folder)
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["more_frames.avi", "more_frames.mp4"])
def test_header_promising_more_frames_is_refused_not_repeated(bad_videos, name, backend):
    """The header says 48 frames, 24 exist: sampling frames 0..47 used to return frame 23 again and again."""
    path = bad_videos / name
    with pytest.raises(VideoError) as info:
        load_video(name, str(bad_videos), DataArguments(base_interval=0.25), CFG, backend=backend)
    assert str(info.value) == (f"broken video {path}: the header promises 48 frames but the file holds only 24 (a "
                               "truncated file or an edited header); its frames cannot be sampled as planned")
    # the decoders themselves refuse a frame past the last one too (no probe involved)
    with pytest.raises(VideoError, match=re.escape(f"{path}: frame 40 was planned but only 24 frames decode")):
        read_frames(str(path), [0, 20, 40], backend)
    frames = read_frames(str(path), [0, 23], backend)  # the frames that exist still decode
    assert np.abs(frames.reshape(2, -1).mean(axis=1) - [0, 92]).max() < 4  # MPEG-4 part 2 at its default quality


@pytest.mark.parametrize("name, message", [
    ("fps_90000.mp4", "broken video metadata in {P}: 90000 fps is outside [0.01, 1000]"),
    ("zero_time_scale.mp4", "broken video metadata in {P}: 0.000976562 fps is outside [0.01, 1000]"),
    ("zero_frame_delta.mp4", "broken timestamps in {P}: 24 frames share "),
    ("gap.mkv", "inconsistent video metadata in {P}: 24 frames at 12 fps last 2.000 s but the frames' timestamps "
                "span 600.083 s"),
    ("jpeg.mp4", "{P} is a JPEG image, not a video: list it under 'image' with an <image> tag"),
    ("png.mp4", "{P} is a PNG image, not a video: list it under 'image' with an <image> tag"),
])
def test_nonsense_timing_and_images_named_as_videos_are_refused_by_the_probe(bad_videos, name, message):
    """The probe is what tools/pack_data.py counts with: it must refuse what training refuses."""
    path = bad_videos / name
    with pytest.raises(VideoError) as info:
        probe_video(name, str(bad_videos))
    assert str(info.value).startswith(message.format(P=path)), str(info.value)
    args = DataArguments()
    for backend in BACKENDS:
        with pytest.raises(VideoError) as again:
            load_video(name, str(bad_videos), args, CFG, backend=backend)
        assert str(again.value) == str(info.value)


def test_the_control_clip_of_the_bad_videos_is_fine(bad_videos):
    assert probe_video("good.mp4", str(bad_videos)) == VideoMeta(24, 12.0, 48, 64)
