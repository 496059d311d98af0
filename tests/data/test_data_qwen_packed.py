"""qwenvl/data/data_qwen_packed.py: packed files from tools/pack_data.py train exactly like the same samples unpacked.

Oracles: ``LazySupervisedDataset`` items of the same samples (built from the source file), and the
padded batch of those samples through the tiny model (float32): the packed group's flattened row
must give the same loss, in a forward pass and in the first logged step of a real training run.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import qwenvl.data as registry
from qwenvl.data import data_list
from qwenvl.data.data_qwen import (
    BAD_SAMPLES_KEY,
    BadSampleError,
    Problem,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    flatten_instances,
    load_annotations,
    make_supervised_data_module,
)
from qwenvl.data.data_qwen_packed import PackedDataCollatorForSupervisedDataset, PackedSupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments
from tests.conftest import PYTHON, REPO_ROOT, python_env
from tools.pack_data import main as pack_main

PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, video_min_frame_pixels=4 * 28 * 28,
              video_max_frame_pixels=16 * 28 * 28)
MAX_LENGTH = 4096


def canonical(sample) -> str:
    return json.dumps(sample, sort_keys=True)


def demo_pick() -> list[dict]:
    """One sample of every kind: image, text, multi-image, grounding, video + image, two videos."""
    picks = [("demo_single_image", 0), ("demo_text_only", 2), ("demo_multi_image", 0), ("demo_grounding", 1),
             ("demo_video", 3), ("demo_video", 2), ("demo_single_image", 3)]
    return [load_annotations(data_list([name])[0]["annotation_path"])[i] for name, i in picks]


@pytest.fixture(scope="module")
def packed_files(tiny_model_dir, tmp_path_factory):
    """The picked samples as a source file, packed into one group and into several small ones."""
    folder = tmp_path_factory.mktemp("packed")
    demo = data_list(["demo_single_image"])[0]["data_path"]
    source = folder / "picked.json"
    source.write_text(json.dumps(demo_pick()))
    flags = ["--data_path", demo, "--model_name_or_path", str(tiny_model_dir), "--model_max_length",
             str(MAX_LENGTH)] + [f"--{k}={v}" for k, v in PIXELS.items()]
    (one,) = pack_main([str(source), "--output", str(folder / "one_pack.json"), "--pack_length", "4096", *flags])
    (small,) = pack_main([str(source), "--output", str(folder / "small_pack.json"), "--pack_length", "300", *flags])
    assert one.num_bins == 1 and small.num_bins >= 3 and small.num_packed == one.num_packed == 7
    entries = {"picked_src": source, "picked_one_pack": folder / "one_pack.json",
               "picked_small_pack": folder / "small_pack.json"}
    for name, path in entries.items():
        registry.data_dict[name] = {"annotation_path": str(path), "data_path": demo}
    yield {"folder": folder, "demo": demo, "small": small}
    for name in entries:
        registry.data_dict.pop(name, None)


def datasets(tokenizer, image_processor, packed_use, policy="error"):
    cfg = VisionConfig.from_image_processor(image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"])
    args = DataArguments(dataset_use=packed_use, **PIXELS)
    packed = PackedSupervisedDataset(tokenizer, args, cfg, model_max_length=MAX_LENGTH, bad_sample_policy=policy)
    source = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=MAX_LENGTH, dataset_use="picked_src")
    return packed, source


def assert_same_item(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}: {key}"
        else:
            assert a[key] == b[key], f"{where}: {key}"


def test_groups_hold_the_source_samples_built_exactly_like_unpacked(packed_files, tokenizer, image_processor):
    packed, source = datasets(tokenizer, image_processor, "picked_small_pack")
    by_sample = {canonical(r): i for i, r in enumerate(source.records)}
    assert len(packed) == packed_files["small"].num_bins
    seen = []
    for g in range(len(packed)):
        group = packed[g]
        assert isinstance(group, list) and len(group) == len(packed.groups[g])
        assert sum(len(item["input_ids"]) for item in group) <= 300
        for position, item in enumerate(group):
            i = by_sample[canonical(packed.records[packed.groups[g][position]])]
            assert_same_item(item, source[i], f"group {g} sample {position}")
            seen.append(i)
    assert sorted(seen) == list(range(len(source)))
    assert packed.lengths == [sum(source.rough_lengths()[by_sample[canonical(packed.records[i])]] for i in members)
                              for members in packed.groups]


def test_collator_flattens_every_sample_of_every_group(packed_files, tokenizer, image_processor):
    packed, _ = datasets(tokenizer, image_processor, "picked_small_pack")
    groups = [packed[0], packed[1]]
    batch = PackedDataCollatorForSupervisedDataset()(groups)
    reference = flatten_instances(groups[0] + groups[1])
    assert batch.keys() == reference.keys() and "attention_mask" not in batch
    for key in batch:
        assert torch.equal(batch[key], reference[key]), key
    total = sum(len(x["input_ids"]) for g in groups for x in g)
    assert batch["position_ids"].shape == (4, 1, total)
    starts = [0]
    for x in groups[0] + groups[1]:
        starts.append(starts[-1] + len(x["input_ids"]))
    assert [int(s) for s in torch.nonzero(batch["position_ids"][0, 0] == 0).flatten()] == starts[:-1]
    # plain sample items (an unpacked eval set) go through the same collator
    single = PackedDataCollatorForSupervisedDataset()([groups[0][0], groups[1][0]])
    assert torch.equal(single["input_ids"], flatten_instances([groups[0][0], groups[1][0]])["input_ids"])


def test_make_supervised_data_module_picks_the_packed_dataset_and_collator(packed_files, tokenizer, image_processor):
    cfg = VisionConfig.from_image_processor(image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"])
    args = DataArguments(dataset_use="picked_small_pack", data_packing=True, **PIXELS)
    module = make_supervised_data_module(tokenizer, args, cfg, model_max_length=MAX_LENGTH)
    assert isinstance(module["train_dataset"], PackedSupervisedDataset)
    assert isinstance(module["data_collator"], PackedDataCollatorForSupervisedDataset)


def padded_reference_loss(model_dir: Path, tokenizer, items: list[dict]) -> tuple[torch.Tensor, torch.nn.Module]:
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.eval()
    with torch.no_grad():
        return model(**DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)).loss, model


def test_packed_group_loss_equals_the_padded_batch_of_its_samples(packed_files, tiny_model_dir, tokenizer,
                                                                   image_processor):
    packed, _ = datasets(tokenizer, image_processor, "picked_one_pack")
    group = packed[0]
    assert len(group) == 7 and any("pixel_values_videos" in x for x in group)
    padded_loss, model = padded_reference_loss(tiny_model_dir, tokenizer, group)
    with torch.no_grad():
        packed_loss = model(**PackedDataCollatorForSupervisedDataset()([group])).loss
    assert torch.isfinite(padded_loss)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)


TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    import qwenvl.data as registry
    from qwenvl.train.train_qwen import train
    registry.data_dict["picked_one_pack"] = {"annotation_path": sys.argv[1], "data_path": sys.argv[2]}
    train(sys.argv[3:])
""")


