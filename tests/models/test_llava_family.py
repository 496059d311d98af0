"""The LLaVA-1.5 family (an HF-processor family: qwenvl/models/hf_family.py, llava.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``LlavaProcessor`` of the tiny checkpoint, on chat messages written here by hand:
  ``processor(text=processor.apply_chat_template(messages), images=...)``;
- labels: the answers' character spans found in that rendered text with ``str.find``, mapped to tokens by the
  tokenizer's offsets, each ``<image>`` then repeated ``image_seq_length`` times (from the config);
- loss: cross-entropy computed here from the model's full logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor

from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.llava import LLAVA_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, IMAGES, answer_spans, assert_an_all_bad_batch_has_a_zero_loss, assert_data_module_refuses_flattening,
    assert_dummy_pass, assert_generates, assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy,
    assert_padded_rows_are_each_sample_alone, assert_training_is_refused, chat_cases, family_dataset, moved_parameters,
    oracle, run_training, sgd_args, touches, video_dataset, weightless_copy, write_records)

CASES = chat_cases()
NAMES = list(CASES)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llava"), model_type="llava", seed=0)


@pytest.fixture(scope="module")
def processor(llava_dir):
    return AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("llava_data") / "cases.json", [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(llava_dir, processor, data_file):
    return family_dataset(processor, data_file, family_for(AutoConfig.from_pretrained(llava_dir)),
                          model_max_length=4096)


def test_the_tiny_checkpoint_loads_like_a_released_one(llava_dir, processor):
    config = AutoConfig.from_pretrained(llava_dir)
    assert config.model_type == "llava" and config.vision_config.model_type == "clip_vision_model"
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.image_seq_length) == (336, 14, 576)
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)  # no torchvision needed
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    rendered = processor.apply_chat_template(CASES["system_multi_turn_grounding"][1], add_generation_prompt=False)
    eos = processor.tokenizer.eos_token
    assert rendered == ("You are a careful assistant. USER: <image>\nWhere is the blue square? ASSISTANT: "
                        f"[0.531, 0.250, 0.844, 0.667]{eos}USER: And what colour is the other shape? ASSISTANT: Red.{eos}")


def test_family_parameters_and_registry():
    family = family_for("llava")
    assert family.model_class_name == "LlavaForConditionalGeneration" and family.uses_processor_items
    assert family.classify_parameter("model.multi_modal_projector.linear_2.bias") == PROJECTOR
    assert family.classify_parameter("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == VISION_TOWER
    assert family.classify_parameter("model.language_model.layers.0.self_attn.q_proj.weight") == LLM
    assert family.classify_parameter("lm_head.weight") == LLM
    from qwenvl.train.trainer import classify_parameter  # the union over every family keeps Qwen's names
    assert classify_parameter("model.multi_modal_projector.linear_1.weight") == PROJECTOR
    assert classify_parameter("model.visual.merger.mlp.0.weight") == PROJECTOR


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(dataset, processor, name):
    item = dataset[NAMES.index(name)]
    _, expected = oracle(processor, CASES[name])
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    if CASES[name][2]:
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert item["pixel_values"].shape == (len(CASES[name][2]), 3, 336, 336)
    else:
        assert "pixel_values" not in item and "pixel_values" not in expected


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_eos(dataset, processor, llava_dir, name):
    text, _ = oracle(processor, CASES[name])
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    spans = answer_spans(text, CASES[name][1], eos)
    plain = tokenizer(text, return_offsets_mapping=True)
    learned = [touches(spans, start, end) for start, end in plain["offset_mapping"]]
    image_id, per_image = tokenizer.convert_tokens_to_ids("<image>"), AutoConfig.from_pretrained(llava_dir).image_seq_length
    expected = []
    for token, learn in zip(plain["input_ids"], learned):
        expected.extend([IGNORE] * per_image if token == image_id else [token if learn else IGNORE])
    labels = dataset[NAMES.index(name)]["labels"]
    assert labels.tolist() == expected
    assert_learned_text(tokenizer, labels, CASES[name][1], eos, lead=" ")


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, llava_dir, processor):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (2, 3, 336, 336) and batch["input_ids"].shape[0] == 3
    assert_loss_is_cross_entropy(model, batch)


def test_padding_changes_no_sample_s_loss_under_the_training_attention(dataset, llava_dir):
    """``sdpa_packed`` (training's default) on a padded batch: each row's token losses are its own sample's alone."""
    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed)

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="sdpa_packed").eval()
    assert_padded_rows_are_each_sample_alone(model, [dataset[1], dataset[2], dataset[3]], ProcessorDataCollator(0))


