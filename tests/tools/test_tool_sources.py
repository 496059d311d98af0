"""tools/pack_data.py and tools/check_image.py read every kind of source training reads.

Inputs resolve through ``qwenvl/data/sources.py`` and records come from the annotation store, so a
column-mapped parquet file or a ``save_to_disk`` folder (registered through ``--dataset_registry``)
must give exactly the packed groups, counts and check results of the same samples written as a JSON
file, and ``name%N`` must keep training's subset.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter

import pytest
from PIL import Image

import qwenvl.data as registry
from qwenvl.data.annotations import AnnotationSet
from qwenvl.data.data_qwen import BadSampleError, LazySupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments

SYSTEM = "Answer in one word."
QUESTIONS = [("red.png", "Which colour?", "Red."), (None, "Two plus two?", "Four."),
             ("blue.png", "Name the colour.", "Blue."), ("gone.png", "What is missing?", "Nothing."),
             ("red.png", "Is it warm " + "or cold " * 30 + "?", "Warm."), (None, "Capital of France?", "Paris."),
             ("blue.png", "Sky or sea?", "Sea."), ("red.png", "Apple or plum?", "Apple.")]


def canonical(sample) -> str:
    return json.dumps(sample, sort_keys=True)


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    """The same samples as JSON files and as Hugging Face sources with their own column names, and a registry
    file (YAML, relative paths) naming all of them."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    root = tmp_path_factory.mktemp("tool_sources")
    media = root / "media"
    media.mkdir()
    Image.new("RGB", (56, 84), (200, 30, 30)).save(media / "red.png")
    Image.new("RGB", (112, 56), (30, 30, 200)).save(media / "blue.png")

    # single-turn rows (picture / prompt / response) and the records they stand for, written by hand
    rows = [{"picture": image, "prompt": question, "response": answer} for image, question, answer in QUESTIONS]
    qa_records = []
    for image, question, answer in QUESTIONS:
        record = {"image": image} if image else {}
        record["conversations"] = [{"from": "system", "value": SYSTEM},
                                   {"from": "human", "value": ("<image>\n" if image else "") + question},
                                   {"from": "gpt", "value": answer}]
        qa_records.append(record)
    (root / "qa.json").write_text(json.dumps(qa_records))
    pq.write_table(pa.Table.from_pylist(rows), root / "qa_rows.parquet")
    # the records themselves, as a parquet file with the standard column names (given by path)
    pq.write_table(pa.Table.from_pylist([{"image": None, **r} for r in qa_records]), root / "plain.parquet")

    # multi-turn rows with the image inline (a datasets Image column of PNG bytes): a data URI in the record
    pngs = [png_bytes((20 * k, 200 - 20 * k, 90), (28 * (k + 1), 56)) for k in range(5)]
    chats = [[{"from": "human", "value": f"<image>\nWhat is shown in picture {k}?"},
              {"from": "gpt", "value": f"Colour number {k}."},
              {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}] for k in range(5)]
    chats[3][2]["value"] = "And this <image>?"  # one tag too many: the same tag_mismatch in both forms
    features = datasets.Features({"img": datasets.Image(),
                                  "chat": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in pngs], "chat": chats},
                               features=features).save_to_disk(str(root / "chat_disk"))
    chat_records = [{"image": "data:image/png;base64," + base64.b64encode(b).decode("ascii"), "conversations": c}
                    for b, c in zip(pngs, chats)]
    (root / "chat.json").write_text(json.dumps(chat_records))

    registry_file = root / "registry.yaml"
    registry_file.write_text(yaml.safe_dump({
        "qa_json": {"annotation_path": "qa.json", "data_path": "media"},
        "qa_parquet": {"annotation_path": "qa_rows.parquet", "data_path": "media", "system_prompt": SYSTEM,
                       "columns": {"image": "picture", "question": "prompt", "answer": "response"}},
        "chat_json": {"annotation_path": "chat.json", "data_path": ""},
        "chat_disk": {"annotation_path": "chat_disk", "data_path": "", "columns": {"image": "img",
                                                                                  "conversations": "chat"}},
    }))
    return {"root": root, "media": media, "registry": registry_file, "qa": qa_records, "chat": chat_records}


@pytest.fixture(autouse=True)
def registry_restored():
    """``--dataset_registry`` adds its names to the process's registry: take them out after each test."""
    saved = dict(registry.data_dict)
    yield
    registry.data_dict.clear()
    registry.data_dict.update(saved)


