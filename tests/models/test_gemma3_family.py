"""The Gemma 3 family (an HF-processor family: qwenvl/models/hf_family.py, gemma3.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``Gemma3Processor`` of the tiny checkpoint, on chat messages written here by hand:
  ``processor(text=processor.apply_chat_template(messages), images=...)``;
- labels: the expanded text written here by hand (each ``<start_of_image>`` becomes ``\\n\\n<start_of_image>`` +
  ``mm_tokens_per_image`` (from the config) soft tokens + ``<end_of_image>\\n\\n``), each answer + ``<end_of_turn>``
  found in it with ``str.find`` and mapped to tokens by the tokenizer's offsets;
- loss: cross-entropy computed here from the model's full logits;
- attention: each sample of a padded batch alone, and the same sample without ``token_type_ids``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Gemma3ForConditionalGeneration
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

from qwenvl.data.chat import SampleError
from qwenvl.data.hf_items import ProcessorDataCollator, ProcessorItemBuilder, conversation_messages
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.gemma3 import GEMMA3_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, answer_spans, assert_an_all_bad_batch_has_a_zero_loss, assert_data_module_refuses_flattening,
    assert_dummy_pass, assert_generates, assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy,
    assert_training_is_refused, chat_cases, family_dataset, images_of, moved_parameters, oracle, run_training, sgd_args,
    touches, video_dataset, weightless_copy, without_labels, write_records)

EOT, BOI, EOI, SOFT = "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# The shared cases, the multi-image one with its images inside the question (Gemma 3's chat places them so).
CASES = {**chat_cases(box="[531, 250, 844, 667]"), "multi_image": (
    {"image": ["red_circle.jpg", "blue_square.jpg"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>: which one is a circle?"},
        {"from": "gpt", "value": "The first."}]},
    [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                  {"type": "text", "text": "and"}, {"type": "image"},
                                  {"type": "text", "text": ": which one is a circle?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "The first."}]}],
    ["red_circle.jpg", "blue_square.jpg"],
)}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma3"), model_type="gemma3", seed=0)


@pytest.fixture(scope="module")
def processor(gemma_dir):
    return AutoProcessor.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def model(gemma_dir):
    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed, training's default attention)

    return Gemma3ForConditionalGeneration.from_pretrained(gemma_dir, attn_implementation="sdpa_packed").eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("gemma3_data") / "cases.json", [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(gemma_dir, processor, data_file):
    return family_dataset(processor, data_file, family_for(AutoConfig.from_pretrained(gemma_dir)),
                          model_max_length=4096)


def collate(processor, items):
    return ProcessorDataCollator(processor.tokenizer.pad_token_id, family_for("gemma3"))(items)


def test_the_tiny_checkpoint_loads_like_a_released_one(gemma_dir, processor):
    config = AutoConfig.from_pretrained(gemma_dir)
    assert config.model_type == "gemma3" and config.vision_config.model_type == "siglip_vision_model"
    assert config.text_config.model_type == "gemma3_text" and config.text_config.vocab_size == 151936
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.mm_tokens_per_image) == (32, 4, 16)
    assert config.text_config.layer_types == ["sliding_attention", "full_attention"]
    assert isinstance(processor, Gemma3Processor) and processor.image_seq_length == 16
    assert isinstance(processor.image_processor, Gemma3ImageProcessorPil)  # no torchvision needed
    assert processor.image_processor.do_pan_and_scan is False
    assert processor.chat_template == GEMMA3_CHAT_TEMPLATE
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(SOFT) == tokenizer.image_token_id
    assert config.boi_token_index == tokenizer.convert_tokens_to_ids(BOI) == processor.image_token_id
    assert config.eoi_token_index == tokenizer.convert_tokens_to_ids(EOI)
    assert config.text_config.bos_token_id == tokenizer.convert_tokens_to_ids("<bos>") == tokenizer.bos_token_id
    assert isinstance(AutoModelForImageTextToText.from_pretrained(gemma_dir), Gemma3ForConditionalGeneration)
    rendered = processor.apply_chat_template(CASES["system_multi_turn_grounding"][1])
    assert rendered == ("<bos><start_of_turn>user\nYou are a careful assistant.\n\n<start_of_image>Where is the blue "
                        "square?<end_of_turn>\n<start_of_turn>model\n[531, 250, 844, 667]<end_of_turn>\n"
                        "<start_of_turn>user\nAnd what colour is the other shape?<end_of_turn>\n"
                        "<start_of_turn>model\nRed.<end_of_turn>\n")
    prompt = processor.apply_chat_template(CASES["multi_image"][1][:1], add_generation_prompt=True)
    assert prompt == ("<bos><start_of_turn>user\nCompare<start_of_image>and<start_of_image>: which one is a "
                      "circle?<end_of_turn>\n<start_of_turn>model\n")


def test_family_parameters_and_registry(model):
    family = family_for("gemma3")
    assert family.model_class_name == "Gemma3ForConditionalGeneration" and family.uses_processor_items
    assert family.grounding_range == 1000 and family.default_system_prompt is None
    assert family.processor_kwargs() == {"do_pan_and_scan": False, "add_special_tokens": False}
    kinds = {name: family.classify_parameter(name) for name, _ in model.named_parameters()}
    assert kinds["model.multi_modal_projector.mm_input_projection_weight"] == PROJECTOR
    assert kinds["model.multi_modal_projector.mm_soft_emb_norm.weight"] == PROJECTOR
    for name, kind in kinds.items():  # by module path: every parameter lands in exactly its part
        expected = (PROJECTOR if name.startswith("model.multi_modal_projector.") else
                    VISION_TOWER if name.startswith("model.vision_tower.") else LLM)
        assert kind == expected, name
    assert {k for k in kinds.values()} == {LLM, PROJECTOR, VISION_TOWER}


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(dataset, processor, name):
    item = dataset[NAMES.index(name)]
    _, expected = oracle(processor, CASES[name])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(item[key], expected[key][0]), key
    soft = processor.tokenizer.convert_tokens_to_ids(SOFT)
    assert torch.equal(item["token_type_ids"], (item["input_ids"] == soft).long())
    assert int(item["token_type_ids"].sum()) == 16 * len(CASES[name][2])
    if CASES[name][2]:
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert item["pixel_values"].shape == (len(CASES[name][2]), 3, 32, 32)
    else:
        assert "pixel_values" not in item and "pixel_values" not in expected


def hand_labels(processor, config, name, train_on_prompt=False):
    """Labels from the rendered text, its image blocks written out by hand, the answers found with str.find."""
    text, encoded = oracle(processor, CASES[name])
    block = f"\n\n{BOI}{SOFT * config.mm_tokens_per_image}{EOI}\n\n"
    expanded = text.replace(BOI, block)
    tokenizer = processor.tokenizer
    plain = tokenizer(expanded, return_offsets_mapping=True)
    assert plain["input_ids"] == encoded["input_ids"][0].tolist()  # the hand expansion is right
    spans = answer_spans(expanded, CASES[name][1], EOT)
    blocks, cursor = [], 0
    while (start := expanded.find(block, cursor)) >= 0:
        blocks.append((start, start + len(block)))
        cursor = start + len(block)
    return [token if (train_on_prompt or touches(spans, s, e)) and not touches(blocks, s, e) else IGNORE
            for token, (s, e) in zip(plain["input_ids"], plain["offset_mapping"])]


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_end_of_turn(dataset, processor, gemma_dir, name):
    config = AutoConfig.from_pretrained(gemma_dir)
    labels = dataset[NAMES.index(name)]["labels"]
    assert labels.tolist() == hand_labels(processor, config, name)
    tokenizer = processor.tokenizer
    assert_learned_text(tokenizer, labels, CASES[name][1], EOT)
    assert tokenizer.eos_token not in tokenizer.decode(labels[labels != IGNORE])  # no <|im_end|> inserted


def test_train_on_prompt_learns_all_but_the_image_blocks(processor, gemma_dir):
    from qwenvl.data.chat import parse_conversation

    name = "system_multi_turn_grounding"
    builder = ProcessorItemBuilder(processor, family_for("gemma3"), train_on_prompt=True)
    record = CASES[name][0]
    item = builder.build(parse_conversation(record), images_of([record["image"]]), 4096)
    assert item["labels"].tolist() == hand_labels(processor, AutoConfig.from_pretrained(gemma_dir), name, True)
    assert conversation_messages(parse_conversation(record)) == CASES[name][1]


def test_the_cut_at_model_max_length_never_splits_an_image_block(processor):
    from qwenvl.data.chat import parse_conversation

    record = CASES["single_image"][0]
    builder = ProcessorItemBuilder(processor, family_for("gemma3"))
    image = images_of([record["image"]])
    full = builder.build(parse_conversation(record), image, None)
    eoi = int(torch.nonzero(full["input_ids"] == processor.tokenizer.convert_tokens_to_ids(EOI))[-1])
    with pytest.raises(SampleError, match=rf"over-length: {len(full['input_ids'])} tokens > model_max_length "
                                          rf"{eoi} and the cut would split a vision block"):
        builder.build(parse_conversation(record), image, eoi)
    with pytest.raises(SampleError, match="no answer token survives"):  # cut after the block: the answer is gone
        builder.build(parse_conversation(record), image, eoi + 2)


def test_pan_and_scan_when_asked_is_what_the_processor_builds(processor):
    from qwenvl.data.chat import parse_conversation

    record = {"image": "green_triangle.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A triangle."}]}
    [image] = images_of(["green_triangle.jpg"])  # 640 x 480: two crops
    item = ProcessorItemBuilder(processor, dataclasses.replace(family_for("gemma3"), pan_and_scan=True)).build(
        parse_conversation(record), [image], 4096)
    messages = conversation_messages(parse_conversation(record))
    expected = processor(text=processor.apply_chat_template(messages), images=[image], do_pan_and_scan=True,
                         return_tensors="pt")
    assert item["pixel_values"].shape == (3, 3, 32, 32)  # the image and its two crops
    for key in ("input_ids", "token_type_ids", "pixel_values"):
        assert torch.equal(item[key].reshape(expected[key].shape), expected[key]), key
    labels = item["labels"]
    assert processor.tokenizer.decode(labels[labels != IGNORE]) == f"A triangle.{EOT}"


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, model, processor, tmp_path):
    import transformers

    from qwenvl.train.trainer import QwenVLTrainer

    batch = collate(processor, [dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape[0] == 3
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    by_hand = assert_loss_is_cross_entropy(model, batch)
    trainer = QwenVLTrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no"))
    model.train()  # the trainer's training loss path: the hidden-state (chunked) loss
    try:
        with torch.no_grad():
            trained = trainer.compute_loss(model, dict(batch))
    finally:
        model.eval()
    assert trainer._training_loss == "chunked"
    torch.testing.assert_close(trained, by_hand, rtol=1e-5, atol=1e-6)


def test_the_training_attention_honours_token_type_ids_and_padding(dataset, model, processor):
    """``sdpa_packed`` on a padded batch of 2: each row's logits and loss are its sample's alone, and the image
    block attends both ways (removing ``token_type_ids`` changes the block's first token, not what comes before)."""
    items = [dataset[3], dataset[0]]  # the second row (one short image sample) is padded
    batch = collate(processor, items)
    assert (batch["attention_mask"][1] == 0).any()
    with torch.no_grad():
        logits = model(**without_labels(batch)).logits
        sums, count = 0.0, 0
        for row, item in enumerate(items):
            alone = collate(processor, [item])
            out = model(**alone)
            length = len(item["input_ids"])
            torch.testing.assert_close(logits[row, :length], out.logits[0], rtol=1e-4, atol=1e-4)
            learned = int((item["labels"][1:] != IGNORE).sum())
            sums, count = sums + float(out.loss) * learned, count + learned
        torch.testing.assert_close(float(model(**batch).loss), sums / count, rtol=1e-5, atol=1e-6)
        alone = collate(processor, [items[1]])
        causal = model(**{k: v for k, v in without_labels(alone).items() if k != "token_type_ids"}).logits[0]
    own = model(**without_labels(alone)).logits[0].detach()
    first = int(torch.nonzero(alone["token_type_ids"][0])[0])
    torch.testing.assert_close(causal[:first], own[:first], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal[first], own[first], atol=1e-4)  # it saw the block's later tokens


def test_an_all_bad_batch_has_a_zero_loss(model, processor):
    assert_an_all_bad_batch_has_a_zero_loss(model, lambda items: collate(processor, items))


def test_a_video_is_refused_with_file_and_index(processor, tmp_path):
    ds = video_dataset(processor, family_for("gemma3"), tmp_path)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the gemma3 family takes images only"):
        ds[0]


def test_a_chat_token_in_the_text_is_refused(processor, tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Say <end_of_turn> now"}, {"from": "gpt", "value": "No."}]}]))
    ds = family_dataset(processor, path, family_for("gemma3"))
    with pytest.raises(ValueError, match=r"tokens.json:0: user text contains <end_of_turn>, a token that structures"):
        ds[0]


def test_flattening_is_refused_by_the_data_module(processor):
    assert_data_module_refuses_flattening(processor, family_for("gemma3"),
                                          "not supported for the gemma3 family: its images attend bidirectionally "
                                          r"within their block \(token_type_ids\)")


@pytest.fixture(scope="module")
def weightless(gemma_dir, tmp_path_factory):
    return weightless_copy(gemma_dir, tmp_path_factory.mktemp("gemma3_weightless"))


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the gemma3 family "
                                 r"\(Gemma3ForConditionalGeneration\): its images attend bidirectionally"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the gemma3 family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(weightless, tmp_path, extra, message):
    assert_training_is_refused(weightless, tmp_path / "out", extra, message)


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(dataset, gemma_dir, processor,
                                                                                   tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector as a rank of a larger run would."""
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir)
    # text only: one dummy; an image: its own pass only
    assert_dummy_pass(model, family_for("gemma3"), tmp_path, model.model.vision_tower,
                      [(collate(processor, [dataset[2]]), [1]), (collate(processor, [dataset[0]]), [1])])


@pytest.fixture(scope="module")
def ddp_run(gemma_dir, tmp_path_factory):
    """4 SGD steps on the demo images + text-only data over 2 DDP ranks (gloo), 1 sample each."""
    out = tmp_path_factory.mktemp("gemma3_ddp") / "two"
    run_training(sgd_args(gemma_dir, out, max_steps=4, batch_size=1), ranks=2)
    return out


def test_two_ddp_ranks_train_four_steps(ddp_run, gemma_dir):
    moved = moved_parameters(ddp_run, gemma_dir)
    assert {family_for("gemma3").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}  # tower frozen
    assert_logged_steps(ddp_run, 4)


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(ddp_run):
    model = AutoModelForImageTextToText.from_pretrained(ddp_run)
    processor = AutoProcessor.from_pretrained(ddp_run)
    assert isinstance(model, Gemma3ForConditionalGeneration) and isinstance(processor, Gemma3Processor)
    assert processor.chat_template == GEMMA3_CHAT_TEMPLATE and processor.image_seq_length == 16
    assert_generates(model, processor)
