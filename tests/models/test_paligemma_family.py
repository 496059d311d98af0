"""The PaliGemma family (a prefix-LM HF-processor family: qwenvl/models/paligemma.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``PaliGemmaProcessor`` of the tiny checkpoint, called here by hand as PaliGemma is
  fine-tuned: ``processor(text="<image>" * n + prompt, images=[images], suffix=answer)``; a text-only item is
  that call for the same text with one image, its image block cut off (the processor refuses no image);
- labels: the answer + eos tokenized alone, at the end of the sequence, -100 before (a hand mask);
- loss: cross-entropy computed here from the model's full logits; a padded batch's token sum equals the sum
  of each sample alone; the prefix attends bidirectionally (changing a late prompt token moves an earlier
  position's logits), the suffix causally.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PaliGemmaForConditionalGeneration
from transformers.models.paligemma.processing_paligemma import PaliGemmaProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from qwenvl.data.chat import BadSampleError, Problem
from qwenvl.data.data_qwen import LazySupervisedDataset
from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.paligemma import PALIGEMMA_PROMPT_TEMPLATE
from qwenvl.train.argument import DataArguments
from qwenvl.train.loss import compute_lm_loss
from tests.models.family_helpers import (
    IGNORE, assert_data_module_refuses_flattening, assert_generates, assert_logged_steps, assert_loss_is_cross_entropy,
    assert_training_is_refused, images_of, moved_parameters, projector_only_trainer, run_training, sgd_args,
    weightless_copy, without_labels, write_records)

PER_IMAGE = 256  # (224 / 14) ** 2, the tiny checkpoint's image_seq_length
BOX = "<loc0120><loc0272><loc0341><loc0432> blue square"  # y_min, x_min, y_max, x_max in 1024 bins, then the label

# (record, the processor's prefix text written by hand, answer, image files)
CASES = {
    "single_image": (
        {"image": "red_circle.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": "A red circle."}]},
        "<image>What shape is this?", "A red circle.", ["red_circle.jpg"],
    ),
    "multi_image": (
        {"image": ["red_circle.jpg", "blue_square.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich one is a circle?"},
            {"from": "gpt", "value": "The first."}]},
        "<image><image>Which one is a circle?", "The first.", ["red_circle.jpg", "blue_square.jpg"],
    ),
    "text_only": (
        {"conversations": [{"from": "human", "value": "What colour is grass?"}, {"from": "gpt", "value": "Green."}]},
        "What colour is grass?", "Green.", [],
    ),
    "grounding_tag_after_text": (
        {"image": "two_shapes.jpg", "conversations": [
            {"from": "human", "value": "detect blue square\n<image>"}, {"from": "gpt", "value": BOX}]},
        "<image>detect blue square", BOX, ["two_shapes.jpg"],
    ),
}
NAMES = list(CASES)
BAD = {  # records a prefix-LM cannot take, and the reason each is skipped with
    "system": ({"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi?"},
                                  {"from": "gpt", "value": "Hi."}]},
               "a system turn, but the paligemma family (a prefix-LM: one prompt, one answer) has no system prompt"),
    "multi_turn": ({"image": "red_circle.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        "4 turns (user, assistant, user, assistant), but the paligemma family (a prefix-LM) takes one user prompt "
        "and one answer"),
}


@pytest.fixture(scope="module")
def pg_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_paligemma"), model_type="paligemma", seed=0)


@pytest.fixture(scope="module")
def processor(pg_dir):
    return AutoProcessor.from_pretrained(pg_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("paligemma_data") / "cases.json",
                         [CASES[name][0] for name in NAMES] + [BAD[name][0] for name in BAD])


def make_dataset(processor, data_file, bad_sample_policy="error", **data_args):
    family = family_for("paligemma")
    return LazySupervisedDataset(processor.tokenizer, DataArguments(dataset_use=str(data_file), **data_args),
                                 family.vision_defaults.image_config(), family=family, model_max_length=4096,
                                 processor=processor, bad_sample_policy=bad_sample_policy)


@pytest.fixture(scope="module")
def dataset(processor, data_file):
    return make_dataset(processor, data_file)


def oracle(processor, name):
    _, prefix, answer, files = CASES[name]
    if not files:  # the processor needs an image: the same text with one, then its block cut off
        full = processor(text="<image>" + prefix, images=[images_of(["red_circle.jpg"])], suffix=answer,
                         return_tensors="pt")
        return {k: full[k][:, PER_IMAGE:] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return processor(text=prefix, images=[images_of(files)], suffix=answer, return_tensors="pt")


def test_the_tiny_checkpoint_loads_like_a_released_one(pg_dir, processor):
    config = AutoConfig.from_pretrained(pg_dir)
    assert config.model_type == "paligemma" and config.vision_config.model_type == "siglip_vision_model"
    assert config.text_config.model_type == "gemma"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 14)
    assert isinstance(processor, PaliGemmaProcessor) and processor.image_seq_length == PER_IMAGE
    assert isinstance(processor.image_processor, SiglipImageProcessorPil)  # no torchvision needed
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    # the processor's 1024 <loc> and 128 <seg> tokens are single tokens the embedding holds
    assert tokenizer.convert_tokens_to_ids("<seg127>") < config.text_config.vocab_size
    assert tokenizer("<loc0000><loc1023>", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("<loc0000>"), tokenizer.convert_tokens_to_ids("<loc1023>")]
    assert tokenizer.bos_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"  # the Qwen ones
    model = AutoModelForImageTextToText.from_pretrained(pg_dir)
    assert isinstance(model, PaliGemmaForConditionalGeneration)
    assert processor.chat_template == PALIGEMMA_PROMPT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "text", "text": "detect blue square "}, {"type": "image"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == "<image>detect blue square"


def test_family_parameters_and_registry():
    family = family_for("paligemma")
    assert family.model_class_name == "PaliGemmaForConditionalGeneration" and family.prefix_lm
    assert family.grounding_frame() == "relative 0-1024 of the image"
    assert family.classify_parameter("model.multi_modal_projector.linear.weight") == PROJECTOR
    assert family.classify_parameter("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == VISION_TOWER
    assert family.classify_parameter("model.language_model.layers.0.self_attn.q_proj.weight") == LLM


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(dataset, processor, name):
    item = dataset[NAMES.index(name)]
    expected = oracle(processor, name)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(item[key], expected[key][0]), key
    if CASES[name][3]:
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert item["pixel_values"].shape == (len(CASES[name][3]), 3, 224, 224)
    else:
        assert "pixel_values" not in item
    bos = processor.tokenizer.bos_token_id
    assert item["input_ids"][PER_IMAGE * len(CASES[name][3])] == bos  # images, then <bos>, then the prompt


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answer_and_its_eos(dataset, processor, name):
    tokenizer = processor.tokenizer
    answer = CASES[name][2] + tokenizer.eos_token
    suffix = tokenizer(answer, add_special_tokens=False)["input_ids"]
    item = dataset[NAMES.index(name)]
    length = len(item["input_ids"])
    assert item["labels"].tolist() == [IGNORE] * (length - len(suffix)) + suffix
    assert item["input_ids"][-len(suffix):].tolist() == suffix
    assert tokenizer.decode(item["labels"][item["labels"] != IGNORE]) == answer
    if name.startswith("grounding"):  # four location tokens, one id each
        loc = [tokenizer.convert_tokens_to_ids(f"<loc{n}>") for n in ("0120", "0272", "0341", "0432")]
        assert suffix[:4] == loc


@pytest.mark.parametrize("bad", list(BAD))
def test_a_system_turn_or_a_chat_is_a_counted_bad_sample(processor, data_file, bad):
    index = len(NAMES) + list(BAD).index(bad)
    problem = make_dataset(processor, data_file, bad_sample_policy="skip")[index]
    assert isinstance(problem, Problem) and problem.kind == "unsupported_layout"
    assert problem.message == f"{data_file}:{index}: {BAD[bad][1]}"
    with pytest.raises(BadSampleError) as raised:
        make_dataset(processor, data_file)[index]
    assert str(raised.value) == problem.message


def test_train_on_prompt_is_refused(processor, data_file):
    with pytest.raises(ValueError, match=r"--train_on_prompt True: not supported for the paligemma family, a "
                                         r"prefix-LM: its prompt is attended bidirectionally"):
        make_dataset(processor, data_file, train_on_prompt=True)


@pytest.fixture(scope="module")
def packed_model(pg_dir):
    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed, training's default on CPU)

    return PaliGemmaForConditionalGeneration.from_pretrained(pg_dir, attn_implementation="sdpa_packed").eval()


def test_lora_targets_the_gemma_layers_only(packed_model):
    import re

    from qwenvl.train.lora import lora_target_regex

    regex = lora_target_regex(packed_model)
    targets = [name for name, _ in packed_model.named_modules() if re.fullmatch(regex, name)]
    assert len(targets) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(name.startswith("model.language_model.layers.") for name in targets)  # not SigLIP's q/k/v_proj


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, processor, packed_model):
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["token_type_ids"].shape == batch["labels"].shape
    assert_loss_is_cross_entropy(packed_model, batch)


def test_a_padded_batch_of_two_is_each_sample_alone(dataset, processor, packed_model):
    """The training attention (sdpa_packed) on a padded batch: each row's logits and its share of the summed
    (chunked) loss are its sample's alone, the prefix mask from token_type_ids included."""
    items = [dataset[2], dataset[0]]  # text only (short, padded) and one image
    collate = ProcessorDataCollator(processor.tokenizer.pad_token_id)
    batch = collate(items)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        total, _ = compute_lm_loss(packed_model, batch, num_items_in_batch=1, impl="chunked", chunk_size=5)
        logits = packed_model(**without_labels(batch)).logits
        alone_sum = 0.0
        for row, item in enumerate(items):
            alone = collate([item])
            own, _ = compute_lm_loss(packed_model, alone, num_items_in_batch=1, impl="chunked", chunk_size=5)
            alone_sum = alone_sum + own
            own_logits = packed_model(**without_labels(alone)).logits[0]
            torch.testing.assert_close(logits[row, :len(item["input_ids"])], own_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(total, alone_sum, rtol=1e-5, atol=1e-5)


def test_the_prefix_attends_both_ways_and_the_answer_causally(dataset, packed_model):
    item = dataset[0]
    suffix_start = int(torch.nonzero(item["token_type_ids"])[0])
    inputs = {k: v[None] for k, v in item.items() if k not in ("labels", "pixel_values")}
    inputs["pixel_values"] = item["pixel_values"]

    def logits_with(position: int) -> torch.Tensor:
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, position] = 9707  # another text token
        with torch.no_grad():
            return packed_model(**changed).logits[0]

    with torch.no_grad():
        base = packed_model(**inputs).logits[0]
    earlier = PER_IMAGE + 1  # the prompt's first token
    moved = logits_with(suffix_start - 1)  # the prompt's last token
    assert not torch.allclose(moved[earlier], base[earlier])  # bidirectional prefix
    moved = logits_with(suffix_start + 1)  # the answer's second token
    torch.testing.assert_close(moved[:suffix_start + 1], base[:suffix_start + 1], rtol=0, atol=0)  # causal suffix
    assert not torch.allclose(moved[suffix_start + 1], base[suffix_start + 1])


