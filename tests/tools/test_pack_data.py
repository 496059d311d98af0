"""tools/pack_data.py and qwenvl/data/token_count.py: exact counts, header-only image sizes, packing, cache.

The oracle for every count is the training dataset itself: ``len(LazySupervisedDataset(...)[i]["input_ids"])``,
which decodes every image and video. Packing is checked against a plain first-fit-decreasing loop.
"""

from __future__ import annotations

import json
import random
import re
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import qwenvl.data as registry
from qwenvl.data import data_list
from qwenvl.data.data_qwen import BadSampleError, LazySupervisedDataset, load_annotations
from qwenvl.data.token_count import TokenCounter, tokenizer_fingerprint
from qwenvl.data.vision import ImageError, VisionConfig, open_image, process_image
from qwenvl.train.argument import DataArguments
from tests.conftest import PYTHON, REPO_ROOT, python_env
from tests.data.bad_catalog import CASES, MODEL_MAX_LENGTH, good_record, make_media
from tools.pack_data import first_fit_decreasing, main

DEMO = ["demo_single_image", "demo_multi_image", "demo_grounding", "demo_text_only", "demo_video"]
SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=32 * 28 * 28)  # downscales most demo images


def vision_config(image_processor, min_pixels=16 * 28 * 28, max_pixels=576 * 28 * 28):
    return VisionConfig.from_image_processor(image_processor, min_pixels, max_pixels)


def canonical(sample) -> str:
    return json.dumps(sample, sort_keys=True)


def dataset_outcome(dataset, i):
    """What training sees for sample i: its length, or the kind of error it raises."""
    try:
        return len(dataset[i]["input_ids"])
    except BadSampleError as exc:
        return exc.kind


def counter_outcome(count):
    return count.length if count.ok else count.kind


@pytest.fixture()
def register(monkeypatch):
    def add(name, annotation_path, data_path):
        monkeypatch.setitem(registry.data_dict, name, {"annotation_path": str(annotation_path),
                                                       "data_path": str(data_path)})
        return name
    return add


# ------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("pixels", [{}, SMALL], ids=["default_pixels", "small_pixels"])
def test_count_equals_dataset_length_for_every_demo_sample(tokenizer, image_processor, pixels):
    cfg = vision_config(image_processor, **pixels)
    args = DataArguments(dataset_use=",".join(DEMO), **pixels)
    dataset = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=8192)
    counter = TokenCounter(tokenizer, args, cfg, model_max_length=8192)
    kinds = Counter()
    for i, (record, ref) in enumerate(zip(dataset.records, dataset.refs)):
        count = counter.count(record, ref.data_path)
        assert count.kind == "ok", f"{ref.annotation_path}:{ref.index}: {count}"
        assert count.length == len(dataset[i]["input_ids"]), f"{ref.annotation_path}:{ref.index}"
        kinds[ref.dataset] += 1
    assert set(kinds) == set(DEMO) and sum(kinds.values()) >= 37


def test_model_max_length_truncation_and_rejection_agree_with_the_dataset(tokenizer, image_processor):
    """Cut on text, refused through a vision block, no answer left: the counter predicts each outcome."""
    cfg = vision_config(image_processor, **SMALL)
    args = DataArguments(dataset_use=",".join(DEMO), **SMALL)
    seen = Counter()
    for limit in (30, 60, 120):
        dataset = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=limit)
        counter = TokenCounter(tokenizer, args, cfg, model_max_length=limit)
        for i, (record, ref) in enumerate(zip(dataset.records, dataset.refs)):
            count = counter.count(record, ref.data_path)
            assert counter_outcome(count) == dataset_outcome(dataset, i), f"limit {limit}, {ref}"
            seen[count.kind] += 1
    assert seen["truncated"] and seen["over_length"] and seen["no_labels"] and seen["ok"], seen


