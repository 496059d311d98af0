"""Tests for qwenvl/models: each family against transformers' own processors and models.

Oracles: the tiny checkpoints of tools/build_tiny_model.py (real Qwen tokenizer), transformers'
processors (PIL image backend; torchvision is not installed), the Qwen3-VL video processor's
frame sampler and the models' own ``get_rope_index``; the released chat layouts written out
by hand.
"""

from __future__ import annotations

import doctest
import functools
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_video_smart_resize
from transformers.video_utils import VideoMetadata

import qwenvl.models
import qwenvl.models.base
import qwenvl.models.qwen3_vl
from qwenvl.data.vision import image_grid_thw
from qwenvl.models import FAMILIES, LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.qwen3_vl import QWEN3_VL, frame_indices, video_frame_size, video_timestamps

MODEL_TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
QWEN3 = ["qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs: dict[str, Path]):
    """The real Qwen tokenizer (all four folders hold the same vocabulary)."""
    return folder_tokenizer(tiny_dirs["qwen3_vl"])


_MODELS: dict[str, torch.nn.Module] = {}


def tiny_model(tiny_dirs: dict[str, Path], model_type: str) -> torch.nn.Module:
    """The tiny model of a family, loaded once per module through the family's class."""
    if model_type not in _MODELS:
        _MODELS[model_type] = family_for(model_type).model_class().from_pretrained(tiny_dirs[model_type])
    return _MODELS[model_type]


@functools.cache
def folder_tokenizer(folder: Path):
    """A checkpoint folder's tokenizer (with its chat template), loaded once."""
    return AutoTokenizer.from_pretrained(folder)


@functools.cache
def processor_for(folder: Path, model_type: str):
    """transformers' own processor for a tiny folder, with the PIL image processor.

    ProcessorMixin checks each component against base classes that transformers only exposes
    when torchvision is installed; the subclass skips that check (the components are the real
    ones). Qwen2VLVideoProcessor cannot be imported without torchvision, so the Qwen2/2.5-VL
    processors get the Qwen3-VL video processor as a stand-in that image-only calls never use.
    """
    base = getattr(transformers, family_for(model_type).processor_class)
    cls = type(f"Pil{base.__name__}", (base,), {"check_argument_for_proper_class": lambda self, name, arg: type(arg)})
    tokenizer = folder_tokenizer(folder)
    video = Qwen3VLVideoProcessor.from_pretrained(folder) if model_type in QWEN3 else Qwen3VLVideoProcessor()
    return cls(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer=tokenizer,
               video_processor=video, chat_template=tokenizer.chat_template)


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_found_from_tiny_config(tiny_dirs, model_type):
    config = AutoConfig.from_pretrained(tiny_dirs[model_type])
    family = family_for(config)
    assert family is FAMILIES[model_type] and family.model_type == model_type
    assert family_for(config.to_dict()) is family
    assert family.model_class().__name__ == config.architectures[0]
    assert family.model_class().config_class.model_type == model_type


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava, llava_next, llava_onevision, "
                                         "internvl, paligemma, idefics3, smolvlm, gemma3 but found 'mllama'"):
        family_for("mllama")
    with pytest.raises(ValueError, match="but found None"):
        family_for({})


