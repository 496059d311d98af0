"""The Idefics3 and SmolVLM families (HF-processor families: qwenvl/models/idefics3.py; qwenvl/data/hf_items.py).

Oracles, none of them the code under test:
- items: transformers' ``Idefics3Processor`` of the tiny checkpoint (image splitting on: 2 x 2 tiles + the global
  image), on chat messages written here by hand: ``processor(text=processor.apply_chat_template(messages), ...)``;
- labels: the answers' character spans found with ``str.find`` in the text the processor tokenizes, which is written
  here from the documented layout (tiles, ``<row_r_col_c>``, ``<global-img>``), mapped to tokens by the offsets;
- loss: cross-entropy computed here from the model's full logits;
- batches: one processor call of two samples (``pixel_values`` (2, images, 3, H, W) padded with zero images).

SmolVLM: transformers 5.23 cannot build ``SmolVLMProcessor`` without torchvision (its video processor needs it; even
built by hand with a ``SmolVLMVideoProcessor`` object its class check fails), and torchvision is not installed here:
``SMOLVLM.load_processor`` gives ``SmolVLMImageTextProcessor`` (the same class without the video part). Its items
are checked against ``SmolVLMProcessor`` where torchvision is, else against transformers' ``Idefics3Processor``
around the SmolVLM folder's tokenizer, image processor and template (the same image expansion: rows x cols tiles
of ``<fake_token_around_image><row_r_col_c>`` + ``<image>``s, then the global image), and the labels against the
layout written here by hand, as for Idefics3.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

from qwenvl.data.hf_items import ProcessorDataCollator
from qwenvl.models import LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.models.hf_family import image_text_processor_class
from qwenvl.models.idefics3 import IDEFICS3, IDEFICS3_CHAT_TEMPLATE, SMOLVLM, SMOLVLM_CHAT_TEMPLATE
from tests.models.family_helpers import (
    IGNORE, answer_spans, assert_generates, assert_learned_text, assert_logged_steps, assert_loss_is_cross_entropy,
    assert_training_is_refused, chat_cases, family_dataset, images_of, moved_parameters, oracle, projector_only_trainer,
    run_training, sgd_args, touches, video_dataset, weightless_copy, write_records)

EOU = "<end_of_utterance>"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

CASES = chat_cases(multi=("red_circle.jpg", "gray_square_l.png"))
NAMES = list(CASES)
# (rows, cols) of each image at the tiny size (longest edge 56, tiles of 28): gray_square_l is 64 x 64 -> 2 x 2 too.
GRID = {"red_circle.jpg": (2, 2), "gray_square_l.png": (2, 2), "two_shapes.jpg": (2, 2)}
RENDERED_GROUNDING = (f"System: You are a careful assistant.{EOU}\nUser:<image>Where is the blue square?{EOU}\n"
                      f"Assistant: [0.531, 0.250, 0.844, 0.667]{EOU}\nUser: And what colour is the other shape?{EOU}\n"
                      f"Assistant: Red.{EOU}\n")


def image_text(rows: int, cols: int, per_tile: int) -> str:
    """The documented expansion of one ``<image>`` (written here, not taken from the processor)."""
    tile = "<image>" * per_tile
    text = "".join("".join(f"<fake_token_around_image><row_{r}_col_{c}>{tile}" for c in range(1, cols + 1)) + "\n"
                   for r in range(1, rows + 1))
    return f"{text}\n<fake_token_around_image><global-img>{tile}<fake_token_around_image>"


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_idefics3"), model_type="idefics3", seed=0)


@pytest.fixture(scope="module")
def processor(idefics3_dir):
    return AutoProcessor.from_pretrained(idefics3_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("idefics3_data") / "cases.json",
                         [case[0] for case in CASES.values()])


@pytest.fixture(scope="module")
def dataset(processor, data_file):
    return family_dataset(processor, data_file, IDEFICS3, model_max_length=4096)


@pytest.fixture(scope="module")
def idefics3_model(idefics3_dir):
    return Idefics3ForConditionalGeneration.from_pretrained(idefics3_dir).eval()


def test_the_tiny_checkpoint_loads_like_a_released_one(idefics3_dir, processor):
    config = AutoConfig.from_pretrained(idefics3_dir)
    assert config.model_type == "idefics3" and config.vision_config.model_type == "idefics3_vision"
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.scale_factor) == (28, 7, 2)
    assert isinstance(processor, Idefics3Processor) and processor.image_seq_len == 4  # (28 / 7)^2 / 2^2
    assert isinstance(processor.image_processor, Idefics3ImageProcessorPil)  # no torchvision needed
    assert processor.image_processor.do_image_splitting
    assert processor.chat_template == IDEFICS3_CHAT_TEMPLATE
    tokenizer = processor.tokenizer
    for token in ("<image>", "<fake_token_around_image>", "<global-img>", "<row_2_col_2>", EOU, "<|begin_of_text|>"):
        assert len(tokenizer(token)["input_ids"]) == 1, token
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert isinstance(AutoModelForImageTextToText.from_pretrained(idefics3_dir), Idefics3ForConditionalGeneration)
    messages = CASES["system_multi_turn_grounding"][1]
    assert processor.apply_chat_template(messages) == "<|begin_of_text|>" + RENDERED_GROUNDING
    # SmolVLM(2): the same turns after <|im_start|>, a video part as <video>
    rendered = tokenizer.apply_chat_template(messages, chat_template=SMOLVLM_CHAT_TEMPLATE, tokenize=False)
    assert rendered == "<|im_start|>" + RENDERED_GROUNDING
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert tokenizer.apply_chat_template(video, chat_template=SMOLVLM_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True) == (
        f"<|im_start|>User: <video>What happens?{EOU}\nAssistant:")


@pytest.mark.parametrize("family,model_class", [(IDEFICS3, "Idefics3ForConditionalGeneration"),
                                                (SMOLVLM, "SmolVLMForConditionalGeneration")])
def test_family_parameters_and_registry(family, model_class):
    assert family_for(family.model_type) is family and family.model_class_name == model_class
    assert family.uses_processor_items and family.grounding_range == 1 and family.default_system_prompt is None
    assert family.classify_parameter("model.connector.modality_projection.proj.weight") == PROJECTOR
    assert family.classify_parameter("model.vision_model.encoder.layers.0.mlp.fc1.weight") == VISION_TOWER
    assert family.classify_parameter("model.vision_model.embeddings.patch_embedding.weight") == VISION_TOWER
    assert family.classify_parameter("model.text_model.layers.0.self_attn.q_proj.weight") == LLM
    assert family.classify_parameter("lm_head.weight") == LLM
    from qwenvl.train.trainer import classify_parameter  # the union over every family

    assert classify_parameter("model.connector.modality_projection.proj.weight") == PROJECTOR
    assert classify_parameter("model.vision_model.post_layernorm.weight") == VISION_TOWER


@pytest.mark.parametrize("name", NAMES)
def test_the_item_is_what_the_processor_builds(dataset, processor, name):
    item = dataset[NAMES.index(name)]
    _, expected = oracle(processor, CASES[name])
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["attention_mask"], expected["attention_mask"][0])
    if CASES[name][2]:
        for key in ("pixel_values", "pixel_attention_mask"):
            assert torch.equal(item[key], expected[key]), key
        tiles = sum(rows * cols + 1 for rows, cols in (GRID[f] for f in CASES[name][2]))  # tiles + global per image
        assert item["pixel_values"].shape == (1, tiles, 3, 28, 28)
        assert item["pixel_attention_mask"].shape == (1, tiles, 28, 28) and bool(item["pixel_attention_mask"].all())
    else:
        assert "pixel_values" not in item and "pixel_values" not in expected


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_answers_and_their_end_of_utterance(dataset, processor, name):
    assert_labels(dataset, processor, name)


def assert_labels(dataset, processor, name):
    """The item's labels are the answers + ``<end_of_utterance>`` of the layout written here by hand."""
    rendered, expected = oracle(processor, CASES[name])
    pieces = rendered.split("<image>")  # the layout written by hand, image by image
    text = pieces[0] + "".join(image_text(*GRID[f], processor.image_seq_len) + piece
                               for f, piece in zip(CASES[name][2], pieces[1:]))
    tokenizer = processor.tokenizer
    plain = tokenizer(text, return_offsets_mapping=True)
    assert plain["input_ids"] == expected["input_ids"][0].tolist()  # the hand layout is the processor's
    spans = answer_spans(text, CASES[name][1], EOU)
    want = [token if touches(spans, start, end) else IGNORE
            for token, (start, end) in zip(plain["input_ids"], plain["offset_mapping"])]
    labels = dataset[NAMES.index(name)]["labels"]
    assert labels.tolist() == want
    assert_learned_text(tokenizer, labels, CASES[name][1], EOU, lead=" ")