def make_png_with_trailing_exif(path: Path, image: Image.Image, orientation: int) -> None:
    """A PNG whose eXIf chunk comes after the image data (legal, and missed by a naive header read)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    data = path.read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    exif_chunks = [c for c in chunks if c[4:8] == b"eXIf"]
    assert exif_chunks, "Pillow did not write an eXIf chunk"
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + exif_chunks[0] + rest[-1])  # before IEND, after IDAT


def image_cases(folder: Path) -> list[Path]:
    """Many sizes, modes and containers, and every EXIF orientation."""
    rng = random.Random(0)
    cases = []

    def pattern(mode, size):
        image = Image.new("RGB", size, (rng.randrange(256), 90, 40))
        image.paste((10, 200, 30), (0, 0, max(1, size[0] // 3), max(1, size[1] // 2)))
        return image.convert(mode)

    sizes = [(1, 1), (27, 29), (17, 900), (3000, 20), (640, 480), (480, 640), (1000, 1000), (1920, 1080),
             (5000, 20), (123, 457)]
    for n, size in enumerate(sizes):
        for mode, ext in (("RGB", "jpg"), ("RGBA", "png"), ("RGB", "webp")):
            path = folder / f"s{n}_{mode}.{ext}"
            pattern(mode, size).save(path)
            cases.append(path)
    for mode, ext in (("L", "jpg"), ("CMYK", "jpg"), ("P", "png"), ("LA", "png"), ("I;16", "png"), ("1", "png"),
                      ("RGBA", "webp"), ("P", "gif"), ("RGB", "bmp"), ("RGB", "tiff")):
        path = folder / f"mode_{mode.replace(';', '')}.{ext}"
        pattern(mode, (300, 100)).save(path)
        cases.append(path)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for ext in ("jpg", "png", "webp"):
            path = folder / f"exif{orientation}.{ext}"
            pattern("RGB", (400, 90)).save(path, exif=exif)
            cases.append(path)
        path = folder / f"exif{orientation}_trailing.png"
        make_png_with_trailing_exif(path, pattern("RGB", (400, 90)), orientation)
        cases.append(path)
    path = folder / "xmp_orientation6.jpg"
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/">'
           b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
           b'</rdf:RDF></x:xmpmeta>')
    pattern("RGB", (400, 90)).save(path, xmp=xmp)
    cases.append(path)
    return cases


@pytest.mark.parametrize("pixels", [{}, SMALL], ids=["default_pixels", "small_pixels"])
def test_header_grid_equals_full_preprocessing(tokenizer, image_processor, tmp_path, pixels):
    cfg = vision_config(image_processor, **pixels)
    counter = TokenCounter(tokenizer, DataArguments(**pixels), cfg, model_max_length=None)
    outcomes = {}
    for path in image_cases(tmp_path):
        try:
            decoded = process_image(open_image(str(path)), cfg)[1]
        except ImageError as exc:
            decoded = f"ImageError: {exc}".split(":")[0]
        try:
            header = counter.image_grid(path.name, str(tmp_path))
        except ImageError as exc:
            header = f"ImageError: {exc}".split(":")[0]
        assert header == decoded, path.name
        outcomes[path.name] = decoded
    assert outcomes["s8_RGB.jpg"] == "ImageError"  # 5000x20: aspect ratio over 200, rejected by both
    # Orientations 5-8 swap the sides for the dataset, and so for the count (the test is not vacuous).
    for name in ("exif{}.jpg", "exif{}.png", "exif{}.webp", "exif{}_trailing.png"):
        upright, rotated = outcomes[name.format(1)], outcomes[name.format(6)]
        assert rotated == (1, upright[2], upright[1]) and upright[1] != upright[2], name
    assert outcomes["xmp_orientation6.jpg"] == outcomes["exif6.jpg"]


def test_header_grid_of_a_rotated_tiff(tokenizer, image_processor, tmp_path):
    cfg = vision_config(image_processor)
    counter = TokenCounter(tokenizer, DataArguments(), cfg, model_max_length=None)
    for orientation in (6, 8):
        path = tmp_path / f"tiff_orientation{orientation}.tiff"
        Image.new("RGB", (400, 90), (200, 30, 30)).save(path, tiffinfo={0x0112: orientation})
        decoded = process_image(open_image(str(path)), cfg)[1]
        assert decoded == (1, 28, 6)  # the dataset rotates it
        assert counter.image_grid(path.name, str(tmp_path)) == decoded


# ----------------------------------------------------------------------- packing
def reference_ffd(lengths, capacity):
    """First-fit decreasing, the obvious quadratic way."""
    bins, room = [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[item] > capacity:
            bins.append([item])
            room.append(-1)
            continue
        for b, free in enumerate(room):
            if free >= lengths[item]:
                bins[b].append(item)
                room[b] -= lengths[item]
                break
        else:
            bins.append([item])
            room.append(capacity - lengths[item])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_decreasing_matches_the_plain_loop(seed):
    rng = random.Random(seed)
    lengths = [min(5000, max(1, int(rng.lognormvariate(6.4, 0.9)))) for _ in range(3000)]
    bins = first_fit_decreasing(lengths, 4096)
    assert bins == reference_ffd(lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 4096 or (len(b) == 1 and lengths[b[0]] > 4096)
    assert first_fit_decreasing([], 10) == []


# ------------------------------------------------------------------ the CLI tool
@pytest.fixture(scope="module")
def packed_demo(tiny_model_dir, tmp_path_factory):
    """The CLI, as users run it, on all demo datasets merged into one file."""
    folder = tmp_path_factory.mktemp("packed_demo")
    command = [PYTHON, "tools/pack_data.py", *DEMO, "--model_name_or_path", str(tiny_model_dir),
               "--output", str(folder / "demo_pack.json"), "--cache_dir", str(folder),
               "--pack_length", "1024", "--model_max_length", "4096", "--max_pixels", "64*28*28"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, done.stdout


def test_cli_counts_equal_the_dataset_and_every_sample_is_packed_once(packed_demo, tokenizer, image_processor):
    folder, stdout = packed_demo
    cfg = vision_config(image_processor, max_pixels=64 * 28 * 28)
    args = DataArguments(max_pixels=64 * 28 * 28)
    cached = 0
    for config in data_list(DEMO):
        cache_name = Path(config["annotation_path"]).name.rsplit(".", 1)[0] + "_count.json"
        counts = json.loads((folder / cache_name).read_text())["counts"]
        dataset = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=4096, dataset_use=config["name"])
        assert [c[0] for c in counts] == [len(dataset[i]["input_ids"]) for i in range(len(dataset))], config["name"]
        cached += len(counts)

    groups = json.loads((folder / "demo_pack.json").read_text())
    packed = [canonical(s) for group in groups for s in group]
    expected = [canonical(s) for c in data_list(DEMO) for s in load_annotations(c["annotation_path"])]
    assert Counter(packed) == Counter(expected) and len(packed) == cached
    lengths = {}
    for config in data_list(DEMO):
        cache_name = Path(config["annotation_path"]).name.rsplit(".", 1)[0] + "_count.json"
        counts = json.loads((folder / cache_name).read_text())["counts"]
        for sample, count in zip(load_annotations(config["annotation_path"]), counts):
            lengths[canonical(sample)] = count[0]
    totals = [sum(lengths[canonical(s)] for s in group) for group in groups]
    assert all(t <= 1024 for t in totals) and len(groups) >= -(-sum(totals) // 1024) > 1
    assert f"{len(packed)} packed, 0 left out" in stdout and f"bins: {len(groups)} of 1024 tokens" in stdout
    assert "--data_packing True --dataset_use demo_pack" in stdout


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_cli_counts_equal_the_dataset_under_every_family(tiny_dirs, tmp_path, model_type):
    """The tool's counts (header-only) == len(input_ids) of the family's dataset, every demo sample."""
    from transformers import AutoTokenizer

    from qwenvl.models import family_for
    from qwenvl.models.loading import load_image_processor

    folder = tiny_dirs[model_type]
    main([*DEMO, "--model_name_or_path", str(folder), "--output", str(tmp_path / "demo_pack.json"),
          "--cache_dir", str(tmp_path), "--pack_length", "16384", "--model_max_length", "8192"])
    family = family_for(model_type)
    args = DataArguments()
    cfg = vision_config(load_image_processor(str(folder)), args.min_pixels, args.max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for config in data_list(DEMO):
        cache_name = Path(config["annotation_path"]).name.rsplit(".", 1)[0] + "_count.json"
        counts = json.loads((tmp_path / cache_name).read_text())["counts"]
        dataset = LazySupervisedDataset(tokenizer, args, cfg, model_max_length=8192, dataset_use=config["name"],
                                        family=family, vision_settings=family.vision_settings(folder))
        assert [c[0] for c in counts] == [len(dataset[i]["input_ids"]) for i in range(len(dataset))], config["name"]


def test_second_run_reuses_the_cache_and_changed_settings_recount(packed_demo, tiny_model_dir, tmp_path):
    folder, _ = packed_demo
    common = [*DEMO, "--model_name_or_path", str(tiny_model_dir), "--cache_dir", str(folder),
              "--output", str(tmp_path / "again.json"), "--pack_length", "1024", "--model_max_length", "4096"]
    (again,) = main([*common, "--max_pixels", "64*28*28"])
    assert (again.reused, again.counted) == (again.num_input, 0)
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((folder / "demo_pack.json").read_text())

    (bigger,) = main([*common, "--max_pixels", "576*28*28"])
    assert (bigger.reused, bigger.counted) == (0, bigger.num_input)
    assert bigger.tokens > again.tokens  # larger images -> more tokens: the old counts would have been wrong
    (shorter,) = main([*common, "--max_pixels", "576*28*28", "--model_max_length", "2048"])
    assert shorter.reused == 0
    (same,) = main([*common, "--max_pixels", "576*28*28", "--model_max_length", "2048"])
    assert same.counted == 0


def test_tokenizer_identity_is_part_of_the_key(tiny_model_dir, tokenizer, image_processor):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<my_new_token>"])
    cfg, args = vision_config(image_processor), DataArguments()
    ours = TokenCounter(tokenizer, args, cfg, 4096).settings()
    theirs = TokenCounter(other, args, cfg, 4096).settings()
    assert ours["tokenizer_sha256"] != theirs["tokenizer_sha256"]
    assert tokenizer_fingerprint(tokenizer) == ours["tokenizer_sha256"]


def test_rejected_and_over_length_samples_are_reported_never_silent(tiny_model_dir, tokenizer, image_processor,
                                                                     tmp_path, register, capsys):
    Image.new("RGB", (640, 480), (200, 30, 30)).save(tmp_path / "big.jpg")
    Image.new("RGB", (56, 56), (30, 30, 200)).save(tmp_path / "small.png")
    good = {"image": "small.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                    {"from": "gpt", "value": "Blue."}]}
    long_text = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                                   {"from": "human", "value": "word " * 700}, {"from": "gpt", "value": "ok"}]}
    samples = [
        good,
        {"image": "missing.jpg", "conversations": good["conversations"]},
        {"image": ["small.png", "small.png"], "conversations": good["conversations"]},
        {"image": "big.jpg", "conversations": [{"from": "human", "value": "x " * 400 + "<image>"},
                                               {"from": "gpt", "value": "y"}]},
        long_text,
        {"conversations": [{"from": "human", "value": "word " * 700}, {"from": "gpt", "value": "answer cut away"}]},
        ["not", "a", "sample"],
        {"conversations": [{"from": "robot", "value": "q"}]},
        {"image": "big.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                               {"from": "gpt", "value": "Red."}]},
    ]
    annotation = tmp_path / "mixed.json"
    annotation.write_text(json.dumps(samples))
    (result,) = main([str(annotation), "--data_path", str(tmp_path), "--model_name_or_path", str(tiny_model_dir),
                      "--pack_length", "256", "--model_max_length", "600", "--show_problems", "100"])
    out = capsys.readouterr().out
    dropped = {index: kind for _, index, kind, _ in result.dropped}
    assert dropped == {1: "missing_media", 2: "tag_mismatch", 3: "over_length", 5: "no_labels", 6: "not_object",
                       7: "bad_turn"}
    for index, kind in dropped.items():
        assert f"left out {annotation}:{index}: [{kind}]" in out
    # The dataset agrees on every one of them (kind and reason), and on the lengths of the rest.
    cfg = vision_config(image_processor)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=register("mixed", annotation, tmp_path)),
                                    cfg, model_max_length=600)
    counts = json.loads((tmp_path / "mixed_count.json").read_text())["counts"]
    assert [c[0] if c[2] in ("ok", "truncated") else c[2] for c in counts] == [
        dataset_outcome(dataset, i) for i in range(len(samples))]
    for _, index, kind, reason in result.dropped:
        with pytest.raises(BadSampleError) as caught:
            dataset[index]
        assert (caught.value.kind, caught.value.reason) == (kind, reason)
    assert counts[4][2] == "truncated" and counts[4][0] == 600 and counts[4][1] > 600
    # 640x480 -> 391 image tokens > pack_length 256: kept alone by default, reported either way
    assert result.oversize == 2 and result.truncated == 1 and result.num_packed == 3
    groups = json.loads((tmp_path / "mixed_pack.json").read_text())
    assert sorted(len(g) for g in groups) == [1, 1, 1] and "longer than pack_length: 2 (each kept" in out
    (dropping,) = main([str(annotation), "--data_path", str(tmp_path), "--model_name_or_path", str(tiny_model_dir),
                        "--pack_length", "256", "--model_max_length", "600", "--oversize", "drop",
                        "--output", str(tmp_path / "dropped.json")])
    assert [k for _, _, k, _ in dropping.dropped].count("over_pack_length") == 2 and dropping.num_packed == 1
    assert dropping.reused == len(samples)


def test_percent_subset_is_the_one_training_uses(tiny_model_dir, tokenizer, image_processor, tmp_path, register):
    annotation = tmp_path / "copy.json"
    annotation.write_text(Path(data_list(["demo_single_image"])[0]["annotation_path"]).read_text())
    name = register("copy_ds", annotation, data_list(["demo_single_image"])[0]["data_path"])
    (result,) = main([f"{name}%50", "--model_name_or_path", str(tiny_model_dir), "--seed", "7"])
    assert result.output == tmp_path / "copy_50pct_pack.json"
    packed = Counter(canonical(s) for g in json.loads(result.output.read_text()) for s in g)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=f"{name}%50"), vision_config(image_processor),
                                    seed=7)
    assert packed == Counter(canonical(r) for r in dataset.records) and len(dataset) == 6


def test_inputs_with_different_media_folders_cannot_share_one_file(tiny_model_dir, tmp_path):
    annotation = tmp_path / "elsewhere.json"
    annotation.write_text(json.dumps(load_annotations(data_list(["demo_single_image"])[0]["annotation_path"])))
    with pytest.raises(SystemExit, match="one data_path, but the inputs' media live under different data_paths"):
        main(["demo_single_image", str(annotation), "--data_path", str(tmp_path), "--output",
              str(tmp_path / "x.json"), "--model_name_or_path", str(tiny_model_dir)])
    with pytest.raises(SystemExit, match="error: unknown dataset 'no_such_dataset'.*demo_text_only"):
        main(["no_such_dataset", "--model_name_or_path", str(tiny_model_dir)])


def test_help_documents_the_flags():
    done = subprocess.run([PYTHON, "tools/pack_data.py", "--help"], cwd=REPO_ROOT, env=python_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--pack_length", "--workers", "--max_pixels", "--video_max_frames", "--model_max_length",
                 "--oversize", "--output", "--cache_dir", "_count.json", "_pack.json", "--data_packing True",
                 "--output_dir", "--registry_file", "--dataset_registry", "--bad_sample_policy"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("tool", ["pack_data", "check_image"])
def test_media_flags_parse_after_training_parsed_its_arguments(tool):
    """HfArgumentParser resolves DataArguments' field types in place; the tools must still build their flags."""
    import importlib

    import transformers

    transformers.HfArgumentParser(DataArguments)
    parser = importlib.import_module(f"tools.{tool}").build_parser()
    args = parser.parse_args(["x.json", "--max_pixels", "16*28*28", "--video_max_frames", "6",
                              *(["--model_name_or_path", "m"] if tool == "pack_data" else [])])
    assert (args.max_pixels, args.video_max_frames, args.base_interval) == (16 * 28 * 28, 6, DataArguments().base_interval)