def test_the_trainer_passes_token_type_ids_and_runs_the_dummy_pass(dataset, pg_dir, processor, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector as a rank of a larger run would;
    the trainer's (chunked) loss path hands the model the batch's token_type_ids."""
    model = PaliGemmaForConditionalGeneration.from_pretrained(pg_dir)
    trainer, projector = projector_only_trainer(model, family_for("paligemma"), tmp_path)
    tower_calls: list[int] = []
    seen: list[torch.Tensor] = []
    handles = [model.model.vision_tower.register_forward_pre_hook(lambda *a: tower_calls.append(1)),
               model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("token_type_ids")),
                                                     with_kwargs=True)]
    collate = ProcessorDataCollator(processor.tokenizer.pad_token_id)
    try:
        for index, expected_calls in ((2, 1), (0, 1)):  # text only: one dummy; an image: its own pass only
            batch = collate([dataset[index]])
            tower_calls.clear()
            seen.clear()
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch))
            assert len(tower_calls) == expected_calls
            assert len(seen) == 1 and torch.equal(seen[0], batch["token_type_ids"])
            with torch.no_grad():
                assert torch.allclose(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
            if index == 2:
                loss.backward()
                assert all(p.grad is not None and not p.grad.any() for p in projector.values())
    finally:
        for handle in handles:
            handle.remove()


def test_flattening_is_refused_by_the_data_module(processor):
    assert_data_module_refuses_flattening(processor, family_for("paligemma"),
                                          "not supported for the paligemma family: its prefix-LM attention")


@pytest.fixture(scope="module")
def weightless(pg_dir, tmp_path_factory):
    return weightless_copy(pg_dir, tmp_path_factory.mktemp("paligemma_weightless"))


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the paligemma family "
                                 r"\(PaliGemmaForConditionalGeneration\): its prefix-LM attention"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the paligemma family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(weightless, tmp_path, extra, message):
    assert_training_is_refused(weightless, tmp_path / "out", extra, message)


@pytest.fixture(scope="module")
def ddp_run(pg_dir, tmp_path_factory):
    """4 SGD steps under 2 DDP ranks x 1 sample on 8 samples (one epoch): images, text only, and the two bad
    layouts (skipped and counted)."""
    out = tmp_path_factory.mktemp("paligemma_run")
    records = [CASES[name][0] for name in NAMES] + [BAD[name][0] for name in BAD]
    data = write_records(out / "train.json", [*records, CASES["single_image"][0], CASES["text_only"][0]])
    run_training(sgd_args(pg_dir, out / "two", max_steps=4, batch_size=1, dataset_use=str(data),
                          extra=["--bad_sample_policy", "skip", "--bad_sample_threshold", "0.5"]), ranks=2)
    return out / "two"


def test_two_ddp_ranks_train_four_steps_and_count_the_bad_layouts(ddp_run, pg_dir):
    assert_logged_steps(ddp_run, 4)
    moved = moved_parameters(ddp_run, pg_dir)
    assert {family_for("paligemma").classify_parameter(name) for name in moved} == {LLM, PROJECTOR}
    bad = [json.loads(line) for line in (ddp_run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted((entry["index"], entry["kind"]) for entry in bad) == [(4, "unsupported_layout"),
                                                                          (5, "unsupported_layout")]


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(ddp_run):
    model = AutoModelForImageTextToText.from_pretrained(ddp_run)
    processor = AutoProcessor.from_pretrained(ddp_run)
    assert isinstance(model, PaliGemmaForConditionalGeneration) and isinstance(processor, PaliGemmaProcessor)
    inputs = assert_generates(model, processor, prompt="caption en")
    assert inputs["token_type_ids"].sum() == 0  # all prefix
