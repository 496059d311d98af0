"""The InternVL (HF-native, ``-hf``) family (qwenvl/models/internvl.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``InternVLProcessor`` expansion (``INTERNVL.load_processor``: without torchvision the
  ``InternVLImageTextProcessor``, a subclass without its video part) of the tiny checkpoint, on chat messages
  written here by hand: ``processor(text=processor.apply_chat_template(messages), images=...)``;
- labels: the answers' character spans found with ``str.find`` in the rendered text expanded here by hand
  (``<img>`` + 4 ``<IMG_CONTEXT>`` per tile + ``</img>``, the tile counts worked out below from the image sizes),
  mapped to tokens by the tokenizer's offsets;
- loss: cross-entropy computed here from the model's full logits.

Tiles of the tiny processor (56 x 56 tiles, max_patches 4; GotOcr2's rule: the grid whose aspect ratio is
closest, ties to the larger grid while the image's area exceeds half the grid's): 320 x 240 (4:3), 224 x 224 and
400 x 300 -> a 2 x 2 grid + the thumbnail = 5 tiles; 64 x 64 (area 4096 < half of 2 x 2 tiles, 6272) -> 1 tile.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import FAMILIES, LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.internvl import INTERNVL_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, answer_spans, assert_data_module_refuses_flattening, assert_dummy_pass, assert_generates,
    assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy, assert_padded_rows_are_each_sample_alone,
    assert_training_is_refused, chat_cases, family_dataset, images_of, moved_parameters, oracle, run_training, sgd_args,
    touches, video_dataset, weightless_copy, write_records)

TILES = {"red_circle.jpg": 5, "blue_square.jpg": 5, "two_shapes.jpg": 5, "gray_square_l.png": 1}  # see above
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
TOKENS_PER_TILE = 4  # (56 / 14)^2 patches, pixel-shuffled 2 x 2
BOX = "<ref>the blue square</ref><box>[[531, 250, 844, 667]]</box>"  # InternVL's grounding, relative 0-1000

CASES = chat_cases(multi=("red_circle.jpg", "gray_square_l.png"), box=BOX)
NAMES = list(CASES)


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_internvl"), model_type="internvl", seed=0)


@pytest.fixture(scope="module")
def processor(internvl_dir):
    return FAMILIES["internvl"].load_processor(internvl_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("internvl_data") / "cases.json",
                         [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(internvl_dir, processor, data_file):
    return family_dataset(processor, data_file, family_for(AutoConfig.from_pretrained(internvl_dir)),
                          model_max_length=4096)


def test_the_tiny_checkpoint_loads_like_a_released_one(internvl_dir, processor):
    config = AutoConfig.from_pretrained(internvl_dir)
    assert config.model_type == "internvl" and config.vision_config.model_type == "internvl_vision"
    assert config.text_config.model_type == "qwen2" and config.downsample_ratio == 0.5
    assert (tuple(config.vision_config.image_size), tuple(config.vision_config.patch_size),
            config.image_seq_length) == ((56, 56), (14, 14), TOKENS_PER_TILE)
    expected = "InternVLProcessor" if HAS_TORCHVISION else "InternVLImageTextProcessor"
    assert isinstance(processor, InternVLProcessor) and type(processor).__name__ == expected
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)  # spawned DataLoader workers get it
    assert isinstance(processor.image_processor, GotOcr2ImageProcessorPil)  # no torchvision needed
    assert (processor.image_processor.max_patches, processor.image_seq_length) == (4, TOKENS_PER_TILE)
    assert processor.chat_template == INTERNVL_CHAT_TEMPLATE
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == processor.image_token_id
    assert (processor.start_image_token, processor.end_image_token) == ("<img>", "</img>")
    for token in ("<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>"):  # one token each, as released
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    model = AutoModelForImageTextToText.from_pretrained(internvl_dir)
    assert isinstance(model, InternVLForConditionalGeneration)
    rendered = processor.apply_chat_template(CASES["system_multi_turn_grounding"][1])
    assert rendered == ("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
                        "<|im_start|>user\n<IMG_CONTEXT>\nWhere is the blue square?<|im_end|>\n"
                        f"<|im_start|>assistant\n{BOX}<|im_end|>\n"
                        "<|im_start|>user\nAnd what colour is the other shape?<|im_end|>\n"
                        "<|im_start|>assistant\nRed.<|im_end|>\n")
    prompt = processor.apply_chat_template(CASES["text_only"][1][:1], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat colour is grass?<|im_end|>\n<|im_start|>assistant\n"  # no default system


def test_family_parameters_and_registry():
    family = family_for("internvl")
    assert family.model_class_name == "InternVLForConditionalGeneration" and family.uses_processor_items
    assert family.default_system_prompt is None and family.grounding_range == 1000
    assert family.grounding_scale(400, 300) == (0.4, 0.3)
    assert family.classify_parameter("model.multi_modal_projector.layer_norm.weight") == PROJECTOR
    assert family.classify_parameter("model.multi_modal_projector.linear_2.bias") == PROJECTOR
    assert family.classify_parameter("model.vision_tower.encoder.layer.0.attention.q_proj.weight") == VISION_TOWER
    assert family.classify_parameter("model.vision_tower.embeddings.patch_embeddings.projection.weight") == VISION_TOWER
    assert family.classify_parameter("model.language_model.layers.0.self_attn.q_proj.weight") == LLM
    assert family.classify_parameter("lm_head.weight") == LLM
    from qwenvl.train.trainer import classify_parameter  # the union over every family (LoRA targets, lr groups)
    assert classify_parameter("model.vision_tower.encoder.layer.0.attention.q_proj.weight") == VISION_TOWER
    assert classify_parameter("model.multi_modal_projector.layer_norm.weight") == PROJECTOR


def test_lora_targets_the_llm_only(internvl_dir):
    """The tower has q_proj / k_proj / v_proj too: LoRA's default targets must skip it and the projector."""
    import re

    from qwenvl.train.lora import lora_target_regex

    model = InternVLForConditionalGeneration.from_pretrained(internvl_dir)
    regex = lora_target_regex(model)
    targets = {name for name, _ in model.named_modules() if re.fullmatch(regex, name)}
    expected = {f"model.language_model.layers.{layer}.{block}.{leaf}" for layer in (0, 1)
                for block, leaves in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      ("mlp", ("gate_proj", "up_proj", "down_proj"))) for leaf in leaves}
    assert targets == expected