# ------------------------------------------------------------------ issue 9 and 10
HEADER_INVISIBLE = {"truncated_jpeg"}  # its header reads fine: counted as valid (the module docstring says so)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    """The bad-sample catalog as one JSON file (good, case, good, ...) and one JSONL file of the line cases."""
    media = make_media(tmp_path_factory.mktemp("pack_catalog"))
    records, expected = [], {}
    for case in CASES:
        if not case.jsonl:
            records.append(good_record(len(records)))
            expected[len(records)] = case
            records.append(case.record)
    records.append(good_record(len(records)))
    annotation = media / "catalog.json"
    annotation.write_text(json.dumps(records))
    line_cases = [c for c in CASES if c.jsonl]
    jsonl = media / "lines.jsonl"
    jsonl.write_bytes(b"\n".join([json.dumps(good_record(0)).encode()] + [c.line for c in line_cases]) + b"\n")
    return {"media": media, "json": annotation, "expected": expected, "jsonl": jsonl,
            "jsonl_expected": {i + 1: c for i, c in enumerate(line_cases)}}


def catalog_flags(catalog, tiny_model_dir, *extra) -> list[str]:
    return ["--data_path", str(catalog["media"]), "--model_name_or_path", str(tiny_model_dir), "--model_max_length",
            str(MODEL_MAX_LENGTH), "--max_pixels", "64*28*28", "--min_pixels", "16*28*28", "--show_problems", "0",
            *extra]