# ------------------------------------------------------------ special tokens


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_special_token_ids_equal_the_tokenizers(tiny_dirs, tokenizer, model_type):
    family = family_for(model_type)
    ids = family.token_ids(tokenizer)
    config = AutoConfig.from_pretrained(tiny_dirs[model_type])
    assert (ids.image_pad, ids.video_pad, ids.vision_start, ids.vision_end) == (
        config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    assert ids.im_end == tokenizer.eos_token_id
    # Each token string encodes to exactly its id.
    for name, token in vars(family.tokens).items():
        assert tokenizer(token, add_special_tokens=False).input_ids == [getattr(ids, name)]


def test_token_ids_follow_a_tokenizer_whose_ids_differ():
    tokens = list(vars(QWEN3_VL.tokens).values())
    vocab = {"[UNK]": 0, "hello": 1, **{token: 10 + i for i, token in enumerate(reversed(tokens))}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    ids = QWEN3_VL.token_ids(tokenizer)
    assert ids.video_pad == 10 and ids.im_start == 16
    del vocab["<|video_pad|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"token '<\|video_pad\|>' but found it is not in the vocabulary"):
        QWEN3_VL.token_ids(tokenizer)


# ---------------------------------------------------------------- chat layout

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A red box."},
    {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "video"}]},
]
# The released layouts written out by hand: Qwen2/2.5-VL add a default system prompt, Qwen3-VL none.
QWEN2_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
    "<|im_start|>assistant\nA red box.<|im_end|>\n"
    "<|im_start|>user\nAnd this?<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN3_TEXT = QWEN2_TEXT.removeprefix("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_chat_layout_is_the_released_one(tiny_dirs, model_type):
    family = family_for(model_type)
    expected = QWEN3_TEXT if model_type in QWEN3 else QWEN2_TEXT
    turns = [("user", family.image_text((1, 2, 2), 2) + "What is this?"), ("assistant", "A red box."),
             ("user", "And this?" + family.tokens.vision_start + family.tokens.video_pad + family.tokens.vision_end)]
    assert family.chat_text(turns, add_generation_prompt=True) == expected
    rendered = folder_tokenizer(tiny_dirs[model_type]).apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == expected
    # A system turn replaces the default in both layouts.
    with_system = [{"role": "system", "content": "Be terse."}, *CONVERSATION[:2]]
    assert family.chat_text([("user", turns[0][1]), ("assistant", "A red box.")], system="Be terse.") == (
        folder_tokenizer(tiny_dirs[model_type]).apply_chat_template(with_system, tokenize=False))


def test_qwen3_template_numbers_media_under_add_vision_id(tiny_dirs):
    messages = [{"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"}]}]
    text = folder_tokenizer(tiny_dirs["qwen3_vl"]).apply_chat_template(
        messages, tokenize=False, add_vision_id=True)
    block = "<|vision_start|><|{}_pad|><|vision_end|>"
    assert text == (f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nPicture 1: {block.format('image')}"
                    f"Picture 2: {block.format('image')}Video 1: {block.format('video')}<|im_end|>\n")


