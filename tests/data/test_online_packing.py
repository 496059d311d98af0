"""Online packing (``--data_packing True`` on an unpacked dataset) and the exact length counts behind it.

Oracles: the unpacked ``LazySupervisedDataset`` (its items' ``len(input_ids)`` for the counts, its
items for the bins' contents) and the padded batch of a bin's samples through the tiny model
(float32) for the loss of the packed row.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import qwenvl.data as registry
from qwenvl.data import data_list
from qwenvl.data.data_qwen import (
    BadSampleError,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    OnlinePackedDataset,
    PackedDataCollatorForSupervisedDataset,
    Problem,
    load_annotations,
    make_supervised_data_module,
)
from qwenvl.data.packing import BAD, first_fit_decreasing, offline_packed, plan_bins
from qwenvl.data.vision import VisionConfig
from qwenvl.train.guards import dataset_sample_refs
from qwenvl.train.argument import DataArguments

PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, video_min_frame_pixels=4 * 28 * 28,
              video_max_frame_pixels=16 * 28 * 28)
MAX_LENGTH = 1024
EVERY_KIND = "demo_single_image,demo_text_only,demo_multi_image,demo_grounding,demo_video"


def datasets(tokenizer, image_processor, use=EVERY_KIND, pack_length=MAX_LENGTH, policy="error", seed=42, **flags):
    cfg = VisionConfig.from_image_processor(image_processor, flags.get("min_pixels", PIXELS["min_pixels"]),
                                            flags.get("max_pixels", PIXELS["max_pixels"]))
    args = DataArguments(dataset_use=use, count_workers=1, **(PIXELS | flags))
    common = dict(model_max_length=MAX_LENGTH, bad_sample_policy=policy, seed=seed)
    packed = OnlinePackedDataset(tokenizer, args, cfg, pack_length=pack_length, **common)
    return packed, LazySupervisedDataset(tokenizer, args, cfg, **common)


# ----------------------------------------------------------------- pure functions
def test_plan_bins_puts_every_sample_in_exactly_one_bin_within_pack_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 900, size=5000)
    lengths[[7, 99]] = 1500  # longer than a bin: alone
    lengths[[3, 4]] = BAD  # rejected by the count: weigh nothing
    plan = plan_bins(lengths, 1024, seed=1)
    assert sorted(plan.members.tolist()) == list(range(5000))
    sizes = np.where(lengths == BAD, 0, lengths)
    for b in range(len(plan)):
        members = plan.bin(b)
        assert plan.tokens[b] == sizes[members].sum()
        assert plan.tokens[b] <= 1024 or (len(members) == 1 and sizes[members[0]] == 1500)
    assert plan.oversize == 2
    # first fit decreasing: no bin but the last opened could take the next bin's smallest item
    lower_bound = int(np.ceil(sizes.sum() / 1024))
    assert len(plan) <= lower_bound * 1.02 + 3, (len(plan), lower_bound)
    assert plan.fill > 0.97


def test_plan_bins_is_seeded_same_seed_same_bins_other_seed_same_shape():
    lengths = np.array([5, 3, 5, 3, 5, 3, 2, 2, 8, 1] * 50)
    a, b, c = plan_bins(lengths, 16, seed=1), plan_bins(lengths, 16, seed=1), plan_bins(lengths, 16, seed=2)
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()  # equal-length samples trade places
    assert a.tokens.tolist() == c.tokens.tolist()  # the bins' lengths do not change
    assert first_fit_decreasing([3, 7, 5, 2, 9], 10) == [[4], [1, 0], [2, 3]]


# ---------------------------------------------------------------- on demo data
def test_exact_counts_equal_the_built_items_and_are_cached(tokenizer, image_processor):
    packed, lazy = datasets(tokenizer, image_processor)
    counts = packed.exact_lengths()
    assert counts.length.tolist() == [len(lazy[i]["input_ids"]) for i in range(len(lazy))]
    # --group_by_length's lengths are the same exact counts, read from the same cache
    assert lazy.lengths == counts.length.tolist() and lazy.exact_lengths().counted == 0
    again, _ = datasets(tokenizer, image_processor)
    assert again.exact_lengths().counted == 0  # read from the cache next to the annotation store
    assert again.plan.digest() == packed.plan.digest()
    store = Path(packed.annotations.stores[0].path)
    assert len(list(store.parent.glob(f"{store.stem}.plan-*.npz"))) == 1  # planned once, then loaded
    # another pixel limit changes the counts: counted again, not read from the other setting's cache
    smaller, smaller_lazy = datasets(tokenizer, image_processor, use="demo_single_image", max_pixels=16 * 28 * 28)
    assert smaller.exact_lengths().counted == len(smaller_lazy)
    assert smaller.exact_lengths().length.tolist() == [len(x["input_ids"]) for x in smaller_lazy]


def test_bins_hold_every_sample_once_built_exactly_like_unpacked(tokenizer, image_processor):
    packed, lazy = datasets(tokenizer, image_processor, pack_length=700)
    seen = Counter()
    for g in range(len(packed)):
        group = packed[g]
        assert sum(len(item["input_ids"]) for item in group) <= 700
        for position, i in enumerate(packed.plan.bin(g).tolist()):
            reference = lazy[i]
            assert group[position].keys() == reference.keys()
            for key, value in reference.items():
                same = torch.equal(group[position][key], value) if isinstance(value, torch.Tensor) else \
                    group[position][key] == value
                assert same, (g, i, key)
            seen[i] += 1
    assert seen == Counter(range(len(lazy)))
    # the non-finite guard names a step's samples from the bin's members
    assert dataset_sample_refs(packed, 0) == [lazy.refs[i] for i in packed.plan.bin(0).tolist()]
    assert len(packed) < len(lazy) / 2  # rows hold several samples
    assert packed.samples_per_dataset() == lazy.samples_per_dataset()


def test_packed_row_loss_equals_the_padded_batch_of_its_samples(tokenizer, image_processor, tiny_model_dir):
    packed, _ = datasets(tokenizer, image_processor, pack_length=MAX_LENGTH)
    g = max(range(len(packed)), key=lambda b: len(packed.plan.bin(b)))
    group = packed[g]
    assert len(group) >= 3
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.eval()
    with torch.no_grad():
        padded = model(**DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(group)).loss
        row = model(**PackedDataCollatorForSupervisedDataset(tokenizer.pad_token_id)([group])).loss
    assert torch.isfinite(padded)
    torch.testing.assert_close(row, padded, atol=1e-5, rtol=0)


def test_each_epoch_has_other_bins_of_the_same_lengths(tokenizer, image_processor, tmp_path):
    demo = data_list(["demo_single_image"])[0]
    records = load_annotations(demo["annotation_path"])
    path = tmp_path / "repeated.jsonl"
    path.write_text("".join(json.dumps(records[n % len(records)]) + "\n" for n in range(240)))
    registry.data_dict["repeated_online"] = {"annotation_path": str(path), "data_path": demo["data_path"]}
    try:
        packed, _ = datasets(tokenizer, image_processor, use="repeated_online", pack_length=700)
        first = packed.plan
        bins = [packed.groups[b] for b in range(len(packed))]
        packed.set_epoch(1)
        second = packed.plan
        assert sorted(second.members.tolist()) == list(range(240))  # every sample once in epoch 1 too
        assert second.tokens.tolist() == first.tokens.tolist() and len(packed) == len(bins)
        assert [packed.groups[b] for b in range(len(packed))] != bins  # other samples share a row
        packed.set_epoch(0)
        assert packed.plan.digest() == first.digest()
    finally:
        del registry.data_dict["repeated_online"]


def test_make_supervised_data_module_packs_unpacked_sources_online(tokenizer, image_processor):
    cfg = VisionConfig.from_image_processor(image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"])
    args = DataArguments(dataset_use="demo_text_only,demo_single_image%50", data_packing=True, pack_length=600,
                         count_workers=1, **PIXELS)
    module = make_supervised_data_module(tokenizer, args, cfg, model_max_length=MAX_LENGTH)
    dataset = module["train_dataset"]
    assert isinstance(dataset, OnlinePackedDataset) and dataset.pack_length == 600
    assert isinstance(module["data_collator"], PackedDataCollatorForSupervisedDataset)
    lazy = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=MAX_LENGTH)  # the same %50 subset
    assert sorted(dataset.plan.members.tolist()) == list(range(len(lazy)))
    assert dataset.lengths == dataset.plan.tokens.tolist()


def test_rejected_samples_are_skipped_and_reported_or_raised_before_training(tokenizer, image_processor, tmp_path):
    demo = data_list(["demo_single_image"])[0]["data_path"]
    records = load_annotations(data_list(["demo_single_image"])[0]["annotation_path"])
    records[2] = dict(records[2], image="images/no_such_file.jpg")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    registry.data_dict["broken_online"] = {"annotation_path": str(path), "data_path": demo}
    try:
        with pytest.raises(BadSampleError, match=r"broken\.json:2: image 0: image file not found: .*no_such_file"):
            datasets(tokenizer, image_processor, use="broken_online")
        packed, _ = datasets(tokenizer, image_processor, use="broken_online", policy="skip")
        assert packed.exact_lengths().bad.tolist() == [2]
        (g,) = [b for b in range(len(packed)) if 2 in packed.plan.bin(b).tolist()]
        problems = [x for x in packed[g] if isinstance(x, Problem)]
        assert [(p.index, p.kind) for p in problems] == [(2, "missing_media")]
    finally:
        del registry.data_dict["broken_online"]


def test_packed_and_unpacked_sources_are_not_mixed(tmp_path):
    packed_file = tmp_path / "x_pack.json"
    packed_file.write_text(json.dumps([[{"conversations": []}]]))
    registry.data_dict["x_pack"] = {"annotation_path": str(packed_file), "data_path": ""}
    try:
        assert offline_packed("x_pack") is True
        assert offline_packed("demo_text_only") is False
        with pytest.raises(ValueError, match=r"--data_packing True: x_pack are files from tools/pack_data\.py but "
                                             r"demo_text_only are not"):
            offline_packed("x_pack,demo_text_only")
    finally:
        del registry.data_dict["x_pack"]


SAME, DIFFERENT = ["abc", "abc"], ["abc", "abd"]


def _rank_check(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from qwenvl.data.data_qwen import check_same_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for digests in (SAME, DIFFERENT):
            try:
                check_same_on_every_rank(digests[rank], "the online packing bins")
                results.put((rank, digests[1], "same"))
            except RuntimeError as exc:
                results.put((rank, digests[1], str(exc)))
    finally:
        dist.destroy_process_group()


def test_ranks_with_other_bins_stop_together():
    """Every rank learns that the bins differ (no rank trains on while another one stops)."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_check, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    got = sorted(results.get(timeout=120) for _ in range(4))
    for process in processes:
        process.join(timeout=60)
    differ = ("the online packing bins differ between ranks (ranks [1] disagree with rank 0): their token counts "
              "differ, e.g. a media file readable on one node only")
    assert got == [(0, "abc", "same"), (0, "abd", differ), (1, "abc", "same"), (1, "abd", differ)]