# The chat template of the released llava-hf/llava-1.5-7b-hf: answers closed by a space, no eos.
RELEASED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_template_without_eos_gets_one_after_each_answer(llava_dir, data_file, tmp_path):
    folder = weightless_copy(llava_dir, tmp_path / "released_template")
    (folder / "chat_template.jinja").write_text(RELEASED_TEMPLATE, encoding="utf-8")
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.chat_template == RELEASED_TEMPLATE
    name = "system_multi_turn_grounding"
    rendered = processor.apply_chat_template(CASES[name][1])
    assert rendered == ("You are a careful assistant. USER: <image>\nWhere is the blue square? ASSISTANT: "
                        "[0.531, 0.250, 0.844, 0.667] USER: And what colour is the other shape? ASSISTANT: Red. ")
    eos = processor.tokenizer.eos_token
    text = rendered.replace("0.667] ", f"0.667]{eos} ").replace("Red. ", f"Red.{eos} ")
    expected = processor(text=text, images=[Image.open(IMAGES / "two_shapes.jpg").convert("RGB")], return_tensors="pt")
    ds = family_dataset(processor, data_file, family_for("llava"), model_max_length=4096)
    item = ds[NAMES.index(name)]
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    labels = item["labels"]
    assert processor.tokenizer.decode(labels[labels != IGNORE]) == f" [0.531, 0.250, 0.844, 0.667]{eos} Red.{eos}"


def test_an_all_bad_batch_has_a_zero_loss(llava_dir, processor):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    assert_an_all_bad_batch_has_a_zero_loss(model, ProcessorDataCollator(processor.tokenizer.pad_token_id))


def test_a_video_is_refused_with_file_and_index(llava_dir, processor, tmp_path):
    ds = video_dataset(processor, family_for("llava"), tmp_path)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the llava family takes images only"):
        ds[0]


def test_flattening_is_refused_by_the_data_module(processor):
    assert_data_module_refuses_flattening(processor, family_for("llava"),
                                          "not supported for the llava family: its model computes 1-D positions")


@pytest.fixture(scope="module")
def weightless(llava_dir, tmp_path_factory):
    return weightless_copy(llava_dir, tmp_path_factory.mktemp("llava_weightless"))


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the llava family "
                                 r"\(LlavaForConditionalGeneration\): its model computes 1-D positions"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the llava family"),
    (["--train_sampling_strategy", "group_by_length"], r"group_by_length: not supported for the llava family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(weightless, tmp_path, extra, message):
    assert_training_is_refused(weightless, tmp_path / "out", extra, message)


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(dataset, llava_dir, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector as a rank of a larger run would."""
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    collate = ProcessorDataCollator(0)
    # text only: one dummy; an image: its own pass only
    assert_dummy_pass(model, family_for("llava"), tmp_path, model.model.vision_tower,
                      [(collate([dataset[2]]), [1]), (collate([dataset[0]]), [1])])


@pytest.fixture(scope="module")
def runs(llava_dir, tmp_path_factory):
    """10 SGD steps on the demo images + text-only data: 1 process x 2 samples, and 2 DDP ranks x 1 sample."""
    out = tmp_path_factory.mktemp("llava_runs")
    run_training(sgd_args(llava_dir, out / "one", max_steps=10, batch_size=2), ranks=1)
    run_training(sgd_args(llava_dir, out / "two", max_steps=10, batch_size=1), ranks=2)
    return out


def test_two_ddp_ranks_train_the_same_weights_as_one_process(runs, llava_dir):
    from safetensors.torch import load_file

    one, two = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    moved = moved_parameters(runs / "one", llava_dir)  # the same names as the start's
    kinds = {family_for("llava").classify_parameter(name) for name in moved}  # saved names: the released layout
    assert kinds == {LLM, PROJECTOR}  # --tune_mm_vision False: the tower stays
    for run in ("one", "two"):
        assert_logged_steps(runs / run, 10)


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(runs):
    model = AutoModelForImageTextToText.from_pretrained(runs / "one")
    processor = AutoProcessor.from_pretrained(runs / "one")
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    assert_generates(model, processor)


def test_the_tower_layer_llava_never_reads_is_found_and_frozen(llava_dir):
    """LLaVA reads hidden_states[-2] of its CLIP tower: with 2 layers, layer 1 and the final norm are never read."""
    from qwenvl.train.train_qwen import freeze_unread_vision

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    unread_prefixes = ("model.vision_tower.encoder.layers.1.",
                       "model.vision_tower.post_layernorm.")  # by hand, from vision_feature_layer -2
    expected = [name for name, _ in model.named_parameters() if name.startswith(unread_prefixes)]
    assert len(expected) == 18  # 16 in the layer (q/k/v/out, 2 norms, 2 MLP linears: weight + bias) + 2 norm
    assert family_for("llava").unread_vision_parameters(model) == expected
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind
    assert freeze_unread_vision(model, family_for("llava")) == expected
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(expected)
    for name, param in model.named_parameters():  # frozen: the projector and layer 0 stay trainable
        if name.startswith("model.multi_modal_projector.") or ".encoder.layers.0." in name:
            assert param.requires_grad, name
