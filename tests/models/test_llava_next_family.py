"""The LLaVA-NeXT family (an HF-processor family with anyres tiles: qwenvl/models/llava_next.py).

Oracles, none of them the code under test:
- items: transformers' ``LlavaNextProcessor`` of the tiny checkpoint, on chat messages written here by hand:
  ``processor(text=processor.apply_chat_template(messages), images=...)``; a batch of two items: the same
  processor called once on both texts (it pads the tiles of the call);
- labels: the answers' character spans found in that rendered text with ``str.find``, mapped to tokens by the
  tokenizer's offsets, each ``<image>`` then repeated as often as the processor's output has it in that run;
- loss: cross-entropy computed here from the model's full logits;
- training: 2 DDP ranks x 1 sample equal 1 process x 2 samples (weights within 1e-5, fp32).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.llava_next import LLAVA_NEXT_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, answer_spans, assert_data_module_refuses_flattening, assert_dummy_pass, assert_generates,
    assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy, assert_training_is_refused, chat_cases,
    family_dataset, image_runs, images_of, moved_parameters, oracle, run_training, sgd_args, touches, video_dataset,
    weightless_copy, write_records)

# Tiles of the tiny checkpoint (112-pixel tiles, pinpoints 112 x 224 ... 112 x 336): a 100 x 400 image -> 1 + 3
# on a 336 x 112 grid; 320 x 240 -> 1 + 4 (224 x 224); 64 x 64 -> 1 + 2 (112 x 224), zero-padded to 5 in its call.
CASES = chat_cases(single=("green_bar_tall.jpg", "A green bar."), multi=("red_circle.jpg", "gray_square_l.png"))
NAMES = list(CASES)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llava_next"), model_type="llava_next", seed=0)


@pytest.fixture(scope="module")
def processor(next_dir):
    return AutoProcessor.from_pretrained(next_dir)


@pytest.fixture(scope="module")
def model(next_dir):
    return LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("llava_next_data") / "cases.json",
                         [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(next_dir, processor, data_file):
    return family_dataset(processor, data_file, family_for(AutoConfig.from_pretrained(next_dir)),
                          model_max_length=8192)


@pytest.fixture(scope="module")
def items(dataset):
    return {name: dataset[NAMES.index(name)] for name in NAMES}


def test_the_tiny_checkpoint_loads_like_a_released_one(next_dir, processor):
    config = AutoConfig.from_pretrained(next_dir)
    assert config.model_type == "llava_next" and config.vision_config.model_type == "clip_vision_model"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (112, 14)  # the released / 3
    assert config.image_grid_pinpoints == [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
    assert isinstance(processor, LlavaNextProcessor)
    assert isinstance(processor.image_processor, LlavaNextImageProcessorPil)  # no torchvision needed
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert processor.chat_template == LLAVA_NEXT_CHAT_TEMPLATE
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert isinstance(AutoModelForImageTextToText.from_pretrained(next_dir), LlavaNextForConditionalGeneration)
    eos = processor.tokenizer.eos_token
    assert processor.apply_chat_template(CASES["system_multi_turn_grounding"][1]) == (
        "<<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\n[INST] <image>\nWhere is the blue square? [/INST] "
        f"[0.531, 0.250, 0.844, 0.667]{eos} [INST] And what colour is the other shape? [/INST] Red.{eos} ")


def test_family_parameters_and_registry():
    family = family_for("llava_next")
    assert family.model_class_name == "LlavaNextForConditionalGeneration" and family.uses_processor_items
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
    _, expected = oracle(processor, CASES[name])
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    if not CASES[name][2]:
        assert "pixel_values" not in item and "pixel_values" not in expected and "image_sizes" not in item
        return
    assert torch.equal(item["pixel_values"], expected["pixel_values"])
    assert torch.equal(item["image_sizes"], expected["image_sizes"])
    sizes = [im.size[::-1] for im in images_of(CASES[name][2])]  # (height, width) of the originals
    assert item["image_sizes"].tolist() == [list(s) for s in sizes]
    tiles = {"single_image": 4, "multi_image": 5, "system_multi_turn_grounding": 5}[name]
    assert item["pixel_values"].shape == (len(sizes), tiles, 3, 112, 112)


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_eos(items, processor, name):
    text, encoded = oracle(processor, CASES[name])
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    spans = answer_spans(text, CASES[name][1], eos)
    plain = tokenizer(text, return_offsets_mapping=True)
    learned = [touches(spans, start, end) for start, end in plain["offset_mapping"]]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    runs = iter(image_runs(encoded["input_ids"][0], image_id))  # one run per image, its length per image size
    expected = []
    for token, learn in zip(plain["input_ids"], learned):
        expected.extend([IGNORE] * next(runs) if token == image_id else [token if learn else IGNORE])
    labels = items[name]["labels"]
    assert labels.tolist() == expected
    assert_learned_text(tokenizer, labels, CASES[name][1], eos, lead=" ")


# The released llava-hf/llava-v1.6-mistral-7b-hf template's answer part: `' ' + answer + '<\\s> '` (a typo for </s>).
RELEASED_ANSWER = "{{ ' ' + message['content'][0]['text'] + '<\\\\s> ' }}"


def test_a_literal_backslash_s_closing_answers_is_learned_as_the_eos(next_dir, data_file, items, tmp_path):
    """A checkpoint whose template closes answers with the released ``<\\s> `` trains exactly as one whose template
    writes the eos: the same ids and labels, no ``<\\s>`` text learned (and no eos inserted after it)."""
    template = LLAVA_NEXT_CHAT_TEMPLATE.replace(
        "{{ ' ' }}{% generation %}{{ message['content'][0]['text'] + eos_token }}{% endgeneration %}{{ ' ' }}",
        RELEASED_ANSWER)
    assert template != LLAVA_NEXT_CHAT_TEMPLATE
    folder = weightless_copy(next_dir, tmp_path / "released_template")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.apply_chat_template(CASES["system_multi_turn_grounding"][1]) == (
        "<<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\n[INST] <image>\nWhere is the blue square? [/INST] "
        "[0.531, 0.250, 0.844, 0.667]<\\s> [INST] And what colour is the other shape? [/INST] Red.<\\s> ")
    family = family_for("llava_next")
    dataset = family_dataset(processor, data_file, family, model_max_length=8192)
    eos = processor.tokenizer.eos_token
    for index, name in enumerate(NAMES):
        item = dataset[index]
        for key in ("input_ids", "labels", "pixel_values", "image_sizes"):
            assert (key in item) == (key in items[name]), (name, key)
            assert key not in item or torch.equal(item[key], items[name][key]), (name, key)
        text = processor.tokenizer.decode(item["input_ids"])
        assert "<\\s>" not in text and text.count(eos) == sum(m["role"] == "assistant" for m in CASES[name][1])
    user_text = [{"role": "user", "content": [{"type": "text", "text": "Is <\\s> a tag?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    rendered = processor.apply_chat_template(user_text)
    fixed, spans = family.fix_rendered(rendered, [(rendered.index(" No."), len(rendered))], eos)
    assert fixed == f"[INST] Is <\\s> a tag? [/INST] No.{eos} "  # only the answer's closing <\\s> is the eos
    assert fixed[spans[0][0]:spans[0][1]] == f" No.{eos} "
    from tools.infer import prompt_text  # inference closes earlier answers as training does

    assert prompt_text(processor, CASES["system_multi_turn_grounding"][1][:-1], eos, family) == (
        "<<SYS>>\nYou are a careful assistant.\n<</SYS>>\n\n[INST] <image>\nWhere is the blue square? [/INST] "
        f"[0.531, 0.250, 0.844, 0.667]{eos} [INST] And what colour is the other shape? [/INST]")


def test_the_loss_equals_cross_entropy_of_the_full_logits(items, model, processor):
    collate = ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("llava_next"))
    batch = collate([items["single_image"], items["text_only"], items["multi_image"]])
    assert batch["pixel_values"].shape == (3, 5, 3, 112, 112) and batch["input_ids"].shape[0] == 3
    assert not batch["pixel_values"][0, 4:].any() and batch["pixel_values"][0, 3].any()  # 4 tiles, 1 zero tile
    assert_loss_is_cross_entropy(model, batch)


def test_a_batch_of_two_items_is_the_processor_s_batch_of_two(items, model, processor):
    """The collator pads tiles across items exactly as one processor call pads them across its images."""
    names = ("single_image", "multi_image")  # 4 tiles; 5 and 3 tiles
    texts = [processor.apply_chat_template(CASES[name][1]) for name in names]
    images = [im for name in names for im in images_of(CASES[name][2])]
    expected = processor(text=texts, images=images, padding=True, return_tensors="pt")
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("llava_next"))(
        [items[name] for name in names])
    assert batch["pixel_values"].shape == (3, 5, 3, 112, 112)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])  # zero tiles alike
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    assert processor.tokenizer.padding_side == "right"
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = model(**{**expected, "labels": batch["labels"]}).loss
    assert torch.equal(ours, theirs)


def test_a_video_is_refused_with_file_and_index(processor, tmp_path):
    ds = video_dataset(processor, family_for("llava_next"), tmp_path, bad_sample_policy="skip")
    problem = ds[0]
    assert (problem.kind, problem.index) == ("unsupported_media", 0)
    assert problem.reason == "1 video(s), but the llava_next family takes images only"


def test_flattening_is_refused_by_the_data_module(processor):
    assert_data_module_refuses_flattening(processor, family_for("llava_next"),
                                          "not supported for the llava_next family: its model computes 1-D positions")


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the llava_next family "
                                 r"\(LlavaNextForConditionalGeneration\): its model computes 1-D positions"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the llava_next family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(next_dir, tmp_path, extra, message):
    assert_training_is_refused(weightless_copy(next_dir, tmp_path / "weightless"), tmp_path / "out", extra, message)


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(items, next_dir, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector (tiled) as a rank of a larger run."""
    model = LlavaNextForConditionalGeneration.from_pretrained(next_dir)
    collate = ProcessorDataCollator(0, family_for("llava_next"))
    # the tiles of each tower call: a dummy 112 x 112 gets 1 + 2 tiles
    projector = assert_dummy_pass(model, family_for("llava_next"), tmp_path, model.model.vision_tower,
                                  [(collate([items["text_only"]]), [3]), (collate([items["single_image"]]), [4])],
                                  seen=lambda args: len(args[0]))
    assert "model.image_newline" in projector


