"""The data pipeline for every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE) against independent oracles.

Oracles, none of them the code under test:
- token ids: the chat text written out here by hand per the released layout (Qwen2/2.5-VL: a
  default system prompt; Qwen3-VL: none), each vision pad expanded per the grid transformers'
  image processor (PIL backend) computes; Qwen3-VL videos: frames from transformers'
  ``Qwen3VLVideoProcessor.sample_frames``, frame size from its ``smart_resize``, timestamps from
  ``Qwen3VLProcessor._calculate_timestamps``; container numbers read with PyAV here;
- pixel values: transformers' image processor (PIL backend);
- position ids: the model's own ``get_rope_index``;
- token counts: ``len(dataset[i]["input_ids"])`` vs ``tools/pack_data.py``'s counter.
"""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.video_utils import VideoMetadata

from qwenvl.data import data_list
from qwenvl.data.data_qwen import LazySupervisedDataset, load_annotations, make_supervised_data_module
from qwenvl.data.token_count import TokenCounter
from qwenvl.data.vision import VisionConfig, open_image
from qwenvl.models import family_for
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments

MODEL_TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
QWEN3 = ("qwen3_vl", "qwen3_vl_moe")
DATASETS = ["demo_single_image", "demo_multi_image", "demo_grounding", "demo_text_only", "demo_video"]
IGNORE = -100


class Setup:
    """Tokenizer, vision config and dataset of one family over all demo datasets (built once)."""

    def __init__(self, folder, model_type):
        self.folder, self.model_type = folder, model_type
        self.family = family_for(model_type)
        self.args = DataArguments(dataset_use=",".join(DATASETS))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.vision_config = VisionConfig.from_image_processor(load_image_processor(str(folder)),
                                                               self.args.min_pixels, self.args.max_pixels)
        self.dataset = LazySupervisedDataset(self.tokenizer, self.args, self.vision_config, model_type=model_type,
                                             model_max_length=8192,
                                             vision_settings=self.family.vision_settings(folder))
        # transformers' image processor of the checkpoint, with the flags' pixel limits.
        self.reference = Qwen2VLImageProcessorPil.from_pretrained(
            folder, min_pixels=int(self.args.min_pixels), max_pixels=int(self.args.max_pixels))


_SETUPS: dict[str, Setup] = {}


@pytest.fixture(scope="module")
def setups(tiny_dirs):
    def get(model_type):
        if model_type not in _SETUPS:
            _SETUPS[model_type] = Setup(tiny_dirs[model_type], model_type)
        return _SETUPS[model_type]
    return get


def demo_records():
    """(dataset config, index, record) of every demo sample, in dataset order."""
    out = []
    for config in data_list(DATASETS):
        for index, record in enumerate(load_annotations(config["annotation_path"])):
            out.append((config, index, record))
    return out


def as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]


def container(path):
    """(frames, fps, height, width) as the container says (PyAV, not the code under test)."""
    with av.open(path) as handle:
        stream = handle.streams.video[0]
        return int(stream.frames), float(stream.average_rate), stream.codec_context.height, stream.codec_context.width


def image_text(setup, image):
    """<|vision_start|> + pads per transformers' grid + <|vision_end|>; and its pixel values."""
    out = setup.reference(images=[image])
    t, h, w = out["image_grid_thw"][0].tolist()
    return "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>", out["pixel_values"]