# ------------------------------------------------------------- image tokens


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_image_expansion_equals_the_processors(tiny_dirs, tokenizer, model_type):
    family = family_for(model_type)
    settings = family.vision_settings(tiny_dirs[model_type])
    images = [Image.new("RGB", (100, 60), (255, 0, 0)), Image.new("RGB", (333, 517), (0, 9, 200))]
    # Grids from the family's settings and the project's own resize rule, not from transformers.
    grids = [image_grid_thw(image.height, image.width, settings.image_config()) for image in images]
    turns = [("user", family.image_text(grids[0], settings.merge_size) + "Compare with"
              + family.image_text(grids[1], settings.merge_size) + "."), ("assistant", "Same.")]
    ours = tokenizer(family.chat_text(turns), add_special_tokens=False).input_ids

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                             {"type": "image"}, {"type": "text", "text": "."}]},
                {"role": "assistant", "content": "Same."}]
    processor = processor_for(tiny_dirs[model_type], model_type)
    expected = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=images)
    assert expected["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert ours == list(expected["input_ids"][0])
    if model_type in QWEN3:  # one LLM token per 32x32 pixels
        # 60x100 is lifted to >= 65536 pixels: x sqrt(65536 / 6000), sides up to multiples of 32: 224x352.
        assert settings.factor == 32 and grids[0] == (1, 224 // 16, 352 // 16)


# ------------------------------------------------------------- Qwen3-VL video

# (total frames, video fps, target fps, min frames, max frames)
SAMPLING = [(30, 10.0, 2.0, 4, 768), (25, 10.0, 2.0, 4, 768), (7, 24.0, 2.0, 4, 768), (3, 30.0, 2.0, 4, 768),
            (300, 29.97, 2.0, 4, 16), (1000, 25.0, 0.5, 4, 768), (61, 30.0, 1.0, 5, 9), (90, 23.976, 3.0, 4, 768)]


@pytest.mark.parametrize("case", SAMPLING)
def test_frame_indices_equal_the_video_processors(case):
    total, video_fps, target_fps, min_frames, max_frames = case
    processor = Qwen3VLVideoProcessor(min_frames=min_frames, max_frames=max_frames)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    expected = processor.sample_frames(metadata, fps=target_fps)
    assert frame_indices(total, video_fps, target_fps, min_frames, max_frames).tolist() == expected.tolist()


def test_frame_indices_reject_bad_metadata():
    with pytest.raises(ValueError, match="video_fps > 0 and target_fps > 0 but found 10, 0.0, 2.0"):
        frame_indices(10, 0.0, 2.0, 4, 768)
    with pytest.raises(ValueError, match="min_frames <= max_frames but found 9, 4"):
        frame_indices(10, 10.0, 2.0, 9, 4)


@pytest.mark.parametrize("case", SAMPLING[:4] + SAMPLING[6:7])
def test_video_timestamps_and_blocks_equal_the_processors(tiny_dirs, tokenizer, case):
    """End to end through Qwen3VLProcessor: same sampled frames, grid, timestamps and tokens."""
    total, video_fps, target_fps, min_frames, max_frames = case
    processor = processor_for(tiny_dirs["qwen3_vl"], "qwen3_vl")
    processor.video_processor.min_frames, processor.video_processor.max_frames = min_frames, max_frames
    video = np.random.default_rng(0).integers(0, 255, (total, 64, 96, 3), dtype=np.uint8)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps, height=64, width=96)
    # A bare <|video_pad|> is replaced by exactly the timestamped blocks (see qwen3_vl.py's note).
    # Without torchvision the processor can only run with resize/convert/rescale/normalize off.
    expected = processor(
        text=["Look: <|video_pad|> done"], videos=[video],
        videos_kwargs={"video_metadata": [metadata], "fps": target_fps, "do_sample_frames": True,
                       "cap_pixels_per_frame": False, "do_resize": False, "do_convert_rgb": False,
                       "do_rescale": False, "do_normalize": False})

    indices = frame_indices(total, video_fps, target_fps, min_frames, max_frames)
    grid = (math.ceil(len(indices) / 2), 64 // 16, 96 // 16)
    assert expected["video_grid_thw"].tolist() == [list(grid)]
    timestamps = video_timestamps(indices, video_fps, 2)
    text = "Look: " + QWEN3_VL.video_text(grid, 2, timestamps) + " done"
    assert tokenizer(text, add_special_tokens=False).input_ids == list(expected["input_ids"][0])
    assert QWEN3_VL.video_block_lengths(grid, 2) == [6] * grid[0]


def test_video_text_needs_one_timestamp_per_patch():
    with pytest.raises(ValueError, match=r"one timestamp per temporal patch \(3\) but found 2"):
        QWEN3_VL.video_text((3, 4, 4), 2, [0.5, 1.5])
    assert FAMILIES["qwen2_5_vl"].video_text((3, 4, 4), 2).count("<|video_pad|>") == 12


def test_video_frame_size_equals_the_video_processors():
    rng = random.Random(0)
    for _ in range(300):
        frames, height, width = rng.randint(2, 64), rng.randint(8, 2000), rng.randint(8, 2000)
        low, high = rng.choice([4096, 65536, 128 * 32 * 32]), rng.choice([25165824, 786432, 16 * 4096, 2 ** 20])
        expected = qwen3_video_smart_resize(frames, height, width, 2, 32, low, high)
        assert video_frame_size(frames, height, width, 32, 2, low, high) == expected


# ------------------------------------------------------------- position ids


def build_sample(family, tokenizer, items, merge=2):
    """Token ids, image grids, whole-video grids and seconds per grid of a sample.

    items: "text", ("image", (t, h, w)) or ("video", (t, h, w), seconds per grid step); a
    Qwen3-VL video is written with timestamps of frames sampled at 2 fps from a 24 fps clip.
    """
    text, images, videos, seconds = "", [], [], []
    for item in items:
        if item == "text":
            text += "Some words about it. "
        elif item[0] == "image":
            text += family.image_text(item[1], merge)
            images.append(list(item[1]))
        else:
            t = item[1][0]
            stamps = video_timestamps(frame_indices(24 * t, 24.0, 2.0, 2, 768), 24.0, 2)
            text += family.video_text(item[1], merge, stamps)
            videos.append(list(item[1]))
            seconds.append(item[2])
    ids = tokenizer(family.chat_text([("user", text), ("assistant", "Fine.")]), add_special_tokens=False).input_ids
    return ids, images, videos, seconds


# Temporal spans stay inside the spatial ones, where transformers 5.23 follows the released rule.
ROPE_CASES = {
    "image": [["text", ("image", (1, 8, 12)), "text"]],
    "multi_image": [[("image", (1, 4, 4)), "text", ("image", (1, 14, 6)), ("image", (1, 6, 20))]],
    "video": [["text", ("video", (3, 8, 12), 1.0), "text"]],
    "mixed": [["text", ("video", (2, 12, 8), 0.5), ("image", (1, 6, 6)), "text", ("video", (4, 10, 10), 0.5)]],
    "batch": [["text", ("image", (1, 6, 8))], [("video", (2, 8, 8), 1.0), "text", ("image", (1, 4, 4))], ["text"]],
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_position_ids_equal_the_models_get_rope_index(tiny_dirs, tokenizer, model_type, case):
    family = family_for(model_type)
    model = tiny_model(tiny_dirs, model_type)
    ids = family.token_ids(tokenizer)
    samples = [build_sample(family, tokenizer, items) for items in ROPE_CASES[case]]
    length = max(len(s[0]) for s in samples)
    input_ids = torch.full((len(samples), length), ids.end_of_text)  # left padding
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, (sample_ids, _, _, _) in enumerate(samples):
        input_ids[b, length - len(sample_ids):] = torch.tensor(sample_ids)
        mask[b, length - len(sample_ids):] = 1
    images = [g for s in samples for g in s[1]]
    videos = [g for s in samples for g in s[2]]
    seconds = [x for s in samples for x in s[3]]
    image_grid = torch.tensor(images) if images else None
    video_grid = torch.tensor(videos) if videos else None
    config = model.config
    tokens_per_second = getattr(config.vision_config, "tokens_per_second", 2)

    ours, ours_delta = family.position_ids(input_ids, ids, 2, image_grid, video_grid, seconds or None, mask,
                                           tokens_per_second=tokens_per_second)
    # transformers' processors mark image pads 1 and video pads 2.
    token_types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if family.uses_second_per_grid_ts and seconds else {}
    expected, expected_delta = model.model.get_rope_index(
        input_ids, token_types, image_grid_thw=image_grid,
        video_grid_thw=None if video_grid is None else video_grid.clone(), attention_mask=mask, **kwargs)
    real = mask.bool()
    assert torch.equal(ours[:, real], expected[:, real])
    assert torch.equal(ours_delta, expected_delta)
    assert torch.equal(family.mm_token_type_ids(input_ids, ids), token_types)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parameter_classes_and_lora_targets(tiny_dirs, model_type):
    family = family_for(model_type)
    model = tiny_model(tiny_dirs, model_type)
    kinds = {name: family.classify_parameter(name) for name, _ in model.named_parameters()}
    projector = {name for name, kind in kinds.items() if kind == PROJECTOR}
    assert projector and all(".visual.merger." in n or ".visual.deepstack_merger_list." in n for n in projector)
    assert all(n.startswith("model.visual.") for n, kind in kinds.items() if kind == VISION_TOWER)
    assert all(not n.startswith("model.visual.") for n, kind in kinds.items() if kind == LLM)
    assert any(".deepstack_merger_list." in n for n in projector) == (model_type in QWEN3)
    assert family.classify_parameter("base_model.model.model.visual.deepstack_merger_list.1.linear_fc2.bias") == (
        PROJECTOR if model_type in QWEN3 else VISION_TOWER)
    # Every default LoRA target names a Linear layer of the language model.
    llm_linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and family.classify_parameter(f"{name}.weight") == LLM}
    assert set(family.lora_targets) <= llm_linear - {"lm_head"}
    if model_type == "qwen3_vl_moe":  # experts are fused tensors: no gate/up/down Linear to adapt
        assert not {"gate_proj", "up_proj", "down_proj"} & llm_linear


@pytest.mark.parametrize("model_type", QWEN3)
def test_dummy_vision_input_reaches_every_parameter(tiny_dirs, model_type):
    """Text-only loss + 0 x the tower on the family's dummy input: every parameter gets a gradient."""
    family = family_for(model_type)
    config = AutoConfig.from_pretrained(tiny_dirs[model_type])
    assert family.configure_router_aux_loss(config, 0.02) == (model_type == "qwen3_vl_moe")
    model = family.model_class().from_pretrained(tiny_dirs[model_type], config=config)
    model.train()
    pixels, grid = family.dummy_vision_input(model.config.vision_config)
    assert tuple(pixels.shape) == (4, 3 * 2 * 16 * 16) and grid.tolist() == [[1, 2, 2]]
    ids = torch.tensor([[9707, 11, 1879, 13, 151645]])
    out = model(input_ids=ids, labels=ids)
    vision = model.model.visual(pixels, grid_thw=grid)
    assert len(vision.deepstack_features) == len(model.model.visual.deepstack_merger_list) == 2
    touch = vision.pooler_output.sum() + sum(f.sum() for f in vision.deepstack_features)
    (out.loss + 0.0 * touch).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    if model_type == "qwen3_vl_moe":
        assert model.config.text_config.router_aux_loss_coef == 0.02
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


# -------------------------------------------------------------- processor config


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_vision_settings_read_the_checkpoint(tiny_dirs, model_type, tmp_path):
    family = family_for(model_type)
    settings = family.vision_settings(tiny_dirs[model_type])
    assert settings == family.vision_defaults
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_dirs[model_type])
    assert (settings.patch_size, settings.merge_size, settings.temporal_patch_size) == (
        image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size)
    assert (settings.min_pixels, settings.max_pixels) == (
        image_processor.size["shortest_edge"], image_processor.size["longest_edge"])
    assert list(settings.image_mean) == pytest.approx(image_processor.image_mean)
    assert list(settings.image_std) == pytest.approx(image_processor.image_std)
    if model_type in QWEN3:
        video = Qwen3VLVideoProcessor.from_pretrained(tiny_dirs[model_type])
        assert (settings.video_fps, settings.video_min_frames, settings.video_max_frames) == (
            video.fps, video.min_frames, video.max_frames)
        assert (settings.video_min_pixels, settings.video_max_pixels) == (
            video.size["shortest_edge"], video.size["longest_edge"])
        assert (settings.patch_size, settings.image_mean) == (16, (0.5, 0.5, 0.5))
    # A checkpoint with other limits: they win over the released defaults.
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs[model_type], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 1024, "longest_edge": 4096}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    changed = family.vision_settings(folder)
    assert (changed.min_pixels, changed.max_pixels, changed.patch_size) == (1024, 4096, settings.patch_size)


def test_dense_families_have_no_router_loss():
    config = AutoConfig.for_model("qwen3_vl")
    assert family_for("qwen3_vl").configure_router_aux_loss(config, 0.1) is False
    assert not hasattr(config.text_config, "router_aux_loss_coef")


def test_docstring_examples():
    for module in (qwenvl.models.qwen3_vl,):
        assert doctest.testmod(module).failed == 0