def from_header(reason: str) -> str:
    """The counter reads image headers only: its wording for the same cause the dataset finds by decoding."""
    return reason.replace(": cannot read the header of ", ": cannot decode ", 1)


def reason_matches(case, reason: str, media: Path, line: int | None = None) -> bool:
    reason = from_header(reason)
    expected = case.reason.replace("line 2:", f"line {line}:") if line is not None else case.reason
    if case.regex:
        return re.fullmatch(expected.format(D=re.escape(str(media))), reason, flags=re.DOTALL) is not None
    return reason == expected.format(D=media)


def test_catalog_skip_policy_leaves_out_every_case_with_its_real_cause(catalog, tiny_model_dir, tokenizer,
                                                                       image_processor, tmp_path, register):
    media, annotation = catalog["media"], catalog["json"]
    (result, lines) = main([str(annotation), str(catalog["jsonl"]),
                            *catalog_flags(catalog, tiny_model_dir, "--output_dir", str(tmp_path))])
    dropped = {index: (kind, reason) for _, index, kind, reason in result.dropped}
    wanted = {i: c for i, c in catalog["expected"].items() if c.name not in HEADER_INVISIBLE}
    assert set(dropped) == set(wanted)
    for index, case in wanted.items():
        kind, reason = dropped[index]
        assert kind == case.kind and reason_matches(case, reason, media), (case.name, reason)
    # the training dataset (skip policy) reports the very same kind and reason for each
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=register("pack_catalog", annotation, media)),
                                    vision_config(image_processor, 16 * 28 * 28, 64 * 28 * 28),
                                    model_max_length=MODEL_MAX_LENGTH, bad_sample_policy="skip")
    for index, (kind, reason) in dropped.items():
        problem = dataset[index]
        assert (problem.kind, problem.reason) == (kind, from_header(reason))
    line_dropped = {index: (kind, reason) for _, index, kind, reason in lines.dropped}
    assert set(line_dropped) == set(catalog["jsonl_expected"])
    for index, case in catalog["jsonl_expected"].items():
        assert line_dropped[index][0] == case.kind
        assert reason_matches(case, line_dropped[index][1], media, line=index + 1), case.name