# (JSON entry, equivalent Hugging Face entry, stem of the JSON outputs, stem of the HF outputs)
PAIRS = [("qa_json", "qa_parquet", "qa", "qa_rows"), ("chat_json", "chat_disk", "chat", "chat_disk")]


def test_pack_data_packs_mapped_hf_sources_exactly_as_the_json_files(sets, tiny_model_dir, tokenizer,
                                                                     image_processor, tmp_path):
    from tools.pack_data import main

    out = tmp_path / "out"
    names = [name for pair in PAIRS for name in pair[:2]]
    results = dict(zip(names, main([*names, "--dataset_registry", str(sets["registry"]), "--model_name_or_path",
                                    str(tiny_model_dir), "--output_dir", str(out), "--pack_length", "256",
                                    "--model_max_length", "1024"])))
    cfg = VisionConfig.from_image_processor(image_processor, 16 * 28 * 28, 576 * 28 * 28)
    for json_name, hf_name, json_stem, hf_stem in PAIRS:
        first, second = results[json_name], results[hf_name]
        assert second.output == out / f"{hf_stem}_pack.json" and second.sources == [hf_name]
        groups = json.loads((out / f"{json_stem}_pack.json").read_text())
        assert json.loads(second.output.read_text()) == groups and len(groups) > 1, hf_name
        assert [(i, k, r) for _, i, k, r in second.dropped] == [(i, k, r) for _, i, k, r in first.dropped]
        assert {p for p, _, _, _ in second.dropped} <= {registry.data_dict[hf_name]["annotation_path"]}
        counts = json.loads((out / f"{hf_stem}_count.json").read_text())["counts"]
        assert counts == json.loads((out / f"{json_stem}_count.json").read_text())["counts"]
        # the oracle: training's dataset on the HF source (decodes every image)
        dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=hf_name), cfg, model_max_length=1024)
        assert len(dataset) == len(counts)
        for i, count in enumerate(counts):
            if count[2] in ("ok", "truncated"):
                assert len(dataset[i]["input_ids"]) == count[0], (hf_name, i)
            else:
                with pytest.raises(BadSampleError) as caught:
                    dataset[i]
                assert caught.value.kind == count[2], (hf_name, i)
    # the rejected samples: the missing image of the parquet set, the extra tag of the save_to_disk set
    assert [(i, k) for _, i, k, _ in results["qa_parquet"].dropped] == [(3, "missing_media")]
    assert [(i, k) for _, i, k, _ in results["chat_disk"].dropped] == [(3, "tag_mismatch")]
    packed = [s for g in json.loads(results["chat_disk"].output.read_text()) for s in g]
    assert Counter(map(canonical, packed)) == Counter(canonical(r) for k, r in enumerate(sets["chat"]) if k != 3)
    assert all(s["image"].startswith("data:image/png;base64,") for s in packed)
    # a second run reuses every count of the HF sources (the cache is keyed on their annotation store)
    (again,) = main(["chat_disk", "--dataset_registry", str(sets["registry"]), "--model_name_or_path",
                     str(tiny_model_dir), "--output_dir", str(out), "--pack_length", "256", "--model_max_length",
                     "1024"])
    assert (again.reused, again.counted) == (len(sets["chat"]), 0)


def test_pack_data_percent_of_an_hf_source_is_trainings_subset(sets, tiny_model_dir, tmp_path):
    from tools.pack_data import main

    (result,) = main(["qa_parquet%50", "--dataset_registry", str(sets["registry"]), "--model_name_or_path",
                      str(tiny_model_dir), "--output_dir", str(tmp_path), "--seed", "11", "--pack_length", "4096"])
    assert result.output == tmp_path / "qa_rows_50pct_pack.json" and result.num_input == 4
    annotations = AnnotationSet("qa_parquet%50", seed=11)
    rows = [int(r) for r in annotations.kept[0]]
    dropped = {i for _, i, _, _ in result.dropped}
    expected = Counter(canonical(annotations[k]) for k, row in enumerate(rows) if row not in dropped)
    packed = Counter(canonical(s) for g in json.loads(result.output.read_text()) for s in g)
    assert packed == expected and sum(packed.values()) == result.num_packed
    assert rows != list(range(4))  # a real subset, not the first half


