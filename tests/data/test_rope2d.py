"""Tests for qwenvl/data/rope2d.py.

Two references:
- transformers' own ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), bound to a stand-in
  object carrying only ``config``, on inputs where it follows SPEC section 8;
- a loop-per-token implementation of the SPEC rule written here, on random sequences,
  including videos whose temporal span exceeds the spatial one (where transformers differs).
"""

import doctest
import functools
import random
import struct
import types

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from qwenvl.data import rope2d
from qwenvl.data.rope2d import get_rope_index_2, get_rope_index_3, get_rope_index_25

MERGE = 2
IMAGE, VIDEO, VISION_START, VISION_END = 151655, 151656, 151652, 151653  # the tokenizer's defaults


# ---------------------------------------------------------------- sequence building


def build(
    samples: list[list], *, image_id: int = IMAGE, video_id: int = VIDEO, start_id: int = VISION_START
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[float]]:
    """Token ids, image grids, video grids and seconds per grid from a compact description.

    A sample is a list of items: an int n is n text tokens, ("image", (t, h, w)) and
    ("video", (t, h, w), seconds) are vision blocks wrapped in vision start / end tokens.
    """
    sequences, images, videos, seconds = [], [], [], []
    for sample in samples:
        ids: list[int] = []
        for item in sample:
            if isinstance(item, int):
                ids += [10 + (len(ids) + i) % 1000 for i in range(item)]
                continue
            kind, grid = item[0], item[1]
            ids.append(start_id)
            ids += [image_id if kind == "image" else video_id] * (grid[0] * grid[1] * grid[2] // MERGE**2)
            ids.append(VISION_END)
            if kind == "image":
                images.append(list(grid))
            else:
                videos.append(list(grid))
                seconds.append(item[2])
        sequences.append(ids)
    return sequences, images, videos, seconds


def pad(sequences: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) ids padded with 0 and the (batch, seq) attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for b, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, span] = torch.tensor(s)
        mask[b, span] = 1
    return ids, mask


def as_grid(rows: list[list[int]]) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.long) if rows else None


# ---------------------------------------------------------------- transformers oracle


@functools.cache
def oracle(version: str):
    """transformers' get_rope_index for one model, without building the model."""
    vision = {"spatial_merge_size": MERGE}
    model_cls, config = {
        "2": (Qwen2VLModel, lambda: Qwen2VLConfig(vision_config=vision)),
        "2.5": (Qwen2_5_VLModel, lambda: Qwen2_5_VLConfig(vision_config={**vision, "tokens_per_second": 2})),
        "3": (Qwen3VLModel, lambda: Qwen3VLConfig(vision_config=vision)),
    }[version]
    stand_in = types.SimpleNamespace(config=config())
    stand_in.get_vision_position_ids = types.MethodType(model_cls.get_vision_position_ids, stand_in)
    return types.MethodType(model_cls.get_rope_index, stand_in)


def oracle_positions(version, ids, images, videos, seconds=None, mask=None):
    token_type = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()  # 0 text, 1 image, 2 video
    kwargs = {"second_per_grid_ts": seconds} if version == "2.5" else {}
    return oracle(version)(
        ids, token_type, image_grid_thw=images, video_grid_thw=videos, attention_mask=mask, **kwargs
    )


OURS = {"2": get_rope_index_2, "2.5": get_rope_index_25, "3": get_rope_index_3}

# Temporal spans stay inside the spatial ones, where transformers follows SPEC 8.
ORACLE_CASES = {
    "text_only": [[7]],
    "single_image": [[5, ("image", (1, 8, 12)), 9]],
    "image_first_and_last": [[("image", (1, 4, 4)), 3, ("image", (1, 6, 2))]],
    "multi_image": [[3, ("image", (1, 8, 8)), 2, ("image", (1, 4, 12)), 1, ("image", (1, 14, 6)), 4]],
    "image_video_mix": [[2, ("video", (3, 8, 12), 1.0), 4, ("image", (1, 6, 6)), 3, ("video", (2, 4, 6), 1.0), 1]],
    "video_half_second": [[2, ("video", (4, 12, 12), 0.5), 3]],
    "video_quarter_second": [[2, ("video", (6, 8, 12), 0.25), 3, ("video", (3, 6, 6), 0.5), 1]],
    "batch": [
        [4, ("image", (1, 6, 8)), 6],
        [1, ("video", (2, 8, 8), 1.0), 2, ("image", (1, 4, 4)), 9],
        [12],
        [("image", (1, 10, 4)), 2, ("video", (4, 10, 10), 0.5)],
    ],
    "text_batch": [[7], [3], [5]],
}
# Samples of different lengths only go together with padding.
ORACLE_PARAMS = [
    (case, padding)
    for case, samples in sorted(ORACLE_CASES.items())
    for padding in (None, "right", "left")
    if padding or len(samples) == 1
]


