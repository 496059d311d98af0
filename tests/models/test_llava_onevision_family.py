"""The LLaVA-OneVision family (an HF-processor family with anyres_max_9 tiles: qwenvl/models/llava_onevision.py).

Oracles, none of them the code under test:
- items: transformers' ``LlavaOnevisionProcessor`` (``LLAVA_ONEVISION.load_processor``: without torchvision a
  subclass without its video processor) of the tiny checkpoint, on chat messages written here by hand, one
  sample's images nested as OneVision's processor takes them:
  ``processor(text=processor.apply_chat_template(messages), images=[images])``; a batch of two items: the same
  processor called once on both samples;
- labels: the answers' character spans found in that rendered text with ``str.find``, mapped to tokens by the
  tokenizer's offsets, each ``<image>`` then repeated as often as the processor's output has it in that run;
- loss: cross-entropy computed here from the model's full logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import FAMILIES, LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.llava_onevision import LLAVA_ONEVISION_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, answer_spans, assert_data_module_refuses_flattening, assert_dummy_pass, assert_generates,
    assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy, assert_training_is_refused, chat_cases,
    family_dataset, image_runs, images_of, moved_parameters, oracle, run_training, sgd_args, touches, video_dataset,
    weightless_copy, write_records)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# Tiles of the tiny checkpoint (112-pixel tiles, pinpoints 112 x 112 ... 672 x 672): a lone 320 x 240 image -> 1 + 9
# (336 x 336); a lone 400 x 300 one -> 1 + 12 (336 x 448), whose 24 x 32 features exceed 9 tiles' worth and are
# shrunk; each image of a multi-image sample -> 1 tile, zero-padded to the most tiles of its call.
CASES = chat_cases(multi=("red_circle.jpg", "green_bar_tall.jpg"))
NAMES = list(CASES)


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llava_onevision"), model_type="llava_onevision", seed=0)


@pytest.fixture(scope="module")
def processor(ov_dir):
    return FAMILIES["llava_onevision"].load_processor(ov_dir)


@pytest.fixture(scope="module")
def model(ov_dir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir).eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("llava_onevision_data") / "cases.json",
                         [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(ov_dir, processor, data_file):
    return family_dataset(processor, data_file, family_for(AutoConfig.from_pretrained(ov_dir)),
                          model_max_length=8192)


@pytest.fixture(scope="module")
def items(dataset):
    return {name: dataset[NAMES.index(name)] for name in NAMES}


def test_the_tiny_checkpoint_loads_like_a_released_one(ov_dir, processor):
    config = AutoConfig.from_pretrained(ov_dir)
    assert config.model_type == "llava_onevision" and config.vision_config.model_type == "siglip_vision_model"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (112, 14)
    assert not config.vision_config.vision_use_head  # as released: no pooling head (it would train nothing)
    assert (config.vision_aspect_ratio, config.vision_feature_select_strategy) == ("anyres_max_9", "full")
    assert config.image_grid_pinpoints == [[112 * i, 112 * j] for i in range(1, 7) for j in range(1, 7)]
    assert isinstance(processor, LlavaOnevisionProcessor)
    if not HAS_TORCHVISION:
        assert type(processor).__name__ == "LlavaOnevisionImageTextProcessor"
        assert not hasattr(processor, "video_processor")
    assert isinstance(processor.image_processor, LlavaOnevisionImageProcessorPil)  # no torchvision needed
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert (processor.num_image_tokens, processor.vision_aspect_ratio) == (64, "anyres_max_9")
    assert processor.chat_template == LLAVA_ONEVISION_CHAT_TEMPLATE
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<video>") == processor.video_token_id
    assert isinstance(AutoModelForImageTextToText.from_pretrained(ov_dir), LlavaOnevisionForConditionalGeneration)
    messages = CASES["system_multi_turn_grounding"][1]
    assert processor.apply_chat_template(messages) == (
        "<|im_start|>system \nYou are a careful assistant.<|im_end|><|im_start|>user <image>\nWhere is the blue "
        "square?<|im_end|><|im_start|>assistant \n[0.531, 0.250, 0.844, 0.667]<|im_end|><|im_start|>user \nAnd what "
        "colour is the other shape?<|im_end|><|im_start|>assistant \nRed.<|im_end|>")
    # the released quirk: an answer turn opens "assistant \n", the generation prompt "assistant\n"
    assert processor.apply_chat_template(messages[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user <image>\nWhere is the blue square?<|im_end|><|im_start|>assistant\n")


def test_family_parameters_and_registry():
    family = family_for("llava_onevision")
    assert family.model_class_name == "LlavaOnevisionForConditionalGeneration" and family.uses_processor_items
    assert family.grounding_frame() == "relative 0-1 of the image"
    assert family.classify_parameter("model.multi_modal_projector.linear_2.bias") == PROJECTOR
    assert family.classify_parameter("model.image_newline") == PROJECTOR  # trains with the projector
    assert family.classify_parameter("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == VISION_TOWER
    assert family.classify_parameter("model.language_model.layers.0.self_attn.q_proj.weight") == LLM
    assert family.classify_parameter("lm_head.weight") == LLM
    from qwenvl.train.trainer import classify_parameter  # the union over every family

    assert classify_parameter("model.image_newline") == PROJECTOR


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(items, processor, name):
    item = items[name]
    _, expected = oracle(processor, CASES[name], nested=True)
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    if not CASES[name][2]:
        assert "pixel_values" not in item and "pixel_values" not in expected and "image_sizes" not in item
        return
    assert torch.equal(item["pixel_values"], expected["pixel_values"])
    assert torch.equal(item["image_sizes"], expected["image_sizes"])
    assert item["batch_num_images"].tolist() == expected["batch_num_images"].tolist() == [len(CASES[name][2])]
    sizes = [im.size[::-1] for im in images_of(CASES[name][2])]  # (height, width) of the originals
    assert item["image_sizes"].tolist() == [list(s) for s in sizes]
    tiles = {"single_image": 10, "multi_image": 1, "system_multi_turn_grounding": 13}[name]
    assert item["pixel_values"].shape == (len(sizes), tiles, 3, 112, 112)


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_eos(items, processor, name):
    text, encoded = oracle(processor, CASES[name], nested=True)
    tokenizer = processor.tokenizer
    eos = "<|im_end|>"  # what closes every turn
    spans = answer_spans(text, CASES[name][1], eos)
    plain = tokenizer(text, return_offsets_mapping=True)
    learned = [touches(spans, start, end) for start, end in plain["offset_mapping"]]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    runs = image_runs(encoded["input_ids"][0], image_id)  # a lone image: its length depends on its size
    if name == "multi_image":  # "<image><image>": one run; each image one tile, 8 x 8 features + 1 newline
        assert runs == [2 * ((112 // 14) ** 2 + 1)]
        runs = [(112 // 14) ** 2 + 1] * 2
    runs = iter(runs)
    expected = []
    for token, learn in zip(plain["input_ids"], learned):
        expected.extend([IGNORE] * next(runs) if token == image_id else [token if learn else IGNORE])
    labels = items[name]["labels"]
    assert labels.tolist() == expected
    assert_learned_text(tokenizer, labels, CASES[name][1], eos)


def test_the_loss_equals_cross_entropy_of_the_full_logits(items, model, processor):
    collate = ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("llava_onevision"))
    batch = collate([items["single_image"], items["text_only"], items["multi_image"]])
    assert batch["pixel_values"].shape == (3, 10, 3, 112, 112) and batch["input_ids"].shape[0] == 3
    assert batch["pixel_values"][0, 9].any() and not batch["pixel_values"][1:, 1:].any()  # 10 tiles; 1 each, padded
    assert batch["batch_num_images"].tolist() == [1, 2] and batch["image_sizes"].shape == (3, 2)
    assert_loss_is_cross_entropy(model, batch)


def test_a_batch_of_two_items_is_the_processor_s_batch_of_two(items, model, processor):
    """The collator pads tiles across items exactly as one processor call pads them across its images."""
    names = ("single_image", "multi_image")  # 10 tiles; 1 tile per image
    texts = [processor.apply_chat_template(CASES[name][1]) for name in names]
    expected = processor(text=texts, images=[images_of(CASES[name][2]) for name in names], padding=True,
                         return_tensors="pt")
    assert expected["batch_num_images"].tolist() == [1, 2]
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("llava_onevision"))(
        [items[name] for name in names])
    assert batch["pixel_values"].shape == (3, 10, 3, 112, 112)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])  # zero tiles alike
    assert torch.equal(batch["batch_num_images"], expected["batch_num_images"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    assert processor.tokenizer.padding_side == "right"
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = model(**{**expected, "labels": batch["labels"]}).loss
    assert torch.equal(ours, theirs)


def test_a_video_is_refused_with_file_and_index(processor, tmp_path):
    ds = video_dataset(processor, family_for("llava_onevision"), tmp_path, bad_sample_policy="skip")
    problem = ds[0]
    assert (problem.kind, problem.index) == ("unsupported_media", 0)
    assert problem.reason == ("1 video(s), but the llava_onevision family takes images only: video training is "
                              "not supported yet (its video processor needs torchvision, an optional GPU extra)")
    if not HAS_TORCHVISION:
        with pytest.raises(ValueError, match="LlavaOnevisionImageTextProcessor takes images and text only, but found "
                                             "videos: LlavaOnevisionProcessor's video processor needs torchvision"):
            processor(text="<video>\nWhat happens?", videos=[np.zeros((2, 112, 112, 3), dtype=np.uint8)])


def saved_as_released(folder: Path) -> None:
    """The folder names the released processor class, as llava-onevision-*-hf does, and keeps video settings that
    the released video processor class takes (it instantiates here from its module, without torchvision)."""
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor"
    assert json.loads((folder / "tokenizer_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    video = dict(processor_config["video_processor"])
    assert video.pop("video_processor_type") == "LlavaOnevisionVideoProcessor"
    assert LlavaOnevisionVideoProcessor(**video).size == {"height": 112, "width": 112}


def test_the_tiny_checkpoint_names_the_released_processor_class(ov_dir):
    saved_as_released(ov_dir)


@pytest.mark.skipif(HAS_TORCHVISION, reason="plain AutoProcessor builds LlavaOnevisionProcessor where torchvision is")
def test_without_torchvision_plain_auto_processor_fails(ov_dir):
    with pytest.raises(ImportError, match="LlavaOnevisionVideoProcessor requires the Torchvision library"):
        AutoProcessor.from_pretrained(ov_dir)  # the reason for LLAVA_ONEVISION.load_processor's fallback


def test_a_template_whose_answer_turn_lacks_the_answer_text_gives_a_counted_bad_sample(ov_dir, data_file, tmp_path):
    """The released template opens answer turns otherwise than its generation prompt, so answers are found by their
    text in the turn; a template that does not write that text gives a counted bad sample, never wrong labels."""
    folder = weightless_copy(ov_dir, tmp_path / "upper_template")
    template = LLAVA_ONEVISION_CHAT_TEMPLATE.replace("{{ '\n' + content['text'] }}{% endgeneration %}",
                                                     "{{ '\n' + content['text'] | upper }}{% endgeneration %}")
    assert template != LLAVA_ONEVISION_CHAT_TEMPLATE
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    processor = FAMILIES["llava_onevision"].load_processor(folder)
    ds = family_dataset(processor, data_file, family_for("llava_onevision"), bad_sample_policy="skip")
    problem = ds[NAMES.index("text_only")]
    assert (problem.kind, problem.index) == ("tag_mismatch", NAMES.index("text_only"))
    assert problem.reason == ("the chat template renders the start of a conversation differently from the whole "
                              "conversation; answer spans cannot be found")


def test_flattening_is_refused_by_the_data_module(processor):
    message = "not supported for the llava_onevision family: its model computes 1-D positions"
    assert_data_module_refuses_flattening(processor, family_for("llava_onevision"), message)


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the llava_onevision family "
                                 r"\(LlavaOnevisionForConditionalGeneration\): its model computes 1-D positions"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the llava_onevision family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(ov_dir, tmp_path, extra, message):
    assert_training_is_refused(weightless_copy(ov_dir, tmp_path / "weightless"), tmp_path / "out", extra, message)


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(items, ov_dir, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector (tiled) as a rank of a larger run."""
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir)
    collate = ProcessorDataCollator(0, family_for("llava_onevision"))
    # the tiles of each tower call: a dummy 112 x 112 gets 1 + 1 tile
    projector = assert_dummy_pass(model, family_for("llava_onevision"), tmp_path, model.model.vision_tower,
                                  [(collate([items["text_only"]]), [2]), (collate([items["single_image"]]), [10])],
                                  seen=lambda args: len(args[0]))
    assert "model.image_newline" in projector