def test_check_image_checks_mapped_hf_sources_exactly_as_the_json_files(sets, tmp_path, capsys):
    from tools.check_image import main

    names = [name for pair in PAIRS for name in pair[:2]]
    status = main([*names, "--dataset_registry", str(sets["registry"]), "--output_dir", str(tmp_path),
                   "--no_progress"])
    assert status == 1
    out = capsys.readouterr().out
    for json_name, hf_name, json_stem, hf_stem in PAIRS:
        location = registry.data_dict[hf_name]["annotation_path"]
        mine = json.loads((tmp_path / f"{hf_stem}_problems.json").read_text())
        theirs = json.loads((tmp_path / f"{json_stem}_problems.json").read_text())
        assert [(p["index"], p["kind"], p["reason"]) for p in mine] == [
            (p["index"], p["kind"], p["reason"]) for p in theirs] and len(mine) == 1
        assert all(p["dataset"] == hf_name and p["annotation_path"] == location
                   and p["message"] == f"{location}:{p['index']}: {p['reason']}" for p in mine)
        valid = json.loads((tmp_path / f"{hf_stem}_valid.json").read_text())
        assert valid == json.loads((tmp_path / f"{json_stem}_valid.json").read_text())
        assert f"{hf_name}: wrote {tmp_path / f'{hf_stem}_valid.json'} ({len(valid)} valid samples)" in out
    assert json.loads((tmp_path / "qa_rows_problems.json").read_text())[0]["kind"] == "missing_media"
    assert json.loads((tmp_path / "chat_disk_problems.json").read_text())[0]["kind"] == "tag_mismatch"
    assert json.loads((tmp_path / "qa_rows_valid.json").read_text()) == [r for k, r in enumerate(sets["qa"]) if k != 3]


def test_check_image_on_a_parquet_path_uses_data_path(sets, tmp_path):
    """A parquet file given by path, like an annotation file given by path: media under ``--data_path``."""
    from tools.check_image import main

    root = sets["root"]
    assert main([str(root / "plain.parquet"), str(root / "qa.json"), "--data_path", str(sets["media"]),
                 "--output_dir", str(tmp_path), "--no_progress", "--workers", "2"]) == 1
    plain = json.loads((tmp_path / "plain_problems.json").read_text())
    assert [(p["index"], p["kind"], p["reason"]) for p in plain] == [
        (p["index"], p["kind"], p["reason"]) for p in json.loads((tmp_path / "qa_problems.json").read_text())]
    assert [p["kind"] for p in plain] == ["missing_media"] and str(sets["media"] / "gone.png") in plain[0]["reason"]
    assert json.loads((tmp_path / "plain_valid.json").read_text()) == [r for k, r in enumerate(sets["qa"]) if k != 3]


def test_a_bad_registry_file_is_a_usage_error(tmp_path, capsys):
    from tools.check_image import main
    from tools.pack_data import main as pack_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("mine: [1, 2]\n")
    with pytest.raises(SystemExit) as info:
        main(["mine", "--dataset_registry", str(bad)])
    assert info.value.code == 2
    assert (f"--dataset_registry {bad}: {bad}: entry 'mine' should be a mapping with annotation_path (and "
            "data_path)") in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"error: --dataset_registry {bad}: {bad}: entry 'mine' should be"):
        pack_main(["mine", "--dataset_registry", str(bad), "--model_name_or_path", "unused"])


def test_pack_data_counts_an_hf_source_in_worker_processes(tiny_model_dir, tmp_path):
    """Workers read their rows from the store (150 samples: 3 chunks); the counts equal a count in one process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tools.pack_data import main

    rows = [{"question": f"Question {k}: " + "why " * (k % 11), "answer": f"Answer {k}." + " yes" * (k % 5)}
            for k in range(150)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "texts.parquet")
    flags = ["--model_name_or_path", str(tiny_model_dir), "--pack_length", "128", "--output_dir", str(tmp_path)]
    (parallel,) = main([str(tmp_path / "texts.parquet"), "--workers", "2", *flags])
    counts = json.loads((tmp_path / "texts_count.json").read_text())["counts"]
    groups = json.loads(parallel.output.read_text())
    (serial,) = main([str(tmp_path / "texts.parquet"), "--recount", *flags])
    assert (parallel.counted, serial.counted, parallel.num_packed) == (150, 150, 150)
    assert json.loads((tmp_path / "texts_count.json").read_text())["counts"] == counts
    assert json.loads(serial.output.read_text()) == groups
    assert len({c[0] for c in counts}) > 10 and sorted(canonical(s) for g in groups for s in g) == sorted(
        canonical({"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer"]}]})
        for r in rows)


def test_a_packed_file_is_not_packed_again(tmp_path):
    from tools.pack_data import main

    sample = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    packed = tmp_path / "done_pack.json"
    packed.write_text(json.dumps([[sample], [sample, sample]]))
    with pytest.raises(SystemExit, match=f"^error: {packed} holds groups of samples: it is already packed$"):
        main([str(packed), "--model_name_or_path", "unused"])