def test_catalog_error_policy_stops_naming_file_index_and_cause(catalog, tiny_model_dir, tmp_path):
    case = catalog["expected"][1]
    with pytest.raises(SystemExit) as info:
        main([str(catalog["json"]), *catalog_flags(catalog, tiny_model_dir, "--output_dir", str(tmp_path),
                                                   "--bad_sample_policy", "error")])
    output = tmp_path / "catalog_pack.json"
    assert str(info.value) == (f"error: {catalog['json']}:1: [{case.kind}] {case.reason.format(D=catalog['media'])} "
                               f"(--bad_sample_policy error; {output} not written)")
    assert not output.exists()
    surrogate = next(i for i, c in catalog["jsonl_expected"].items() if c.name == "surrogate_jsonl_line")
    lines = tmp_path / "surrogate.jsonl"
    lines.write_bytes(b"\n".join([json.dumps(good_record(0)).encode(), catalog["jsonl_expected"][surrogate].line]))
    with pytest.raises(SystemExit, match=re.escape(
            f"error: {lines}:1: [invalid_unicode] conversations[0].value holds an unpaired surrogate \\ud83d at "
            "character 3: not valid Unicode (a broken \\u escape in the JSON); fix the text")):
        main([str(lines), *catalog_flags(catalog, tiny_model_dir, "--output_dir", str(tmp_path),
                                         "--bad_sample_policy", "error")])