def test_a_count_that_failed_unexpectedly_is_not_cached(tokenizer, image_processor):
    """An exception no check foresaw makes the sample weigh nothing in this run, and the next run counts it."""
    from qwenvl.data.annotations import AnnotationSet
    from qwenvl.data.packing import count_lengths
    from qwenvl.data.token_count import TokenCounter

    class FailsOnce(TokenCounter):
        def count(self, sample, data_path="", annotation_path="", index=0):
            if index == 2:
                raise TypeError("no check foresaw this")
            return super().count(sample, data_path, annotation_path, index)

    cfg = VisionConfig.from_image_processor(image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"])
    args = DataArguments(dataset_use="demo_grounding", **PIXELS)
    annotations = AnnotationSet("demo_grounding", seed=1)
    for store in annotations.stores:  # start without cached counts for these settings
        for path in Path(store.path).parent.glob(f"{Path(store.path).stem}.tokens-*"):
            path.unlink()
    failing = count_lengths(annotations, FailsOnce(tokenizer, args, cfg, 4096), 1, progress=False)
    assert failing.counted == len(annotations) and failing.bad.tolist() == [2]
    again = count_lengths(annotations, TokenCounter(tokenizer, args, cfg, 4096), 1, progress=False)
    assert again.counted == 1 and again.bad.tolist() == []  # only the failed one counted again
    lazy = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=4096)
    assert again.length.tolist() == [len(lazy[i]["input_ids"]) for i in range(len(lazy))]