def video_text(setup, path):
    """A demo video written out by the family's released rule, the numbers from transformers' functions."""
    frames, fps, height, width = container(path)
    args, merge = setup.args, 2
    if setup.model_type in QWEN3:
        sampler = Qwen3VLVideoProcessor(min_frames=args.video_min_frames, max_frames=args.video_max_frames)
        indices = sampler.sample_frames(VideoMetadata(total_num_frames=frames, fps=fps), fps=args.video_fps)
        settings = setup.family.vision_settings(setup.folder)
        resized_h, resized_w = qwen3_smart_resize(len(indices), height, width, temporal_factor=2, factor=32,
                                                  min_pixels=settings.video_min_pixels,
                                                  max_pixels=settings.video_max_pixels)
        stamps = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        pads = (resized_h // 16) * (resized_w // 16) // merge**2
        assert len(stamps) == math.ceil(len(indices) / 2)
        return "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * pads + "<|vision_end|>"
                       for s in stamps)
    # SPEC 7 (Qwen2/2.5-VL): round(duration / base_interval) frames within the limits, unique.
    n = min(max(round(frames / fps / args.base_interval), args.video_min_frames), args.video_max_frames)
    count = len(np.unique(np.linspace(0, frames - 1, n).astype(int)))
    resized_h, resized_w = qwen2_smart_resize(height, width, 28, int(args.video_min_frame_pixels),
                                              int(args.video_max_frame_pixels))
    pads = math.ceil(count / 2) * (resized_h // 14) * (resized_w // 14) // merge**2
    return "<|vision_start|>" + "<|video_pad|>" * pads + "<|vision_end|>"


def oracle(setup, config, record):
    """(input_ids, labels, image pixel values) written out by hand for one demo record."""
    turns = record["conversations"]
    images = iter(as_list(record.get("image")) + as_list(record.get("images")))
    videos = iter(as_list(record.get("video")) + as_list(record.get("videos")))
    segments, pixels = [], []  # (text, learned)
    if turns[0]["from"] == "system":
        segments.append((f"<|im_start|>system\n{turns[0]['value']}<|im_end|>\n", False))
        turns = turns[1:]
    elif setup.model_type not in QWEN3:  # Qwen3-VL has no default system prompt
        segments.append(("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False))
    for turn in turns:
        value = turn["value"]
        if turn["from"] == "human":
            text = ""
            for piece in _split_tags(value):
                if piece == "<image>":
                    block, values = image_text(setup, open_image(next(images), config["data_path"]))
                    text += block
                    pixels.append(values)
                elif piece == "<video>":
                    text += video_text(setup, f"{config['data_path']}/{next(videos)}")
                else:
                    text += piece
            segments.append((f"<|im_start|>user\n{text}<|im_end|>\n", False))
        else:
            segments += [("<|im_start|>assistant\n", False), (f"{value}<|im_end|>\n", True)]
    tok = setup.tokenizer
    ids, labels = [], []
    for text, learned in segments:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    whole = tok("".join(text for text, _ in segments), add_special_tokens=False).input_ids
    assert whole == ids  # the segments tokenise as the whole text does
    return ids, labels, (np.concatenate(pixels) if pixels else None)


def _split_tags(text):
    out, rest = [], text
    while rest:
        cut = min((rest.find(tag), tag) for tag in ("<image>", "<video>") if tag in rest) if any(
            tag in rest for tag in ("<image>", "<video>")) else (-1, None)
        if cut[0] < 0:
            out.append(rest)
            break
        out += [rest[:cut[0]], cut[1]]
        rest = rest[cut[0] + len(cut[1]):]
    return [p for p in out if p]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_items_equal_the_hand_written_layout(setups, model_type):
    setup = setups(model_type)
    records = demo_records()
    assert len(records) == len(setup.dataset)
    for i, (config, index, record) in enumerate(records):
        item = setup.dataset[i]
        ids, labels, pixels = oracle(setup, config, record)
        where = f"{config['name']}:{index}"
        assert item["input_ids"].tolist() == ids, where
        assert item["labels"].tolist() == labels, where
        if pixels is not None:
            np.testing.assert_allclose(item["pixel_values"].numpy(), pixels, atol=1e-6, rtol=0, err_msg=where)
        else:
            assert "pixel_values" not in item, where
        assert ("second_per_grid_ts" in item) == (family_for(model_type).uses_second_per_grid_ts
                                                  and "pixel_values_videos" in item)


_MODELS: dict = {}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_position_ids_equal_the_models_get_rope_index(setups, tiny_dirs, model_type):
    """Image, multi-image, video and mixed demo samples: the dataset's ids vs the model's own rule."""
    setup = setups(model_type)
    model = family_for(model_type).model_class()(AutoConfig.from_pretrained(tiny_dirs[model_type]))
    config = model.config
    checked = set()
    for i, (cfg, _, record) in enumerate(demo_records()):
        kind = (bool(as_list(record.get("image")) + as_list(record.get("images"))),
                bool(as_list(record.get("video"))), len(as_list(record.get("image"))) > 1)
        if kind in checked or kind == (False, False, False):
            continue
        checked.add(kind)
        item = setup.dataset[i]
        ids = item["input_ids"][None]
        types = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
        kwargs = {}
        if "second_per_grid_ts" in item:
            kwargs["second_per_grid_ts"] = torch.tensor(item["second_per_grid_ts"])
        expected, _ = model.model.get_rope_index(ids, types, image_grid_thw=item.get("image_grid_thw"),
                                                 video_grid_thw=item.get("video_grid_thw"),
                                                 attention_mask=torch.ones_like(ids), **kwargs)
        assert torch.equal(item["position_ids"], expected[:, 0]), (model_type, cfg["name"])
    # image, multi-image, video, and video + image in one sample
    assert {(True, False, False), (True, False, True), (False, True, False), (True, True, False)} <= checked


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_token_counts_equal_the_dataset(setups, model_type):
    setup = setups(model_type)
    family = setup.family
    counter = TokenCounter(setup.tokenizer, setup.args, setup.vision_config, 8192, family=family,
                           settings=family.vision_settings(setup.folder))
    for i, (config, index, record) in enumerate(demo_records()):
        count = counter.count(record, config["data_path"], config["annotation_path"], index)
        assert count.ok and count.length == len(setup.dataset[i]["input_ids"]), (config["name"], index, count)


def test_model_type_keyword_and_family_agree(setups):
    setup = setups("qwen3_vl")
    module = make_supervised_data_module(setup.tokenizer, DataArguments(dataset_use="demo_video"), setup.vision_config,
                                         model_type="qwen3_vl", model_max_length=8192)
    assert module["train_dataset"].family is family_for("qwen3_vl")
    with pytest.raises(ValueError, match="model_type should be one of qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, "
                                         "llava, llava_next, llava_onevision, internvl, paligemma, idefics3, "
                                         "smolvlm, gemma3 but found 'mllama'"):
        LazySupervisedDataset(setup.tokenizer, DataArguments(dataset_use="demo_video"), setup.vision_config,
                              model_type="mllama")