def test_the_loss_equals_cross_entropy_of_the_full_logits(dataset, idefics3_model, processor):
    batch = ProcessorDataCollator(processor.tokenizer.pad_token_id, IDEFICS3)([dataset[0], dataset[2], dataset[3]])
    assert batch["pixel_values"].shape == (3, 5, 3, 28, 28)  # the text-only row: 5 zero images
    assert not batch["pixel_values"][1].any() and not batch["pixel_attention_mask"][1].any()
    assert_loss_is_cross_entropy(idefics3_model, batch)


@pytest.mark.parametrize("pair", [("single_image", "multi_image"), ("multi_image", "text_only")])
def test_a_collated_batch_is_one_processor_call_of_its_samples(dataset, idefics3_model, processor, pair):
    """Two items collated == ``processor(text=[a, b], images=[[...], [...]])``: the sample with fewer images padded
    with zero images (mask 0); and the model's loss on both batches is the same."""
    items = [dataset[NAMES.index(name)] for name in pair]
    ours = ProcessorDataCollator(processor.tokenizer.pad_token_id, IDEFICS3)(items)
    texts = [processor.apply_chat_template(CASES[name][1]) for name in pair]
    theirs = processor(text=texts, images=[images_of(CASES[name][2]) for name in pair], padding=True,
                       return_tensors="pt")
    assert ours["pixel_values"].shape == (2, 10, 3, 28, 28)  # two images of 2 x 2 tiles + global
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        theirs_loss = idefics3_model(**dict(theirs), labels=ours["labels"]).loss
        torch.testing.assert_close(idefics3_model(**ours).loss, theirs_loss, rtol=0, atol=0)