def split_frames(samples: list[list]) -> tuple[list[list], list[list[int]]]:
    """Qwen3-VL layout: each video becomes one (1, h, w) block per temporal step, each after a
    timestamp text token. Returns the new samples and the whole-video grids, in order."""
    split, video_grids = [], []
    for sample in samples:
        items = []
        for item in sample:
            if isinstance(item, tuple) and item[0] == "video":
                _, (t, h, w), seconds = item
                video_grids.append([t, h, w])
                items += [x for _ in range(t) for x in (1, ("video", (1, h, w), seconds))]
            else:
                items.append(item)
        split.append(items)
    return split, video_grids


@pytest.mark.parametrize("version", ["2", "2.5", "3"])
@pytest.mark.parametrize(("case", "padding"), ORACLE_PARAMS)
def test_matches_transformers(case, padding, version):
    samples, video_grids = ORACLE_CASES[case], None
    if version == "3":
        samples, video_grids = split_frames(samples)
    sequences, images, videos, seconds = build(samples)
    ids, mask = (torch.tensor(sequences), None) if padding is None else pad(sequences, padding)
    images = as_grid(images)
    videos = as_grid(video_grids if version == "3" else videos)  # Qwen3-VL takes whole-video grids
    seconds = seconds or None
    ours, ours_delta = OURS[version](MERGE, ids, images, videos, seconds, mask)
    assert ours.dtype == ours_delta.dtype == torch.long
    assert ours.shape == (3, *ids.shape) and ours_delta.shape == (ids.shape[0], 1)

    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.equal(ours[:, ~real], torch.ones_like(ours[:, ~real]))  # padding is 1, as in the original
    if images is None and videos is None:
        expected = (real.long().cumsum(-1) - 1).expand(3, -1, -1)  # text only: a plain count
        assert torch.equal(ours[:, real], expected[:, real])
        assert torch.equal(ours_delta, torch.zeros_like(ours_delta))
    # transformers fills padding with 0, so compare real tokens only.
    expected, expected_delta = oracle_positions(version, ids, images, videos, seconds, mask)
    assert torch.equal(ours[:, real], expected[:, real])
    assert torch.equal(ours_delta, expected_delta)


# ---------------------------------------------------------------- SPEC 8 reference


def f32(x: float) -> float:
    """x rounded to float32: the original computes time steps as float32 products."""
    return struct.unpack("f", struct.pack("f", x))[0]