@pytest.mark.slow
def test_training_with_data_packing_logs_the_unpacked_loss(packed_files, tiny_model_dir, tokenizer, image_processor,
                                                           tmp_path):
    """`--data_packing True` end to end (HF Trainer, one step): the logged loss is the padded batch's loss."""
    folder, demo = packed_files["folder"], packed_files["demo"]
    output = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_use", "picked_one_pack",
            "--data_packing", "True", "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
            "--output_dir", str(output), "--max_steps", "1", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--attn_implementation", "sdpa", "--use_cpu", "True",
            "--model_max_length", str(MAX_LENGTH), "--seed", "42"] + [f"--{k}={v}" for k, v in PIXELS.items()]
    done = subprocess.run([PYTHON, "-c", TRAIN_SCRIPT, str(folder / "one_pack.json"), demo, *argv], cwd=REPO_ROOT,
                          env=python_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry["loss"] for entry in history if "loss" in entry]
    packed, _ = datasets(tokenizer, image_processor, "picked_one_pack")
    padded_loss, _ = padded_reference_loss(tiny_model_dir, tokenizer, packed[0])
    assert len(logged) == 1
    assert abs(logged[0] - padded_loss.item()) < 1e-5, (logged, padded_loss.item())


def test_errors_name_the_packed_file_group_and_sample(packed_files, tokenizer, image_processor, tmp_path):
    with pytest.raises(ValueError, match=r"picked\.json:0: expected a group \(a non-empty list of samples\) but found "
                                         r"a dict; with --data_packing True"):
        datasets(tokenizer, image_processor, "picked_src")
    groups = json.loads((packed_files["folder"] / "small_pack.json").read_text())
    groups[1][-1] = dict(groups[1][-1], image="images/no_such_file.jpg")
    broken = tmp_path / "broken_pack.json"
    broken.write_text(json.dumps(groups))
    registry.data_dict["broken_pack"] = {"annotation_path": str(broken), "data_path": packed_files["demo"]}
    try:
        packed, _ = datasets(tokenizer, image_processor, "broken_pack")
        with pytest.raises(BadSampleError, match=rf"broken_pack\.json:1: sample {len(groups[1]) - 1} of the group: "
                                                 r"image 0: image file not found: .*no_such_file\.jpg"):
            packed[1]
        assert packed[0]  # other groups still load
        # --bad_sample_policy skip: the bad sample is dropped from its group's row and reported; the rest trains
        skipping, _ = datasets(tokenizer, image_processor, "broken_pack", policy="skip")
        group = skipping[1]
        (problem,) = [x for x in group if isinstance(x, Problem)]
        assert (problem.annotation_path, problem.index, problem.kind) == (str(broken), 1, "missing_media")
        batch = PackedDataCollatorForSupervisedDataset(tokenizer.pad_token_id)([group])
        assert batch[BAD_SAMPLES_KEY] == [problem]
        assert torch.equal(batch["input_ids"], flatten_instances(group[:-1])["input_ids"])
    finally:
        del registry.data_dict["broken_pack"]