def test_model_max_length_cuts_text_only_never_an_image_block(processor, data_file, dataset):
    full = dataset[0]  # single_image: the image block ends at its closing <fake_token_around_image>
    ids = full["input_ids"].tolist()
    block_end = len(ids) - 1 - ids[::-1].index(processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>"))
    assert ids[block_end - 1] == processor.image_token_id  # the global image's last <image> before it

    def at(limit):
        return family_dataset(processor, data_file, IDEFICS3, model_max_length=limit)[0]

    with pytest.raises(ValueError, match=rf"cases.json:0: over-length: {len(ids)} tokens > model_max_length "
                                         rf"{block_end} and the cut would split a vision block"):
        at(block_end)  # would keep every <image> but drop the block's closing token
    cut = at(len(ids) - 2)  # the answer's last tokens go, the image block stays whole
    assert torch.equal(cut["input_ids"], full["input_ids"][:-2]) and torch.equal(cut["labels"], full["labels"][:-2])


@pytest.mark.parametrize("token", [EOU, "<global-img>", "<row_1_col_1>", "<|begin_of_text|>"])
def test_a_structure_token_in_the_text_is_a_bad_sample(processor, tmp_path, token):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Say {token} please"},
                                                   {"from": "gpt", "value": "No."}]}]))
    ds = family_dataset(processor, path, IDEFICS3)
    with pytest.raises(ValueError, match=rf"bad.json:0: user text contains {re.escape(token)}, a token that "
                                         rf"structures the chat"):
        ds[0]


def test_a_video_is_refused_with_file_and_index(processor, tmp_path):
    ds = video_dataset(processor, IDEFICS3, tmp_path)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the idefics3 family takes images only"):
        ds[0]


@pytest.fixture(scope="module")
def smolvlm_dir(tmp_path_factory) -> Path:
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_smolvlm"), model_type="smolvlm", seed=0)


@pytest.fixture(scope="module")
def smolvlm_processor(smolvlm_dir):
    return SMOLVLM.load_processor(smolvlm_dir)