@pytest.fixture(scope="module")
def run(ov_dir, tmp_path_factory):
    """4 SGD steps on the demo images + text-only data under 2 DDP ranks (gloo) x 1 sample, saved."""
    out = tmp_path_factory.mktemp("llava_onevision_run") / "two"
    run_training(sgd_args(ov_dir, out, max_steps=4, batch_size=1, model_max_length=8192), ranks=2)
    return out


def test_two_ddp_ranks_train_4_steps(run, ov_dir):
    moved = moved_parameters(run, ov_dir)
    assert "image_newline" in moved  # saved names: the released layout
    assert {family_for("llava_onevision").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}
    assert_logged_steps(run, 4)


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(run):
    saved_as_released(run)
    model = AutoModelForImageTextToText.from_pretrained(run)
    processor = FAMILIES["llava_onevision"].load_processor(run)  # AutoProcessor where torchvision is
    assert isinstance(model, LlavaOnevisionForConditionalGeneration) and isinstance(processor, LlavaOnevisionProcessor)
    assert processor.chat_template == LLAVA_ONEVISION_CHAT_TEMPLATE
    inputs = assert_generates(model, processor, image="green_triangle.jpg", nested=True)
    assert inputs["pixel_values"].shape == (1, 31, 3, 112, 112)  # 1 + 5 x 6 tiles, features shrunk to 9 tiles'


def test_the_saved_folder_loads_with_plain_auto_processor(run):
    pytest.importorskip("torchvision")
    processor = AutoProcessor.from_pretrained(run)
    assert type(processor) is LlavaOnevisionProcessor and processor.chat_template == LLAVA_ONEVISION_CHAT_TEMPLATE
