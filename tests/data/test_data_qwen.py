"""qwenvl/data/data_qwen.py: tokens, labels, pixels and collators on the demo data with the real tokenizer.

The expected token ids come from references written independently of the code:
the chat string spelled out by hand per SPEC 5, and the checkpoint's own chat
template; grids come from transformers' image processor.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenvl.data import data_list
from qwenvl.data.data_qwen import (
    IGNORE_INDEX,
    ChatEncoder,
    Conversation,
    DataCollatorForSupervisedDataset,
    FlattenedDataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    load_annotations,
    parse_conversation,
)
from qwenvl.data.vision import VisionConfig, open_image
from qwenvl.train.argument import DataArguments

IMAGE_DATASETS = ["demo_single_image", "demo_multi_image", "demo_grounding", "demo_text_only"]
MIN, MAX = 16 * 28 * 28, 576 * 28 * 28


@pytest.fixture(scope="module")
def reference_processor():
    return Qwen2VLImageProcessorPil(min_pixels=MIN, max_pixels=MAX)


@pytest.fixture(scope="module")
def vision_config(reference_processor):
    return VisionConfig.from_image_processor(reference_processor, MIN, MAX)


def make_dataset(tokenizer, vision_config, dataset_use, model_max_length=8192, **kwargs):
    args = DataArguments(dataset_use=dataset_use)
    return LazySupervisedDataset(tokenizer, args, vision_config, model_max_length=model_max_length, **kwargs)


def demo_samples(name):
    config = data_list([name])[0]
    return config, load_annotations(config["annotation_path"])


def sample_image_list(sample):
    out = []
    for key in ("image", "images"):
        value = sample.get(key)
        if value is not None:
            out.extend(value if isinstance(value, list) else [value])
    return out


def reference_grid(source, data_path, processor):
    if source.startswith("data:") or "." not in source:
        image = open_image(source)
    else:
        image = ImageOps.exif_transpose(Image.open(f"{data_path}/{source}")).convert("RGB")
    return processor(images=[image], return_tensors="np")["image_grid_thw"][0].tolist()


def hand_written_chat(sample, pad_counts):
    """The SPEC 5 chat string, written out by hand."""
    turns = list(sample["conversations"])
    system = "You are a helpful assistant."
    if turns[0]["from"] == "system":
        system = turns.pop(0)["value"]
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    counts = iter(pad_counts)
    for turn in turns:
        role = "user" if turn["from"] == "human" else "assistant"
        value = re.sub(
            "<image>",
            lambda _: "<|vision_start|>" + "<|image_pad|>" * next(counts) + "<|vision_end|>",
            turn["value"],
        )
        text += f"<|im_start|>{role}\n{value}<|im_end|>\n"
    return text


def all_demo_items(tokenizer, vision_config, reference_processor):
    for name in IMAGE_DATASETS:
        config, samples = demo_samples(name)
        dataset = make_dataset(tokenizer, vision_config, name)
        assert len(dataset) == len(samples)
        for index, sample in enumerate(samples):
            grids = [reference_grid(s, config["data_path"], reference_processor) for s in sample_image_list(sample)]
            yield name, index, sample, grids, dataset[index]


def test_every_demo_sample_matches_the_hand_written_chat(tokenizer, vision_config, reference_processor):
    seen = 0
    for name, index, sample, grids, item in all_demo_items(tokenizer, vision_config, reference_processor):
        pad_counts = [t * h * w // 4 for t, h, w in grids]
        expected = tokenizer(hand_written_chat(sample, pad_counts), add_special_tokens=False)["input_ids"]
        assert item["input_ids"].tolist() == expected, f"{name}[{index}]"
        seen += 1
    assert seen >= 20


def test_labels_are_exactly_the_answers(tokenizer, vision_config, reference_processor):
    for name, index, sample, _, item in all_demo_items(tokenizer, vision_config, reference_processor):
        labels, ids = item["labels"], item["input_ids"]
        learned = (labels != IGNORE_INDEX).numpy()
        assert torch.equal(labels[learned], ids[learned])
        # contiguous learned runs, decoded, are the answers followed by <|im_end|>\n
        edges = np.flatnonzero(np.diff(np.concatenate([[0], learned.astype(int), [0]])))
        runs = [tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
        answers = [t["value"] + "<|im_end|>\n" for t in sample["conversations"] if t["from"] == "gpt"]
        assert runs == answers, f"{name}[{index}]"


def test_pad_counts_and_pixel_rows_follow_the_grids(tokenizer, vision_config, reference_processor):
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    multi = 0
    for name, index, sample, grids, item in all_demo_items(tokenizer, vision_config, reference_processor):
        if not grids:
            assert "pixel_values" not in item and "image_grid_thw" not in item
            continue
        assert item["image_grid_thw"].tolist() == grids
        assert int((item["input_ids"] == image_pad).sum()) == sum(t * h * w // 4 for t, h, w in grids)
        assert item["pixel_values"].shape == (sum(t * h * w for t, h, w in grids), 1176)
        multi += len(grids) > 1
    assert multi >= 3


def test_chat_template_of_the_checkpoint_agrees(tokenizer, vision_config, reference_processor):
    """The checkpoint's own chat template (one pad per image, expanded like the processor) is the oracle."""
    config, samples = demo_samples("demo_multi_image")
    dataset = make_dataset(tokenizer, vision_config, "demo_multi_image")
    for index, sample in enumerate(samples):
        grids = [reference_grid(s, config["data_path"], reference_processor) for s in sample_image_list(sample)]
        messages = []
        for turn in sample["conversations"]:
            role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
            if role == "user":
                parts = []
                for n, piece in enumerate(turn["value"].split("<image>")):
                    if n:
                        parts.append({"type": "image"})
                    if piece:
                        parts.append({"type": "text", "text": piece})
                messages.append({"role": role, "content": parts})
            else:
                messages.append({"role": role, "content": turn["value"]})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        counts = iter(t * h * w // 4 for t, h, w in grids)
        text = re.sub(re.escape("<|image_pad|>"), lambda _: "<|image_pad|>" * next(counts), text)
        assert dataset[index]["input_ids"].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


class _ShiftedTokenizer:
    """The real tokenizer with every id moved by +7: nothing may assume Qwen's numbers."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.unk_token_id = None

    def convert_tokens_to_ids(self, token):
        return self.inner.convert_tokens_to_ids(token) + 7

    def __call__(self, texts, add_special_tokens=False):
        ids = self.inner(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [[t + 7 for t in row] for row in ids]}


def test_encoder_uses_the_tokenizers_ids(tokenizer):
    conversation = Conversation(None, [("user", "<image>\nhi"), ("assistant", "yo")])
    ids, labels = ChatEncoder(tokenizer).encode(conversation, [3], [])
    shifted_ids, shifted_labels = ChatEncoder(_ShiftedTokenizer(tokenizer)).encode(conversation, [3], [])
    np.testing.assert_array_equal(shifted_ids, ids + 7)
    np.testing.assert_array_equal(shifted_labels == IGNORE_INDEX, labels == IGNORE_INDEX)


def test_system_turn_replaces_default_and_leading_gpt_is_dropped():
    conv = parse_conversation({"conversations": [
        {"from": "system", "value": "Be terse."}, {"from": "gpt", "value": "stray"},
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert conv == Conversation("Be terse.", [("user", "q"), ("assistant", "a")])
    conv = parse_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert conv.turns == [("user", "q"), ("assistant", "a")]


def test_tag_count_mismatch_names_file_and_index(tokenizer, vision_config, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    annotation = tmp_path / "bad.json"
    annotation.write_text('[{"image": ["a.png", "a.png"], "conversations": '
                          '[{"from": "human", "value": "<image> one tag"}, {"from": "gpt", "value": "x"}]}]')
    import qwenvl.data as registry

    registry.data_dict["tmp_bad"] = {"annotation_path": str(annotation), "data_path": str(tmp_path)}
    try:
        dataset = make_dataset(tokenizer, vision_config, "tmp_bad")
        with pytest.raises(ValueError, match=re.escape(f"{annotation}:0: 1 <image> tag(s) in the conversation but "
                                                       "2 media item(s)")):
            dataset[0]
    finally:
        del registry.data_dict["tmp_bad"]


def test_text_only_overflow_is_truncated_but_vision_blocks_are_never_cut(tokenizer, vision_config):
    full_text = make_dataset(tokenizer, vision_config, "demo_text_only")[0]
    limit = len(full_text["input_ids"]) - 3
    item = make_dataset(tokenizer, vision_config, "demo_text_only", model_max_length=limit)[0]
    assert torch.equal(item["input_ids"], full_text["input_ids"][:limit])
    assert torch.equal(item["labels"], full_text["labels"][:limit])
    answer_start = int(torch.nonzero(full_text["labels"] != IGNORE_INDEX)[0])
    with pytest.raises(ValueError, match="no answer token survives"):
        make_dataset(tokenizer, vision_config, "demo_text_only", model_max_length=answer_start)[0]
    full = make_dataset(tokenizer, vision_config, "demo_single_image")[0]
    limit = len(full["input_ids"]) - 1
    images = make_dataset(tokenizer, vision_config, "demo_single_image", model_max_length=limit)
    if (full["labels"][:limit] != IGNORE_INDEX).any():
        assert torch.equal(images[0]["input_ids"], full["input_ids"][:limit])
    cut_inside = int(torch.nonzero(full["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>"))[3])
    images = make_dataset(tokenizer, vision_config, "demo_single_image", model_max_length=cut_inside)
    with pytest.raises(ValueError, match="over-length: .* would split a vision block"):
        images[0]


def _three_samples(tokenizer, vision_config):
    single = make_dataset(tokenizer, vision_config, "demo_single_image")
    multi = make_dataset(tokenizer, vision_config, "demo_multi_image")
    text = make_dataset(tokenizer, vision_config, "demo_text_only")
    return [single[0], text[1], multi[0]]


def test_padded_collator(tokenizer, vision_config):
    items = _three_samples(tokenizer, vision_config)
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    longest = max(len(x["input_ids"]) for x in items)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["position_ids"].shape == (3, 3, longest)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], x["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["position_ids"][:, row, n:] == 1).all()
        assert batch["attention_mask"][row].sum() == n
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["image_grid_thw"].shape[0] == 1 + len(items[2]["image_grid_thw"])


def test_flattened_collator(tokenizer, vision_config):
    items = _three_samples(tokenizer, vision_config)
    batch = FlattenedDataCollatorForSupervisedDataset()(items)
    total = sum(len(x["input_ids"]) for x in items)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, total) and batch["position_ids"].shape == (4, 1, total)
    start = 0
    for x in items:
        n = len(x["input_ids"])
        assert batch["position_ids"][0, 0, start:start + n].tolist() == list(range(n))
        assert torch.equal(batch["position_ids"][1:, 0, start:start + n], x["position_ids"])
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, start + 1:start + n], x["labels"][1:])
        start += n