class FailsOnSample1(TokenCounter):
    """A count that raises what no check expects, on sample 1 only (the tokenizer's TypeError before issue 9)."""

    def count(self, sample, data_path="", annotation_path="", index=0):
        if index == 1:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return super().count(sample, data_path, annotation_path, index)


def test_unexpected_error_is_the_samples_problem_and_counting_goes_on(tokenizer, image_processor, tmp_path):
    from tools.pack_data import counts_for, resolve_inputs

    annotation = tmp_path / "texts.json"
    annotation.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"q{k}"},
                                                         {"from": "gpt", "value": f"a{k}"}]} for k in range(3)]))
    counter = FailsOnSample1(tokenizer, DataArguments(), vision_config(image_processor), 512)
    (source,) = resolve_inputs([str(annotation)], "", seed=0)
    counts, reused, counted = counts_for(source, counter, counter.settings(), str(tmp_path), False, 1)
    assert (counts[1].kind, counts[1].reason) == (
        "unexpected_error",
        "unexpected error: TypeError: TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, "
        "InputSequence]]")
    assert counts[0].ok and counts[2].ok and (reused, counted) == (0, 3)
    cached = json.loads((tmp_path / "texts_count.json").read_text())["counts"]
    assert cached[1] is None and cached[0] is not None  # never cached: a fixed bug recounts it