def test_the_remote_code_internvl2_is_refused_naming_the_hf_checkpoints():
    """(tests/train/test_preflight.py: the same refusal at start-up, before any weight loads.)"""
    from qwenvl.models.loading import CheckpointError, check_model_type

    assert "internvl" in FAMILIES
    with pytest.raises(CheckpointError, match=r"InternVL2/2\.5's remote code \(InternVLChatModel\) is not supported\. "
                                              r"The HF-native InternVL checkpoints are the `\*-hf` ones, e\.g\. "
                                              r"OpenGVLab/InternVL3-2B-hf \(model_type internvl, loaded without "
                                              r"trust_remote_code\); use one of them"):
        check_model_type({"model_type": "internvl_chat",
                          "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}})


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(dataset, processor, name):
    item = dataset[NAMES.index(name)]
    _, expected = oracle(processor, CASES[name])
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    tiles = sum(TILES[f] for f in CASES[name][2])
    if tiles:
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert item["pixel_values"].shape == (tiles, 3, 56, 56)
        assert int((item["input_ids"] == processor.image_token_id).sum()) == TOKENS_PER_TILE * tiles
    else:
        assert "pixel_values" not in item and "pixel_values" not in expected
    assert "num_patches" not in item  # the processor folds the tiles of every image into pixel_values


def hand_expanded(text, name):
    """The rendered text with each <IMG_CONTEXT> written out as the processor writes it, by the tile counts above."""
    pieces = text.split("<IMG_CONTEXT>")
    blocks = [f"<img>{'<IMG_CONTEXT>' * TOKENS_PER_TILE * TILES[f]}</img>" for f in CASES[name][2]]
    assert len(pieces) == len(blocks) + 1
    return "".join(piece + block for piece, block in zip(pieces, [*blocks, ""]))


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_end_of_turn(dataset, processor, name):
    text, expected = oracle(processor, CASES[name])
    expanded = hand_expanded(text, name)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    assert eos == "<|im_end|>"
    spans = answer_spans(expanded, CASES[name][1], eos)
    plain = tokenizer(expanded, return_offsets_mapping=True)
    assert plain["input_ids"] == expected["input_ids"][0].tolist()
    learned = [touches(spans, start, end) for start, end in plain["offset_mapping"]]
    labels = dataset[NAMES.index(name)]["labels"]
    assert labels.tolist() == [t if learn else IGNORE for t, learn in zip(plain["input_ids"], learned)]
    assert_learned_text(tokenizer, labels, CASES[name][1], eos)


def test_a_collated_batch_is_what_the_processor_builds_for_both_samples_in_one_call(dataset, processor):
    names = ["multi_image", "single_image"]
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("internvl"))(
        [dataset[NAMES.index(n)] for n in names])
    expected = processor(text=[processor.apply_chat_template(CASES[n][1]) for n in names],
                         images=[image for n in names for image in images_of(CASES[n][2])], padding=True,
                         padding_side="right", return_tensors="pt")
    assert batch["pixel_values"].shape == (TILES["red_circle.jpg"] * 2 + TILES["gray_square_l.png"], 3, 56, 56)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(batch[key], expected[key]), key


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, internvl_dir, processor):
    model = InternVLForConditionalGeneration.from_pretrained(internvl_dir).eval()
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (10, 3, 56, 56) and batch["input_ids"].shape[0] == 3
    assert_loss_is_cross_entropy(model, batch)