@pytest.fixture(scope="module")
def runs(next_dir, tmp_path_factory):
    """10 SGD steps on the demo images + text-only data: 1 process x 2 samples, and 2 DDP ranks x 1 sample."""
    out = tmp_path_factory.mktemp("llava_next_runs")
    run_training(sgd_args(next_dir, out / "one", max_steps=10, batch_size=2, model_max_length=8192), ranks=1)
    run_training(sgd_args(next_dir, out / "two", max_steps=10, batch_size=1, model_max_length=8192), ranks=2)
    return out


def test_two_ddp_ranks_train_the_same_weights_as_one_process(runs, next_dir):
    from safetensors.torch import load_file

    one, two = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    moved = moved_parameters(runs / "one", next_dir)  # the same names as the start's
    assert "image_newline" in moved  # saved names: the released layout
    assert {family_for("llava_next").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}
    for run in ("one", "two"):
        assert_logged_steps(runs / run, 10)


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(runs):
    model = AutoModelForImageTextToText.from_pretrained(runs / "one")
    processor = AutoProcessor.from_pretrained(runs / "one")
    assert isinstance(model, LlavaNextForConditionalGeneration) and isinstance(processor, LlavaNextProcessor)
    assert processor.chat_template == LLAVA_NEXT_CHAT_TEMPLATE
    inputs = assert_generates(model, processor, image="green_triangle.jpg")
    assert inputs["pixel_values"].shape == (1, 5, 3, 112, 112)