def test_output_dir_and_registry_file(tiny_model_dir, tmp_path, capsys):
    import yaml

    folder = tmp_path / "data"
    folder.mkdir()
    annotation = folder / "texts.jsonl"
    annotation.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"q{k}"},
                                                                   {"from": "gpt", "value": f"a{k}"}]})
                                    for k in range(4)) + "\n")
    out = tmp_path / "out"
    (result,) = main([str(annotation), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out)])
    assert result.output == out / "texts_pack.json" and result.output.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["texts.jsonl"]  # nothing written next to the annotation
    assert (out / "texts_count.json").exists()
    printed = capsys.readouterr().out
    assert "qwenvl/data/__init__.py" not in printed and "paste" not in printed
    assert (f"    texts_pack:\n      annotation_path: {out / 'texts_pack.json'}\n      data_path: ''\n"
            "  then train with: --dataset_registry my_registry.yaml --data_packing True --dataset_use texts_pack"
            ) in printed

    for suffix, load in ((".yaml", yaml.safe_load), (".json", json.loads)):
        registry_file = tmp_path / f"registry{suffix}"
        other = {"mine": {"annotation_path": "/data/mine.json", "data_path": "/data"}}
        registry_file.write_text(json.dumps(other))  # JSON is YAML too
        for _ in range(2):  # a second run updates the entry in place
            main([str(annotation), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                  "--data_path", str(folder), "--registry_file", str(registry_file)])
        assert load(registry_file.read_text()) == {
            **other, "texts_pack": {"annotation_path": str(out / "texts_pack.json"), "data_path": str(folder)}}
        assert (f"registered 'texts_pack' in {registry_file}; train with: --dataset_registry {registry_file} "
                "--data_packing True --dataset_use texts_pack") in capsys.readouterr().out
    with pytest.raises(SystemExit, match=re.escape("--registry_file should end in .yaml, .yml or .json but found "
                                                   "'registry.txt'")):
        main([str(annotation), "--model_name_or_path", str(tiny_model_dir), "--registry_file",
              str(tmp_path / "registry.txt")])