def test_padding_changes_no_sample_s_loss_under_the_training_attention(dataset, internvl_dir):
    """``sdpa_packed`` (training's default) on a padded batch: each row's logits are its own sample's alone."""
    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed)

    model = InternVLForConditionalGeneration.from_pretrained(internvl_dir, attn_implementation="sdpa_packed").eval()
    assert_padded_rows_are_each_sample_alone(model, [dataset[1], dataset[2], dataset[3]], ProcessorDataCollator(0))


def test_a_cut_at_model_max_length_never_splits_an_image_block(processor, data_file):
    _, expected = oracle(processor, CASES["single_image"])
    block_end = expected["input_ids"][0].tolist().index(processor.tokenizer.convert_tokens_to_ids("</img>"))
    ds = family_dataset(processor, data_file, family_for("internvl"), model_max_length=block_end)
    with pytest.raises(ValueError, match=rf"cases.json:0: over-length: {len(expected['input_ids'][0])} tokens > "
                                         rf"model_max_length {block_end} and the cut would split a vision block "
                                         rf"\(last vision token at {block_end}\)"):
        ds[0]


def test_the_start_up_checks_read_the_height_width_patch_size(internvl_dir):
    from qwenvl.train.preflight import vision_factor

    config = json.loads((internvl_dir / "config.json").read_text())
    assert config["vision_config"]["patch_size"] == [14, 14]  # as the released InternVL3-*-hf configs
    assert vision_factor(str(internvl_dir), config) == 28  # 14 x the default merge (2 x 2 pixel shuffle)


def test_a_video_is_refused_with_file_and_index(processor, tmp_path):
    ds = video_dataset(processor, family_for("internvl"), tmp_path)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the internvl family takes images only: "
                                         r"video training is not supported yet \(its video processor needs "
                                         r"torchvision, an optional GPU extra\)"):
        ds[0]
    if not HAS_TORCHVISION:
        with pytest.raises(ValueError, match="InternVLImageTextProcessor takes images and text only, but found videos: "
                                             "InternVLProcessor's video processor needs torchvision, which is not "
                                             "installed"):
            processor(text="<video>\nWhat happens?", videos=[np.zeros((2, 56, 56, 3), dtype=np.uint8)])