@pytest.fixture(scope="module")
def smolvlm_oracle(smolvlm_dir):
    """``SmolVLMProcessor`` where torchvision is; else transformers' ``Idefics3Processor`` of the same pieces."""
    if HAS_TORCHVISION:
        return AutoProcessor.from_pretrained(smolvlm_dir)
    config = json.loads((smolvlm_dir / "processor_config.json").read_text())
    return Idefics3Processor(image_processor=SmolVLMImageProcessorPil.from_pretrained(smolvlm_dir),
                             tokenizer=AutoTokenizer.from_pretrained(smolvlm_dir),
                             image_seq_len=config["image_seq_len"],
                             chat_template=(smolvlm_dir / "chat_template.jinja").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smolvlm_dataset(smolvlm_processor, data_file):
    return family_dataset(smolvlm_processor, data_file, SMOLVLM, model_max_length=4096)


@pytest.fixture(scope="module")
def smolvlm_model(smolvlm_dir):
    torch.manual_seed(0)
    return SmolVLMForConditionalGeneration(AutoConfig.from_pretrained(smolvlm_dir)).eval()


@pytest.mark.parametrize("model_type,extra,message", [
    ("idefics3", ["--data_packing", "True"], r"--data_packing True: not supported for the idefics3 family "
                                             r"\(Idefics3ForConditionalGeneration\): its model computes 1-D positions"),
    ("smolvlm", ["--data_flatten", "True"], r"--data_flatten True: not supported for the smolvlm family "
                                            r"\(SmolVLMForConditionalGeneration\): its model computes 1-D positions"),
])
def test_packing_and_flattening_are_refused_before_the_model_loads(idefics3_dir, smolvlm_dir, tmp_path, model_type,
                                                                   extra, message):
    source = idefics3_dir if model_type == "idefics3" else smolvlm_dir
    assert_training_is_refused(weightless_copy(source, tmp_path / "weightless"), tmp_path / "out", extra, message)


def saved_as_released(folder: Path) -> None:
    """The folder names ``SmolVLMProcessor`` (processor and tokenizer config) as released SmolVLM checkpoints do,
    and keeps video settings that the released video processor class takes (it instantiates from its module here)."""
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "SmolVLMProcessor"
    assert json.loads((folder / "tokenizer_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    assert processor_config["image_seq_len"] == SMOLVLM.tiny_image_seq_len() == 4  # (32 / 8)^2 / 2^2
    video = dict(processor_config["video_processor"])
    assert video.pop("video_processor_type") == "SmolVLMVideoProcessor"
    assert SmolVLMVideoProcessor(**video).max_image_size == {"longest_edge": 32}


def test_smolvlm_folders_name_the_released_processor_class(smolvlm_dir, smolvlm_processor, tmp_path):
    saved_as_released(smolvlm_dir)
    smolvlm_processor.save_pretrained(tmp_path)  # what a training run saves (train_qwen.save_processor)
    saved_as_released(tmp_path)
    again = SMOLVLM.load_processor(tmp_path)
    assert type(again) is type(smolvlm_processor) and again.to_dict() == smolvlm_processor.to_dict()
    assert again.chat_template == SMOLVLM_CHAT_TEMPLATE


@pytest.mark.skipif(HAS_TORCHVISION, reason="plain AutoProcessor builds SmolVLMProcessor where torchvision is")
def test_smolvlm_without_torchvision_loads_the_processor_without_video(smolvlm_dir, smolvlm_processor, tmp_path):
    with pytest.raises(ImportError, match="SmolVLMVideoProcessor requires the Torchvision library"):
        AutoProcessor.from_pretrained(smolvlm_dir)  # the reason for SMOLVLM.load_processor's fallback
    assert type(smolvlm_processor) is image_text_processor_class("SmolVLMProcessor")
    assert type(smolvlm_processor).__name__ == "SmolVLMImageTextProcessor"
    assert isinstance(smolvlm_processor.image_processor, SmolVLMImageProcessorPil)
    refusal = "SmolVLMProcessor's video processor needs torchvision, which is not installed"
    with pytest.raises(ValueError, match=f"SmolVLMImageTextProcessor takes images and text only, but found videos: "
                                         f"{refusal}"):
        smolvlm_processor(text="<video>What?", videos=[np.zeros((2, 32, 32, 3), dtype=np.uint8)])
    video_chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ValueError, match=f"found a video in the chat: {refusal}"):
        smolvlm_processor.apply_chat_template(video_chat)
    ds = video_dataset(smolvlm_processor, SMOLVLM, tmp_path)
    with pytest.raises(ValueError, match=r"video.json:0: 1 video\(s\), but the smolvlm family takes images only: "
                                         r"video training is not supported yet \(its video processor needs "
                                         r"torchvision, an optional GPU extra\)"):
        ds[0]


def test_smolvlm_saved_folder_loads_with_plain_auto_processor(smolvlm_dir):
    pytest.importorskip("torchvision")
    from transformers import SmolVLMProcessor

    processor = AutoProcessor.from_pretrained(smolvlm_dir)
    assert type(processor) is SmolVLMProcessor and processor.chat_template == SMOLVLM_CHAT_TEMPLATE


def smolvlm_sample(tokenizer, image_processor, files: list[str]) -> tuple[str, dict]:
    """One SmolVLM sample as its processor builds it: the image processor's tiles and the text with each <image>
    replaced by its documented expansion (rows and cols from the image processor)."""
    pixels = image_processor(images_of(files), return_row_col_info=True, return_tensors="pt")
    blocks = [image_text(int(rows), int(cols), SMOLVLM.tiny_image_seq_len())
              for rows, cols in zip(pixels["rows"][0], pixels["cols"][0])]
    return f"<|im_start|>User:{''.join(blocks)}What?{EOU}\nAssistant: Two.{EOU}\n", pixels


def test_smolvlm_batches_pad_images_as_its_image_processor_does(smolvlm_dir, smolvlm_model):
    """SmolVLM's image processor on each sample, collated (``collate_media``), equals it on both samples at once;
    the model's loss on the collated batch equals its loss on the processor's."""
    tokenizer = AutoTokenizer.from_pretrained(smolvlm_dir)
    image_processor = SmolVLMImageProcessorPil.from_pretrained(smolvlm_dir)
    files = [["red_circle.jpg", "green_bar_tall.jpg"], ["gray_square_l.png"]]
    samples = [smolvlm_sample(tokenizer, image_processor, f) for f in files]
    both = image_processor([images_of(group) for group in files], return_tensors="pt")
    # red_circle 2 x 2 tiles + global, green_bar_tall (100 x 400) 2 x 1 + global; gray_square_l 2 x 2 + global
    assert both["pixel_values"].shape == (2, 8, 3, 32, 32)
    for key in ("pixel_values", "pixel_attention_mask"):
        collated = SMOLVLM.collate_media(key, [pixels[key] for _, pixels in samples])
        assert torch.equal(collated, both[key]), key
    encoded = tokenizer([text for text, _ in samples], padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE)
    batch = {**encoded, "labels": labels, "pixel_attention_mask": both["pixel_attention_mask"]}
    ours = {k: SMOLVLM.collate_media(k, [p[k] for _, p in samples]) for k in ("pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        theirs = smolvlm_model(**batch, pixel_values=both["pixel_values"]).loss
        torch.testing.assert_close(smolvlm_model(**{**batch, **ours}).loss, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_the_dummy_pass_reaches_the_connector_and_leaves_loss_and_gradients_alone(model_type, request, tmp_path):
    """One process, LLM frozen: a text-only batch runs vision_model and connector as a rank of a larger run would."""
    model = request.getfixturevalue(f"{model_type}_model")
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(f"{model_type}_dir"))
    trainer, connector = projector_only_trainer(model, family_for(model_type), tmp_path)
    assert connector and all(n.startswith("model.connector.") for n in connector)
    ids = tokenizer(f"User: Hi{EOU}\nAssistant: Hello.{EOU}\n", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    calls: list[int] = []
    handle = model.model.vision_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        assert len(calls) == 1
        loss.backward()
        assert all(p.grad is not None and not p.grad.any() for p in connector.values())
        with torch.no_grad():
            assert torch.equal(loss.detach(), model(**batch).loss)
    finally:
        handle.remove()
        for param in model.parameters():
            param.requires_grad_(True)
            param.grad = None


@pytest.mark.parametrize("name", NAMES)
def test_smolvlm_items_are_what_its_processor_builds(smolvlm_dataset, smolvlm_oracle, name):
    item = smolvlm_dataset[NAMES.index(name)]
    _, expected = oracle(smolvlm_oracle, CASES[name])
    assert item["input_ids"][0] == smolvlm_oracle.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(item[key], expected[key][0]), key
    for key in ("pixel_values", "pixel_attention_mask"):
        assert (key in item) == (key in expected) and (key not in item or torch.equal(item[key], expected[key])), key
    if CASES[name][2]:  # tiles of 32 (longest edge 64): 2 x 2 + global per image
        assert item["pixel_values"].shape == (1, 5 * len(CASES[name][2]), 3, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_smolvlm_labels_are_the_answers_and_their_end_of_utterance(smolvlm_dataset, smolvlm_oracle, name):
    assert_labels(smolvlm_dataset, smolvlm_oracle, name)


@pytest.fixture(scope="module")
def ddp_run(idefics3_dir, tmp_path_factory):
    """4 SGD steps, 2 DDP ranks x 1 sample (gloo), on the demo images + text-only data."""
    out = tmp_path_factory.mktemp("idefics3_runs") / "two"
    run_training(sgd_args(idefics3_dir, out, max_steps=4, batch_size=1), ranks=2)
    return out


def test_two_ddp_ranks_train_and_the_saved_folder_loads_and_generates(ddp_run, idefics3_dir):
    moved = moved_parameters(ddp_run, idefics3_dir)
    assert {IDEFICS3.classify_parameter(name) for name in moved} == {LLM, PROJECTOR}  # the tower stays
    assert_logged_steps(ddp_run, 4)

    model = AutoModelForImageTextToText.from_pretrained(ddp_run)
    processor = AutoProcessor.from_pretrained(ddp_run)
    assert isinstance(model, Idefics3ForConditionalGeneration) and isinstance(processor, Idefics3Processor)
    assert processor.chat_template == IDEFICS3_CHAT_TEMPLATE
    assert_generates(model, processor)