def test_input_named_twice_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["demo_text_only%50", "demo_text_only", "--model_name_or_path", str(tiny_model_dir), "--output",
              str(tmp_path / "x.json")])
    message = str(info.value)
    assert message.startswith("error: dataset 'demo_text_only' is named twice in ")
    assert "('demo_text_only%50' and 'demo_text_only')" in message and "name it once" in message
    # the same file under two names (a registry name and its path) is read twice too: refused by location
    path = registry.data_dict["demo_text_only"]["annotation_path"]
    with pytest.raises(SystemExit, match=re.escape(f"reads {path} twice ('demo_text_only' and '{path}')")):
        main(["demo_text_only", path, "--model_name_or_path", str(tiny_model_dir), "--output",
              str(tmp_path / "x.json")])


def test_registry_inputs_are_packed_as_name_pack_and_the_printed_commands_train(tiny_model_dir, tmp_path, capsys):
    import shutil

    from qwenvl.train.argument import ConfigError
    from qwenvl.train.train_qwen import train

    out = tmp_path / "out"
    main(["demo_text_only", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "    demo_text_only_pack:\n      annotation_path: " + str(out / "text_only_pack.json") in printed
    assert "--data_packing True --dataset_use demo_text_only_pack\n" in printed
    # text only: no media to find, so the file's path trains as well
    assert f"  or, without a registry entry: --data_packing True --dataset_use {out / 'text_only_pack.json'}" in printed

    main(["demo_single_image%50", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
          "--max_pixels", "64*28*28"])
    printed = capsys.readouterr().out
    demo = Path(registry.data_dict["demo_single_image"]["data_path"]).resolve()
    assert "--dataset_use demo_single_image_50pct_pack\n" in printed
    assert (f"  (the file's path alone would not do: its media paths are relative to {demo}, not to {out})"
            in printed)
    assert "without a registry entry" not in printed

    registry_file = tmp_path / "my_registry.yaml"
    main(["demo_text_only", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
          "--registry_file", str(registry_file)])
    assert (f"registered 'demo_text_only_pack' in {registry_file}; train with: --dataset_registry {registry_file} "
            "--data_packing True --dataset_use demo_text_only_pack") in capsys.readouterr().out

    # The printed commands pass every check before the model loads: a copy of the checkpoint without weights
    # fails in the loader, after the registry entry resolved and the packed file was accepted.
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for path in tiny_model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, weightless / path.name)
    common = ["--model_name_or_path", str(weightless), "--tune_mm_llm", "True", "--use_cpu", "True",
              "--report_to", "none", "--max_steps", "1", "--data_packing", "True"]
    try:
        for dataset_use in (["--dataset_registry", str(registry_file), "--dataset_use", "demo_text_only_pack"],
                            ["--dataset_use", str(out / "text_only_pack.json")]):
            with pytest.raises(OSError, match="model.safetensors|no file named"):
                train([*common, "--output_dir", str(tmp_path / "run"), *dataset_use])
    finally:
        registry.data_dict.pop("demo_text_only_pack", None)  # added by --dataset_registry: keep other tests' registry
    with pytest.raises(ConfigError, match="holds groups of samples written by tools/pack_data.py; add --data_packing"):
        train([*common[:-2], "--output_dir", str(tmp_path / "run"), "--dataset_use", str(out / "text_only_pack.json")])
