"""The dataset and inference tools on an HF-processor family checkpoint (``family.uses_processor_items``; the tiny
LLaVA-1.5): tools/check_image.py, tools/infer.py, tools/pack_data.py.

Oracles, none of them the code under test: transformers' ``LlavaProcessor`` of the checkpoint on chat messages
written here by hand (``processor(text=processor.apply_chat_template(messages, ...), images=...)``), the
checkpoint's config (``image_seq_length``, the 336 crop), PIL's sizes of the files, and ``model.generate`` on the
processor's inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from qwenvl.data.chat import Conversation
from tests.conftest import REPO_ROOT

IMAGES = REPO_ROOT / "demo" / "images"
# (record, hand-written HF messages of its prompt + answer); media relative to demo/images
RECORDS = [
    ({"image": "red_circle.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat shape is this?"},
                                                   {"from": "gpt", "value": "A red circle."}]},
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]),
    ({"image": ["two_shapes.jpg", "green_bar_tall.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nHow many shapes?"}, {"from": "gpt", "value": "Three."}]},
     [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "How many shapes?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "Three."}]}]),
    ({"conversations": [{"from": "human", "value": "What colour is grass?"}, {"from": "gpt", "value": "Green."}]},
     [{"role": "user", "content": [{"type": "text", "text": "What colour is grass?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]),
    ({"image": "no_such_file.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "Nothing."}]}, None),
    ({"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                             {"from": "gpt", "value": "Nothing."}]}, None),
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llava_tools"), model_type="llava", seed=0)


@pytest.fixture(scope="module")
def processor(llava_dir):
    return AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def annotation(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_tools_data") / "cases.json"
    path.write_text(json.dumps([record for record, _ in RECORDS]), encoding="utf-8")
    return path


def files_of(record: dict) -> list[str]:
    images = record.get("image", [])
    return images if isinstance(images, list) else [images]


def oracle(processor, index: int, generation: bool = False):
    """The processor's inputs for record ``index``: the whole conversation, or its prompt + generation prompt."""
    record, messages = RECORDS[index]
    images = [Image.open(IMAGES / name).convert("RGB") for name in files_of(record)]
    text = processor.apply_chat_template(messages[:-1] if generation else messages, add_generation_prompt=generation)
    return processor(text=text, images=images or None, return_tensors="pt")


# ------------------------------------------------------------------ check_image
def check(llava_dir, annotation, out, *extra) -> int:
    from tools.check_image import main

    return main([str(annotation), "--data_path", str(IMAGES), "--model_name_or_path", str(llava_dir),
                 "--output_dir", str(out), "--no_progress", *extra])


def test_check_image_reports_each_image_as_the_processor_gives_it(llava_dir, annotation, processor, tmp_path, capsys):
    assert check(llava_dir, annotation, tmp_path, "--model_max_length", "4096") == 1  # two bad samples
    out = capsys.readouterr().out
    config = AutoConfig.from_pretrained(llava_dir)
    assert config.image_seq_length == 576 and config.vision_config.image_size == 336
    expected = []
    for index, (record, messages) in enumerate(RECORDS[:3]):
        ids = oracle(processor, index)["input_ids"][0]
        per_image = int((ids == config.image_token_id).sum()) // max(len(files_of(record)), 1)
        for number, name in enumerate(files_of(record)):
            width, height = Image.open(IMAGES / name).size
            expected.append({"index": index, "number": number, "width": width, "height": height,
                             "processed_width": 336, "processed_height": 336, "tokens": per_image})
    assert [e["tokens"] for e in expected] == [576, 576, 576]
    assert json.loads((tmp_path / "cases_images.json").read_text()) == expected
    assert "images: 3, as the model gets them: 3 x 336x336 (576 tokens)" in out
    problems = json.loads((tmp_path / "cases_problems.json").read_text())
    assert [(p["index"], p["kind"]) for p in problems] == [(3, "missing_media"), (4, "unsupported_media")]
    assert problems[1]["reason"] == "1 video(s), but the llava family takes images only"
    valid = json.loads((tmp_path / "cases_valid.json").read_text())
    assert valid == [record for record, _ in RECORDS[:3]]


