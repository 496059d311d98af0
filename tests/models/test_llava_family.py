"""The LLaVA-1.5 family (an HF-processor family: qwenvl/models/hf_family.py, llava.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``LlavaProcessor`` of the tiny checkpoint, on chat messages written here by hand:
  ``processor(text=processor.apply_chat_template(messages), images=...)``;
- labels: the answers' character spans found in that rendered text with ``str.find``, mapped to tokens by the
  tokenizer's offsets, each ``<image>`` then repeated ``image_seq_length`` times (from the config);
- loss: cross-entropy computed here from the model's full logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor

from qwenvl.data.data_qwen import LazySupervisedDataset, make_supervised_data_module
from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.llava import LLAVA_CHAT_TEMPLATE
from qwenvl.train.argument import ConfigError, DataArguments
from qwenvl.train.loss import compute_lm_loss

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "demo" / "images"
IGNORE = -100

# (record, hand-written HF messages, image files) for every case the issue names.
CASES = {
    "single_image": (
        {"image": "red_circle.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": "A red circle."}]},
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}],
        ["red_circle.jpg"],
    ),
    "multi_image": (
        {"image": ["red_circle.jpg", "blue_square.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich one is a circle?"},
            {"from": "gpt", "value": "The first."}]},
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Which one is a circle?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "The first."}]}],
        ["red_circle.jpg", "blue_square.jpg"],
    ),
    "text_only": (
        {"conversations": [{"from": "human", "value": "What colour is grass?"}, {"from": "gpt", "value": "Green."}]},
        [{"role": "user", "content": [{"type": "text", "text": "What colour is grass?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}],
        [],
    ),
    "system_multi_turn_grounding": (
        {"image": "two_shapes.jpg", "conversations": [
            {"from": "system", "value": "You are a careful assistant."},
            {"from": "human", "value": "<image>\nWhere is the blue square?"},
            {"from": "gpt", "value": "[0.531, 0.250, 0.844, 0.667]"},
            {"from": "human", "value": "And what colour is the other shape?"},
            {"from": "gpt", "value": "Red."}]},
        [{"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the blue square?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "[0.531, 0.250, 0.844, 0.667]"}]},
         {"role": "user", "content": [{"type": "text", "text": "And what colour is the other shape?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        ["two_shapes.jpg"],
    ),
}
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
    path = tmp_path_factory.mktemp("llava_data") / "cases.json"
    records = json.loads(json.dumps([CASES[name][0] for name in NAMES]))
    for record in records:  # absolute paths: the demo images are not next to this file
        if "image" in record:
            images = record["image"] if isinstance(record["image"], list) else [record["image"]]
            record["image"] = [str(IMAGES / name) for name in images]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(llava_dir, processor, data_file):
    args = DataArguments(dataset_use=f"{data_file}")
    family = family_for(AutoConfig.from_pretrained(llava_dir))
    return LazySupervisedDataset(processor.tokenizer, args, family.vision_defaults.image_config(), family=family,
                                 model_max_length=4096, processor=processor)


def oracle(processor, name):
    _, messages, files = CASES[name]
    images = [Image.open(IMAGES / f).convert("RGB") for f in files]
    text = processor.apply_chat_template(messages)
    return text, processor(text=text, images=images or None, return_tensors="pt")


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
    _, expected = oracle(processor, name)
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    if CASES[name][2]:
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert item["pixel_values"].shape == (len(CASES[name][2]), 3, 336, 336)
    else:
        assert "pixel_values" not in item and "pixel_values" not in expected


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_eos(dataset, processor, llava_dir, name):
    text, _ = oracle(processor, name)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    spans, cursor = [], 0
    for message in CASES[name][1]:
        if message["role"] == "assistant":
            answer = message["content"][0]["text"] + eos
            start = text.index(answer, cursor)
            spans.append((start, start + len(answer)))
            cursor = start + len(answer)
    plain = tokenizer(text, return_offsets_mapping=True)
    learned = [any(end > s and start < e for s, e in spans) for start, end in plain["offset_mapping"]]
    image_id, per_image = tokenizer.convert_tokens_to_ids("<image>"), AutoConfig.from_pretrained(llava_dir).image_seq_length
    expected = []
    for token, learn in zip(plain["input_ids"], learned):
        expected.extend([IGNORE] * per_image if token == image_id else [token if learn else IGNORE])
    labels = dataset[NAMES.index(name)]["labels"]
    assert labels.tolist() == expected
    answers = [m["content"][0]["text"] for m in CASES[name][1] if m["role"] == "assistant"]
    assert tokenizer.decode(labels[labels != IGNORE]) == "".join(f" {a}{eos}" for a in answers)


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, llava_dir, processor):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (2, 3, 336, 336) and batch["input_ids"].shape[0] == 3
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        chunked, _ = compute_lm_loss(model, batch, impl="chunked", chunk_size=7)
    labels = batch["labels"]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, by_hand, rtol=1e-5, atol=1e-6)


def test_padding_changes_no_sample_s_loss_under_the_training_attention(dataset, llava_dir):
    """``sdpa_packed`` (training's default) on a padded batch: each row's token losses are its own sample's alone."""
    import qwenvl.train.attention  # noqa: F401  (registers sdpa_packed)

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="sdpa_packed").eval()
    items = [dataset[1], dataset[2], dataset[3]]
    batch = ProcessorDataCollator(0)(items)
    assert (batch["attention_mask"] == 0).any()  # some row is padded
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, item in enumerate(items):
            alone = ProcessorDataCollator(0)([item])
            own = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            length = len(item["input_ids"])
            torch.testing.assert_close(logits[row, :length], own, rtol=1e-4, atol=1e-4)


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
    folder = tmp_path / "released_template"
    folder.mkdir()
    for path in llava_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
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
    family = family_for("llava")
    ds = LazySupervisedDataset(processor.tokenizer, DataArguments(dataset_use=str(data_file)),
                               family.vision_defaults.image_config(), family=family, model_max_length=4096,
                               processor=processor)
    item = ds[NAMES.index(name)]
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    labels = item["labels"]
    assert processor.tokenizer.decode(labels[labels != IGNORE]) == f" [0.531, 0.250, 0.844, 0.667]{eos} Red.{eos}"