class PackedFailsUnexpectedly(PackedSupervisedDataset):
    """A failure no check foresees, raised by the second sample of the first group (``get_item``)."""

    def get_item(self, i):
        if i == self.groups[0][1]:
            raise TypeError("no check foresaw this")
        return super().get_item(i)


def test_packed_samples_go_through_the_bad_sample_policy(packed_files, tokenizer, image_processor):
    """Packed rows are loaded with load_sample: an unexpected error is that sample's problem (skip) or names it."""
    cfg = VisionConfig.from_image_processor(image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"])
    args = DataArguments(dataset_use="picked_one_pack", **PIXELS)
    skipping = PackedFailsUnexpectedly(tokenizer, args, cfg, model_max_length=MAX_LENGTH, bad_sample_policy="skip")
    group = skipping[0]
    pack = str(packed_files["folder"] / "one_pack.json")
    assert group[1] == Problem("picked_one_pack", pack, 0, "unexpected_error",
                               "sample 1 of the group: unexpected error: TypeError: no check foresaw this")
    assert all(isinstance(item, dict) for position, item in enumerate(group) if position != 1)
    batch = PackedDataCollatorForSupervisedDataset()([group])
    assert batch[BAD_SAMPLES_KEY] == [group[1]]
    stopping = PackedFailsUnexpectedly(tokenizer, args, cfg, model_max_length=MAX_LENGTH, bad_sample_policy="error")
    with pytest.raises(TypeError) as info:
        stopping[0]
    assert info.value.__notes__ == [f"while loading sample {pack}:0"]