def test_check_image_finds_over_length_with_the_processor_s_count(llava_dir, annotation, processor, tmp_path):
    assert check(llava_dir, annotation, tmp_path, "--model_max_length", "600") == 1
    problems = {p["index"]: p for p in json.loads((tmp_path / "cases_problems.json").read_text())}
    assert len(oracle(processor, 0)["input_ids"][0]) <= 600 < len(oracle(processor, 1)["input_ids"][0])
    assert sorted(problems) == [1, 3, 4] and problems[1]["kind"] == "over_length"
    assert problems[1]["reason"].startswith(f"over-length: {len(oracle(processor, 1)['input_ids'][0])} tokens > "
                                            f"model_max_length 600")


# ---------------------------------------------------------------------- infer
@pytest.fixture(scope="module")
def predictor(llava_dir):
    from tools.infer import Predictor, ProcessorPredictor

    predictor = Predictor.from_pretrained(llava_dir)
    assert isinstance(predictor, ProcessorPredictor)
    return predictor


def test_infer_prompt_is_the_processor_s_generation_prompt(predictor, processor):
    inputs = predictor.encode_prompt(Conversation(None, [("user", "<image>\nWhat shape is this?")]),
                                     ["red_circle.jpg"], data_path=str(IMAGES))
    expected = oracle(processor, 0, generation=True)
    assert processor.tokenizer.decode(expected["input_ids"][0]).endswith("What shape is this? ASSISTANT:")
    assert inputs.keys() == expected.keys()
    for key in expected:
        assert torch.equal(inputs[key], expected[key]), key


def test_infer_multi_turn_prompt_with_a_system_turn(predictor, processor):
    conversation = Conversation("Be brief.", [("user", "<image>\nWhat is left?"), ("assistant", "A square."),
                                              ("user", "And here?\n<image>")])
    inputs = predictor.encode_prompt(conversation, ["two_shapes.jpg", "green_bar_tall.jpg"], data_path=str(IMAGES))
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is left?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert f"A square.{processor.tokenizer.eos_token}USER:" in text  # the earlier answer closed, as in training
    images = [Image.open(IMAGES / name).convert("RGB") for name in ("two_shapes.jpg", "green_bar_tall.jpg")]
    expected = processor(text=text, images=images, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])


def test_infer_generates_what_the_model_generates(llava_dir, processor, capsys):
    from tools.infer import main

    (prediction,) = main(["--model", str(llava_dir), "--image", str(IMAGES / "red_circle.jpg"), "--prompt",
                          "What shape is this?", "--max_new_tokens", "4"])
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    inputs = oracle(processor, 0, generation=True)
    new = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    new = new[:new.index(eos)] if eos in new else new
    assert prediction.prediction == processor.tokenizer.decode(new, skip_special_tokens=False).strip()
    assert capsys.readouterr().out.strip().endswith(prediction.prediction)


def test_infer_answers_an_annotation_file(llava_dir, annotation):
    from tools.infer import main

    predictions = main(["--model", str(llava_dir), "--annotation", str(annotation), "--data_path", str(IMAGES),
                        "--max_samples", "3", "--max_new_tokens", "2"])
    assert [(p.index, p.reference) for p in predictions] == [(0, "A red circle."), (1, "Three."), (2, "Green.")]


# ------------------------------------------------------------------ pack_data
def test_pack_data_refuses_the_family_before_loading_anything(llava_dir, tmp_path):
    from tools.pack_data import main

    folder = tmp_path / "config_only"  # no tokenizer, no processor, no weights: nothing else is read
    folder.mkdir()
    shutil.copy(llava_dir / "config.json", folder / "config.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo_single_image", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")])
    assert str(exit_info.value) == (
        f"error: --model_name_or_path {folder}: packed files train with --data_packing True, which is not supported "
        "for the llava family (LlavaForConditionalGeneration): its model computes 1-D positions from the attention "
        "mask, so samples flattened into one row would attend across their boundaries. Train on the annotation "
        "files as they are (padded batches); there is nothing to pack.")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- preview
def test_preview_refuses_the_family_naming_check_image(llava_dir, tmp_path, capsys):
    from tools.preview import main

    folder = tmp_path / "config_only"  # nothing but the config is read before the refusal
    folder.mkdir()
    shutil.copy(llava_dir / "config.json", folder / "config.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo_single_image", "--model_name_or_path", str(folder), "--out", str(tmp_path / "page.html")])
    assert exit_info.value.code == 2
    assert (f"tools/preview.py: error: --model_name_or_path {folder}: the llava family "
            "(LlavaForConditionalGeneration) builds its samples with its Hugging Face processor, which this page does "
            f"not draw yet") in capsys.readouterr().err
    assert not (tmp_path / "page.html").exists()