def test_an_all_bad_batch_has_a_zero_loss(llava_dir, processor):
    from qwenvl.data.chat import Problem

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id)([Problem("d", "d.json", 0, "missing_media", "x")])
    batch.pop("bad_samples")
    with torch.no_grad():
        assert float(model(**batch).loss) == 0.0


def test_a_video_is_refused_with_file_and_index(llava_dir, processor, tmp_path):
    path = tmp_path / "video.json"
    path.write_text(json.dumps([{"video": "a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]}]))
    family = family_for("llava")
    ds = LazySupervisedDataset(processor.tokenizer, DataArguments(dataset_use=str(path)),
                               family.vision_defaults.image_config(), family=family, processor=processor)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the llava family takes images only"):
        ds[0]


def test_flattening_is_refused_by_the_data_module(processor):
    args = DataArguments(dataset_use="demo_text_only", data_flatten=True)
    family = family_for("llava")
    with pytest.raises(ValueError, match="not supported for the llava family: its model computes 1-D positions"):
        make_supervised_data_module(processor.tokenizer, args, family.vision_defaults.image_config(), family=family,
                                    processor=processor)


@pytest.fixture(scope="module")
def weightless(llava_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_weightless")
    for path in llava_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("extra,message", [
    (["--data_flatten", "True"], r"--data_flatten True: not supported for the llava family "
                                 r"\(LlavaForConditionalGeneration\): its model computes 1-D positions"),
    (["--data_packing", "True"], r"--data_packing True: not supported for the llava family"),
    (["--train_sampling_strategy", "group_by_length"], r"group_by_length: not supported for the llava family"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(weightless, tmp_path, extra, message):
    from qwenvl.train.train_qwen import train

    with pytest.raises(ConfigError, match=message):
        train(["--model_name_or_path", str(weightless), "--dataset_use", "demo_text_only", "--output_dir",
               str(tmp_path / "out"), "--use_cpu", "True", "--report_to", "none", "--max_steps", "1", "--tune_mm_llm", "True", *extra])


def test_the_dummy_pass_reaches_the_projector_and_leaves_loss_and_gradients_alone(dataset, llava_dir, tmp_path):
    """One process, LLM frozen: a text-only batch runs the tower and projector as a rank of a larger run would."""
    import transformers

    from qwenvl.train.trainer import QwenVLTrainer

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    for name, param in model.named_parameters():
        param.requires_grad_(family_for("llava").classify_parameter(name) == PROJECTOR)
    trainer = QwenVLTrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no"))
    projector = {n: p for n, p in model.named_parameters() if p.requires_grad}
    calls: list[int] = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    collate = ProcessorDataCollator(0)
    try:
        for index, expected_calls in ((2, 1), (0, 1)):  # text only: one dummy; an image: its own pass only
            batch = collate([dataset[index]])
            calls.clear()
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch))
            assert len(calls) == expected_calls
            if index == 2:
                loss.backward()
                assert all(p.grad is not None and not p.grad.any() for p in projector.values())
                assert torch.equal(loss, model(**batch).loss)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def runs(llava_dir, tmp_path_factory):
    """10 SGD steps on the demo images + text-only data: 1 process x 2 samples, and 2 DDP ranks x 1 sample."""
    from tests.conftest import free_port, python_env

    out = tmp_path_factory.mktemp("llava_runs")
    common = ["qwenvl/train/train_qwen.py", "--model_name_or_path", str(llava_dir),
              "--dataset_use", "demo_single_image,demo_multi_image,demo_text_only", "--use_cpu", "True",
              "--report_to", "none", "--max_steps", "10", "--learning_rate", "0.05", "--optim", "sgd",
              "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0", "--logging_steps", "1",
              "--save_strategy", "no", "--model_max_length", "4096", "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
              "--seed", "3", "--dataloader_num_workers", "0"]
    commands = {
        "one": [sys.executable, *common, "--output_dir", str(out / "one"), "--per_device_train_batch_size", "2"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), *common, "--output_dir", str(out / "two"), "--per_device_train_batch_size", "1"],
    }
    for name, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=python_env())
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
    return out


def test_two_ddp_ranks_train_the_same_weights_as_one_process(runs, llava_dir):
    from safetensors.torch import load_file

    one, two = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    start = load_file(llava_dir / "model.safetensors")
    assert one.keys() == two.keys() == start.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    moved = {name for name in one if not torch.equal(one[name], start[name])}
    kinds = {family_for("llava").classify_parameter(name) for name in moved}  # saved names: the released layout
    assert kinds == {LLM, PROJECTOR}  # --tune_mm_vision False: the tower stays
    for run in ("one", "two"):
        state = json.loads((runs / run / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert state["global_step"] == 10 and len(losses) == 10 and all(np.isfinite(losses))


def test_the_saved_folder_loads_with_the_auto_classes_and_generates(runs):
    model = AutoModelForImageTextToText.from_pretrained(runs / "one")
    processor = AutoProcessor.from_pretrained(runs / "one")
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[Image.open(IMAGES / "red_circle.jpg").convert("RGB")], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[0, :inputs["input_ids"].shape[1]], inputs["input_ids"][0])