def reference(version, ids, images, videos, seconds, mask, *, image_id=IMAGE, video_id=VIDEO, tps=2):
    """SPEC 8 one token at a time: (3, batch, seq) positions and (batch, 1) deltas."""
    batch, seq = len(ids), len(ids[0])
    mask = None if mask is None else mask.tolist()
    positions = [[[1] * seq for _ in range(batch)] for _ in range(3)]
    deltas = []
    image_iter, video_iter = iter(images), iter(range(len(videos)))
    for b in range(batch):
        real = [i for i in range(seq) if mask is None or mask[b][i]]
        tokens = [ids[b][i] for i in real]
        rows, i, next_pos = [], 0, 0
        while i < len(tokens):
            if tokens[i] not in (image_id, video_id):
                rows.append((next_pos, next_pos, next_pos))
                next_pos += 1
                i += 1
                continue
            if tokens[i] == image_id:
                t, h, w = next(image_iter)
                t_index = [0] * t if version == "2.5" else list(range(t))
            else:
                v = next(video_iter)
                t, h, w = videos[v]
                if version == "2.5":
                    t_index = [int(f32(f32(g * seconds[v]) * tps)) for g in range(t)]
                else:
                    t_index = list(range(t))
            start = next_pos
            for ti in range(t):
                for hi in range(h // MERGE):
                    for wi in range(w // MERGE):
                        rows.append((start + t_index[ti], start + hi, start + wi))
            i += t * (h // MERGE) * (w // MERGE)
            next_pos = max(max(r) for r in rows) + 1
        for j, row in zip(real, rows, strict=True):
            for axis in range(3):
                positions[axis][b][j] = row[axis]
        deltas.append([next_pos - len(tokens)])
    return torch.tensor(positions), torch.tensor(deltas)


def random_samples(rng: random.Random, batch: int) -> list[list]:
    samples = []
    for _ in range(batch):
        sample = [rng.randint(0, 6)]
        for _ in range(rng.randint(0, 4)):
            h, w = 2 * rng.randint(1, 6), 2 * rng.randint(1, 6)
            if rng.random() < 0.5:
                sample.append(("image", (1, h, w)))
            else:
                # Long videos on small frames: the temporal span often exceeds the spatial one.
                t = rng.randint(1, 12)
                sample.append(("video", (t, h, w), rng.choice([1.0, 0.5, 0.25, 2.0, 1 / 3, 0.7, 1.3])))
            sample.append(rng.randint(1, 5))
        samples.append(sample)
    return samples


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("seed", range(40))
def test_matches_spec_reference(seed, version):
    rng = random.Random(seed)
    sequences, images, videos, seconds = build(random_samples(rng, rng.randint(1, 4)))
    ids, mask = pad(sequences, rng.choice(["left", "right"]))
    if rng.random() < 0.3:
        mask = None  # the pad id 0 then reads as text
    second_per_grid_ts = torch.tensor(seconds) if seconds and seed % 2 else seconds or None
    ours, ours_delta = OURS[version](MERGE, ids, as_grid(images), as_grid(videos), second_per_grid_ts, mask)
    seconds32 = [f32(s) for s in seconds]
    expected, expected_delta = reference(version, ids.tolist(), images, videos, seconds32, mask)
    assert torch.equal(ours, expected)
    assert torch.equal(ours_delta, expected_delta)


def test_temporal_span_beyond_spatial_resumes_after_largest_index():
    # 6 frames of a 2x2 merged grid: t_index reaches 5 while h, w stop at 1. Text resumes at s + 5 + 1.
    sequences, _, videos, _ = build([[1, ("video", (6, 4, 4), 1.0), 1]])
    ids = torch.tensor(sequences)
    for fn, step in ((get_rope_index_2, 1), (get_rope_index_25, 2)):
        pos, delta = fn(MERGE, ids, video_grid_thw=torch.tensor(videos))
        # tokens: text, vision_start, 24 video pads, vision_end, text
        s = 2
        largest = s + max(5 * step, 1)
        assert pos[0, 0, 2:26].tolist() == [s + step * (i // 4) for i in range(24)]
        assert pos[:, 0, 26].tolist() == [largest + 1] * 3
        assert pos[:, 0, 27].tolist() == [largest + 2] * 3
        assert delta.tolist() == [[largest + 3 - 28]]


def test_fractional_seconds_floor_like_the_original():
    # 0.7 s per grid step at 2 tokens per second: floor(1.4 g) = 0, 1, 2, 4, 5, 7
    ids = torch.tensor([[3] + [VIDEO] * 6 + [4]])
    pos, _ = get_rope_index_25(MERGE, ids, video_grid_thw=[[6, 2, 2]], second_per_grid_ts=[0.7])
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 5, 6, 8, 9]
    pos, _ = get_rope_index_25(MERGE, ids, video_grid_thw=[[6, 2, 2]], second_per_grid_ts=torch.tensor([0.7]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 5, 6, 8, 9]


def test_images_ignore_second_per_grid_ts():
    ids = torch.tensor([[IMAGE] * 4 + [9] + [VIDEO] * 2])
    pos, _ = get_rope_index_25(
        MERGE, ids, image_grid_thw=[[1, 4, 4]], video_grid_thw=[[2, 2, 2]], second_per_grid_ts=[3.0]
    )
    assert pos.tolist() == [[[0, 0, 0, 0, 2, 3, 9]], [[0, 0, 1, 1, 2, 3, 3]], [[0, 1, 0, 1, 2, 3, 3]]]


def test_non_default_token_ids():
    image_id, video_id, start_id = 7, 8, 5
    samples = [[2, ("image", (1, 4, 6)), 3, ("video", (5, 4, 4), 0.5), 1], [("video", (2, 6, 6), 1.0), 4]]
    sequences, images, videos, seconds = build(samples, image_id=image_id, video_id=video_id, start_id=start_id)
    sequences[1].append(IMAGE)  # the default image id is plain text for this tokenizer
    ids, mask = pad(sequences, "left")
    kwargs = {"image_token_id": image_id, "video_token_id": video_id, "vision_start_token_id": start_id}
    pos, delta = get_rope_index_25(MERGE, ids, as_grid(images), as_grid(videos), seconds, mask, **kwargs)
    expected, expected_delta = reference(
        "2.5", ids.tolist(), images, videos, seconds, mask, image_id=image_id, video_id=video_id
    )
    assert torch.equal(pos, expected) and torch.equal(delta, expected_delta)
    # With the default ids the same sequence reads as text plus one stray image pad.
    with pytest.raises(ValueError, match="image"):
        get_rope_index_25(MERGE, ids, as_grid(images), as_grid(videos), seconds, mask)


def test_tokens_per_second():
    ids = torch.tensor([[VIDEO] * 3])
    pos, _ = get_rope_index_25(MERGE, ids, video_grid_thw=[[3, 2, 2]], second_per_grid_ts=[1.0], tokens_per_second=4)
    assert pos[0, 0].tolist() == [0, 4, 8]


def test_text_only_and_empty_rows():
    ids = torch.tensor([[11, 12, 13, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    pos, delta = get_rope_index_25(MERGE, ids, attention_mask=mask)
    assert pos[:, 0].tolist() == [[0, 1, 2, 1]] * 3
    assert pos[:, 1].tolist() == [[1, 1, 1, 1]] * 3
    assert delta.tolist() == [[0], [0]]


def test_qwen3_splits_videos_into_frames():
    # Timestamps between frames; the whole-video grid (3, 4, 4) stands for three (1, 4, 4) blocks.
    frame = [VISION_START] + [VIDEO] * 4 + [VISION_END]
    ids = torch.tensor([[20] + frame + [21] + frame + [22] + frame])
    grid = torch.tensor([[3, 4, 4]])
    pos, _ = get_rope_index_3(MERGE, ids, video_grid_thw=grid)
    expected, _ = get_rope_index_2(MERGE, ids, video_grid_thw=[[1, 4, 4]] * 3)
    assert torch.equal(pos, expected)
    assert torch.equal(grid, torch.tensor([[3, 4, 4]]))  # caller's grid untouched


# ---------------------------------------------------------------- errors


def test_more_image_blocks_than_grids():
    sequences, images, _, _ = build([[1, ("image", (1, 4, 4)), 1, ("image", (1, 4, 4))]])
    with pytest.raises(ValueError, match=r"i\.e\. 1 blocks, but found 2 in input_ids"):
        get_rope_index_25(MERGE, torch.tensor(sequences), image_grid_thw=images[:1])


def test_fewer_video_blocks_than_grids():
    sequences, _, videos, _ = build([[1, ("video", (2, 4, 4), 1.0), 1]])
    with pytest.raises(ValueError, match=r"video_grid_thw, i\.e\. 2 blocks, but found 1"):
        get_rope_index_2(MERGE, torch.tensor(sequences), video_grid_thw=videos * 2)


def test_vision_tokens_without_grids():
    with pytest.raises(ValueError, match=r"image_grid_thw, i\.e\. 0 blocks, but found 1"):
        get_rope_index_25(MERGE, torch.tensor([[1, IMAGE, 2]]))


def test_block_length_mismatch():
    ids = torch.tensor([[1, 2] + [IMAGE] * 5 + [3]])
    with pytest.raises(
        ValueError,
        match=r"image 0 \(sample 0, tokens 2:7 of the real tokens\) has grid \(t, h, w\) = \(1, 4, 4\), "
        r"so expected t \* h \* w / 2\*\*2 = 4 image pad tokens but found 5",
    ):
        get_rope_index_25(MERGE, ids, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_adjacent_blocks_without_separator_are_one_run():
    ids = torch.tensor([[1] + [IMAGE] * 8 + [2]])
    with pytest.raises(ValueError, match="expected t \\* h \\* w / 2\\*\\*2 = 4 image pad tokens but found 8"):
        get_rope_index_25(MERGE, ids, image_grid_thw=[[1, 4, 4], [1, 4, 4]])


def test_too_few_seconds():
    ids = torch.tensor([[VIDEO] + [1] + [VIDEO]])
    with pytest.raises(ValueError, match="one entry per video but found 1 entries"):
        get_rope_index_25(MERGE, ids, video_grid_thw=[[1, 2, 2]] * 2, second_per_grid_ts=[1.0])


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"shape of input_ids \(1, 3\) but found \(1, 2\)"):
        get_rope_index_25(MERGE, torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))


def test_docstring_examples():
    assert doctest.testmod(rope2d).failed == 0


# ---------------------------------------------------------------- Qwen3-VL (issue 11)


def test_qwen3_accepts_the_keyword_arguments_the_dataset_passes():
    # Called as LazySupervisedDataset calls every variant; this used to raise
    # "get_rope_index_3() got an unexpected keyword argument 'tokens_per_second'".
    samples, video_grids = split_frames([[3, ("image", (1, 6, 4)), 2, ("video", (3, 6, 8), 1.0), 1]])
    sequences, images, _, _ = build(samples)
    ids = torch.tensor(sequences)
    pos, delta = get_rope_index_3(
        MERGE, ids, image_grid_thw=as_grid(images), video_grid_thw=as_grid(video_grids), second_per_grid_ts=[1.0],
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, tokens_per_second=2,
    )
    expected, expected_delta = oracle_positions("3", ids, as_grid(images), as_grid(video_grids))
    assert torch.equal(pos, expected) and torch.equal(delta, expected_delta)


def test_qwen3_blocks_from_mm_token_type_ids():
    # Token types mark the blocks as the model's own rule does, whatever the pad ids are.
    samples, video_grids = split_frames([[2, ("video", (2, 4, 6), 1.0), 3, ("image", (1, 4, 4))], [5, ("image", (1, 8, 4))]])
    sequences, images, _, _ = build(samples)
    ids, mask = pad(sequences, "left")
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    other = ids.masked_fill(types > 0, 7)  # pads of a tokenizer whose ids differ, given only by the types
    pos, delta = get_rope_index_3(MERGE, other, as_grid(images), as_grid(video_grids), None, mask,
                                  mm_token_type_ids=types, image_token_id=-1, video_token_id=-1)
    expected, expected_delta = oracle("3")(ids, types, image_grid_thw=as_grid(images),
                                           video_grid_thw=as_grid(video_grids), attention_mask=mask)
    real = mask.bool()
    assert torch.equal(pos[:, real], expected[:, real]) and torch.equal(delta, expected_delta)
    with pytest.raises(ValueError, match=r"mm_token_type_ids should have the shape of input_ids \(2, \d+\)"):
        get_rope_index_3(MERGE, other, as_grid(images), as_grid(video_grids), mm_token_type_ids=types[:, 1:])
    with pytest.raises(ValueError, match=r"image_grid_thw, i\.e\. 1 blocks, but found 2"):
        get_rope_index_3(MERGE, other, as_grid(images)[:1], as_grid(video_grids), None, mask, mm_token_type_ids=types)


@pytest.mark.parametrize("grid", [(3, 2, 2), (5, 4, 2), (1, 2, 8)])
def test_qwen3_text_resumes_after_the_spatial_span(grid):
    # Qwen3-VL moves text on by max(h, w) / merge after a block, even when its temporal rows reach
    # further (a grid with t > 1 and a small frame); the delta is still the real maximum + 1 - n.
    sequences, images, _, _ = build([[2, ("image", grid), 3]])
    ids = torch.tensor(sequences)
    pos, delta = get_rope_index_3(MERGE, ids, image_grid_thw=as_grid(images))
    expected, expected_delta = oracle_positions("3", ids, as_grid(images), None)
    assert torch.equal(pos, expected) and torch.equal(delta, expected_delta)