def saved_as_released(folder: Path) -> None:
    """The folder names the released processor class, as InternVL3-*-hf does, and keeps the video settings."""
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "InternVLProcessor"
    assert json.loads((folder / "tokenizer_config.json").read_text())["processor_class"] == "InternVLProcessor"
    assert processor_config["video_processor"] == {
        "video_processor_type": "InternVLVideoProcessor", "size": {"height": 56, "width": 56},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def test_the_tiny_checkpoint_names_the_released_processor_class(internvl_dir):
    saved_as_released(internvl_dir)


def test_a_released_layout_loads_and_saves_as_it_came(internvl_dir, processor, tmp_path):
    """A folder laid out as OpenGVLab/InternVL3-*-hf is (image and video processor settings in their own files,
    ``processor_class`` InternVLProcessor): ``load_processor`` loads it (without torchvision too) and a save keeps
    the released class and the video settings."""
    released = weightless_copy(internvl_dir, tmp_path / "released")
    nested = json.loads((released / "processor_config.json").read_text())
    (released / "preprocessor_config.json").write_text(json.dumps(nested.pop("image_processor")))
    (released / "video_preprocessor_config.json").write_text(json.dumps(nested.pop("video_processor")))
    (released / "processor_config.json").write_text(json.dumps(nested))
    assert set(nested) == {"image_seq_length", "processor_class"}
    loaded = FAMILIES["internvl"].load_processor(released)
    assert type(loaded) is type(processor) and loaded.to_dict() == processor.to_dict()
    loaded.save_pretrained(tmp_path / "saved")
    saved_as_released(tmp_path / "saved")


@pytest.mark.skipif(HAS_TORCHVISION, reason="plain AutoProcessor builds InternVLProcessor where torchvision is")
def test_without_torchvision_plain_auto_processor_fails_and_load_processor_does_not(internvl_dir):
    with pytest.raises(ImportError, match="InternVLVideoProcessor requires the Torchvision library"):
        AutoProcessor.from_pretrained(internvl_dir)  # the reason for INTERNVL.load_processor's fallback


def test_flattening_is_refused_by_the_data_module(processor):
    assert_data_module_refuses_flattening(processor, family_for("internvl"),
                                          "not supported for the internvl family: its model computes 1-D positions")


@pytest.fixture(scope="module")
def weightless(internvl_dir, tmp_path_factory):
    return weightless_copy(internvl_dir, tmp_path_factory.mktemp("internvl_weightless"))


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the internvl family "
                                 r"\(InternVLForConditionalGeneration\): its model computes 1-D positions"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the internvl family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(weightless, tmp_path, extra, message):
    assert_training_is_refused(weightless, tmp_path / "out", extra, message)


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(dataset, internvl_dir, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector as a rank of a larger run would."""
    model = InternVLForConditionalGeneration.from_pretrained(internvl_dir)
    features = family_for("internvl").dummy_vision_features(model)
    assert [tuple(f.shape) for f in features] == [(TOKENS_PER_TILE, 64)]  # one tile, LLM width
    collate = ProcessorDataCollator(0)
    # text only: one dummy; an image: its own pass only
    assert_dummy_pass(model, family_for("internvl"), tmp_path, model.model.vision_tower,
                      [(collate([dataset[2]]), [1]), (collate([dataset[0]]), [1])])


@pytest.fixture(scope="module")
def ddp_run(internvl_dir, tmp_path_factory):
    """4 SGD steps on the demo images + text-only data, 2 DDP ranks (gloo) x 1 sample."""
    out = tmp_path_factory.mktemp("internvl_run") / "two"
    run_training(sgd_args(internvl_dir, out, max_steps=4, batch_size=1), ranks=2)
    return out


def test_two_ddp_ranks_train_the_llm_and_projector(ddp_run, internvl_dir):
    moved = moved_parameters(ddp_run, internvl_dir)
    assert {family_for("internvl").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}  # tower frozen
    assert_logged_steps(ddp_run, 4)


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(ddp_run):
    saved_as_released(ddp_run)
    model = AutoModelForImageTextToText.from_pretrained(ddp_run)
    processor = FAMILIES["internvl"].load_processor(ddp_run)  # AutoProcessor where torchvision is
    assert isinstance(model, InternVLForConditionalGeneration) and isinstance(processor, InternVLProcessor)
    assert processor.chat_template == INTERNVL_CHAT_TEMPLATE
    inputs = assert_generates(model, processor)
    assert inputs["pixel_values"].shape == (TILES["red_circle.jpg"], 3, 56, 56)


def test_the_saved_folder_loads_with_plain_auto_processor(ddp_run):
    pytest.importorskip("torchvision")
    processor = AutoProcessor.from_pretrained(ddp_run)
    assert type(processor) is InternVLProcessor and processor.chat_template == INTERNVL_CHAT_TEMPLATE
