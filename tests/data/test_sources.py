"""qwenvl/data/sources.py and annotations.py: every kind of source gives the records load_annotations gives."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

from qwenvl.data.annotations import AnnotationSet, open_store, store_path
from qwenvl.data.data_qwen import BadRecord, load_annotations, sample_indices
from qwenvl.data.sources import SourceError, resolve_source, resolve_sources
from qwenvl.data.vision import open_image
from tests.conftest import PYTHON, REPO_ROOT, python_env

DEMO = REPO_ROOT / "demo"
IMAGES = ["red_circle.jpg", "blue_square.jpg", "green_triangle.jpg", "five_dots.jpg", "two_shapes.jpg"]
NUM = 40


def single_turn_rows() -> list[dict]:
    """Column-style single-turn rows: every other one with an image, every fifth with a system prompt."""
    rows = []
    for i in range(NUM):
        rows.append({
            "img": f"images/{IMAGES[i % len(IMAGES)]}" if i % 2 == 0 else None,
            "q": f"Question {i}: what is shown " + "and why " * (i % 7),
            "a": f"Answer {i}." + " More words." * (i % 3),
            "sys": "You are terse." if i % 5 == 0 else None,
        })
    return rows


def expected_records() -> list[dict]:
    """The same samples written by hand in the annotation format of SPEC 4."""
    records = []
    for row in single_turn_rows():
        turns = [{"from": "human", "value": ("<image>\n" if row["img"] else "") + row["q"]},
                 {"from": "gpt", "value": row["a"]}]
        if row["sys"]:
            turns.insert(0, {"from": "system", "value": row["sys"]})
        record = {"image": row["img"]} if row["img"] else {}
        record["conversations"] = turns
        records.append(record)
    return records


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, dict]:
    """One registry entry per kind of source, all holding ``expected_records()``."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("sources")
    records = expected_records()
    table = pa.Table.from_pylist([{"image": None, **r} for r in records])  # every row names every column
    (root / "samples.json").write_text(json.dumps(records, indent=2))
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets.Dataset.from_list(records).save_to_disk(str(root / "saved"))
    pq.write_table(table, root / "samples.parquet")
    (root / "parquet_dir" / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 25), root / "parquet_dir" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(25), root / "parquet_dir" / "data" / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(0, 3), root / "parquet_dir" / "data" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(single_turn_rows()), root / "single_turn.parquet")
    arrow_file = next((root / "saved").glob("*.arrow"))
    entries = {
        "json": {"annotation_path": str(root / "samples.json")},
        "jsonl": {"annotation_path": str(root / "samples.jsonl")},
        "save_to_disk": {"annotation_path": str(root / "saved")},
        "parquet": {"annotation_path": str(root / "samples.parquet")},
        "parquet_folder": {"annotation_path": str(root / "parquet_dir")},
        "arrow": {"annotation_path": str(arrow_file)},
        "single_turn": {"annotation_path": str(root / "single_turn.parquet"),
                        "columns": {"image": "img", "question": "q", "answer": "a", "system": "sys"}},
    }
    for entry in entries.values():
        entry["data_path"] = str(DEMO)
    return entries


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_ANNOTATION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def records_of(annotations: AnnotationSet) -> list:
    return [annotations[i] for i in range(len(annotations))]


@pytest.mark.parametrize("kind", ["json", "jsonl", "save_to_disk", "parquet", "parquet_folder", "arrow",
                                  "single_turn"])
def test_every_kind_gives_the_same_records_and_checked_samples(sources, kind):
    annotations = AnnotationSet("ds", seed=0, registry={"ds": sources[kind]})
    expected = expected_records()
    assert records_of(annotations) == expected
    assert [annotations.refs[i].index for i in range(NUM)] == list(range(NUM))
    assert annotations.refs[3].data_path == str(DEMO)


def test_json_file_path_entry_uses_its_folder_and_matches_load_annotations():
    annotations = AnnotationSet(str(DEMO / "single_image.json"), seed=0)
    assert records_of(annotations) == load_annotations(str(DEMO / "single_image.json"))
    assert annotations.refs[0].data_path == str(DEMO)
    assert annotations.refs[0].dataset == str(DEMO / "single_image.json")


def test_rough_lengths_follow_the_dataset_rule(sources):
    annotations = AnnotationSet("ds%50", seed=3, registry={"ds": sources["parquet"]})
    expected = []
    for index in sample_indices(NUM, 0.5, 3, "ds"):
        record = expected_records()[index]
        words = sum(len(t["value"].split()) for t in record["conversations"])
        expected.append(words + 256 * ("image" in record))
    assert annotations.rough_lengths().tolist() == expected


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_percent_keeps_the_same_subset_for_every_kind(sources, rate):
    expected = sample_indices(NUM, rate, 1234, "ds")
    for kind, entry in sources.items():
        annotations = AnnotationSet(f"ds%{rate * 100:g}", seed=1234, registry={"ds": entry})
        assert [annotations.refs[i].index for i in range(len(annotations))] == expected, kind
        assert records_of(annotations) == [expected_records()[i] for i in expected], kind


def test_training_examples_equal_between_json_and_a_mapped_parquet_source(sources, tiny_model_dir):
    """A JSON file and a column-mapped parquet set of the same samples give identical training tensors."""
    import torch
    from transformers import AutoTokenizer

    import qwenvl.data as registry
    from qwenvl.data.data_qwen import LazySupervisedDataset
    from qwenvl.data.vision import VisionConfig
    from qwenvl.train.argument import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    old = dict(registry.data_dict)
    registry.data_dict["sources_json"] = dict(sources["json"])
    try:
        baseline = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="sources_json%50"), VisionConfig(),
                                         seed=5)
        stored = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="sources_json%50"), VisionConfig(),
                                       seed=5)
    finally:
        registry.data_dict.clear()
        registry.data_dict.update(old)
    annotations = AnnotationSet("sources_json%50", seed=5, registry={"sources_json": sources["single_turn"]})
    stored.records, stored.refs = annotations, annotations.refs  # the wiring LazySupervisedDataset will get
    assert len(stored.records) == len(baseline.records) == NUM // 2
    for i in range(len(baseline.records)):
        a, b = baseline[i], stored[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)


def test_image_bytes_become_an_inline_image(tmp_path):
    import datasets

    png = (DEMO / "images" / "three_shapes_p.png").read_bytes()
    rows = {"picture": [{"bytes": png, "path": None}], "question": ["What?"], "answer": ["Shapes."]}
    features = datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "inline"))
    registry = {"inline": {"annotation_path": str(tmp_path / "inline"), "data_path": "",
                           "columns": {"image": "picture"}}}
    record = AnnotationSet("inline", seed=0, registry=registry)[0]
    assert record["image"].startswith("data:image/png;base64,")
    assert record["conversations"][0]["value"] == "<image>\nWhat?"
    decoded = np.asarray(open_image(record["image"]))
    assert np.array_equal(decoded, np.asarray(open_image(str(DEMO / "images" / "three_shapes_p.png"))))


# ---------------------------------------------------------------- registry file
QA_COLUMNS = {"image": "img", "question": "q", "answer": "a", "system": "sys"}
QA_PROMPT = "Answer briefly: one sentence."


@pytest.fixture
def data_dict():
    """``qwenvl.data.data_dict``, restored after the test (a registry file adds to it)."""
    import qwenvl.data as registry

    saved = dict(registry.data_dict)
    yield registry.data_dict
    registry.data_dict.clear()
    registry.data_dict.update(saved)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_registry_file_gives_the_datasets_of_the_python_dict(tmp_path, data_dict, suffix):
    """Entries with columns, split and system_prompt (save_to_disk folder, parquet folder), paths relative to the file."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwenvl.data import load_registry_file

    rows = single_turn_rows()
    hf = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                          "test": datasets.Dataset.from_list(rows[30:])}).save_to_disk(str(hf / "qa_saved"))
    (hf / "qa_parquet" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:30]), hf / "qa_parquet" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[30:]), hf / "qa_parquet" / "data" / "test-00000-of-00001.parquet")
    demo = os.path.relpath(DEMO, tmp_path)
    if suffix == ".yaml":  # written as a user would, flow-style mapping and all
        text = "".join(textwrap.dedent(f"""
            {name}:
              annotation_path: hf/{name}
              data_path: {demo}
              split: test
              system_prompt: "{QA_PROMPT}"
              columns: {{image: img, question: q, answer: a, system: sys}}
            """) for name in ("qa_saved", "qa_parquet"))
    else:
        text = json.dumps({name: {"annotation_path": f"hf/{name}", "data_path": demo, "split": "test",
                                  "system_prompt": QA_PROMPT, "columns": QA_COLUMNS}
                           for name in ("qa_saved", "qa_parquet")}, indent=2)
    (tmp_path / f"registry{suffix}").write_text(text)
    assert load_registry_file(str(tmp_path / f"registry{suffix}")) == ["qa_saved", "qa_parquet"]
    python = {name: {"annotation_path": str(hf / name), "data_path": str(DEMO), "split": "test",
                     "system_prompt": QA_PROMPT, "columns": dict(QA_COLUMNS)} for name in ("qa_saved", "qa_parquet")}
    expected = []  # rows 30..39 by hand: their own system turn (rows 30, 35), else the prompt
    for row in rows[30:]:
        turns = [{"from": "system", "value": row["sys"] or QA_PROMPT},
                 {"from": "human", "value": ("<image>\n" if row["img"] else "") + row["q"]},
                 {"from": "gpt", "value": row["a"]}]
        expected.append({"image": row["img"], "conversations": turns} if row["img"] else {"conversations": turns})
    for name in ("qa_saved", "qa_parquet"):
        assert resolve_sources(f"{name}%50") == resolve_sources(f"{name}%50", python)
        from_file = AnnotationSet(f"{name}%50", seed=4)  # the default registry: data_dict, file entries added
        from_dict = AnnotationSet(f"{name}%50", seed=4, registry=python)
        kept = sample_indices(10, 0.5, 4, name)
        assert records_of(from_file) == records_of(from_dict) == [expected[i] for i in kept], name
        assert [from_file.refs[i] for i in range(5)] == [from_dict.refs[i] for i in range(5)], name
        assert from_file.refs[0].data_path == str(DEMO)


@pytest.mark.parametrize("entry, message", [
    ("split: 2024", "entry 'ds': split should be a str but found int 2024 (quote it)"),
    ("system_prompt: yes", "entry 'ds': system_prompt should be a str but found bool True (quote it)"),
    ("columns: [img, q, a]", "entry 'ds': columns should be a dict but found list ['img', 'q', 'a']"),
])
def test_a_registry_file_entry_of_the_wrong_type_is_named(tmp_path, data_dict, entry, message):
    from qwenvl.data import load_registry_file

    (tmp_path / "registry.yaml").write_text(f"ds:\n  annotation_path: data.parquet\n  {entry}\n")
    with pytest.raises(ValueError) as info:
        load_registry_file(str(tmp_path / "registry.yaml"))
    assert str(info.value) == f"{tmp_path / 'registry.yaml'}: {message}"
    assert "ds" not in data_dict


# ---------------------------------------------------------------- bad sources
def test_mapping_naming_a_missing_column_lists_the_columns(sources):
    entry = dict(sources["single_turn"], columns={"image": "picture", "question": "q", "answer": "a"})
    with pytest.raises(SourceError, match=r"dataset 'ds': the column mapping maps 'image' to column 'picture', which "
                                          r".*single_turn.parquet does not have; its columns: img, q, a, sys"):
        AnnotationSet("ds", seed=0, registry={"ds": entry})


def test_unknown_mapping_key_is_refused(sources):
    entry = dict(sources["single_turn"], columns={"picture": "img"})
    with pytest.raises(SourceError, match=r"dataset 'ds': unknown key 'picture' in \"columns\"; expected some of "
                                          r"image, images"):
        AnnotationSet("ds", seed=0, registry={"ds": entry})


def test_parquet_of_the_wrong_shape_lists_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "caption": ["a", "b"]}), tmp_path / "captions.parquet")
    with pytest.raises(SourceError, match=r"captions.parquet has no conversations column and no question and answer "
                                          r"columns; its columns: id, caption"):
        AnnotationSet(str(tmp_path / "captions.parquet"), seed=0)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(SourceError, match=r"broken.parquet is not a readable parquet file"):
        AnnotationSet(str(tmp_path / "broken.parquet"), seed=0)


def test_a_folder_that_is_not_a_dataset_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pictures").mkdir()
    with pytest.raises(SourceError, match=r"folder .* is not a dataset: no state.json or dataset_dict.json \(a "
                                          r"save_to_disk folder\) and no .parquet or .arrow files; it holds: "
                                          r"notes.txt, pictures"):
        AnnotationSet(str(tmp_path), seed=0)


def test_an_unknown_entry_lists_the_registered_names():
    with pytest.raises(SourceError, match=r"unknown dataset 'nope' in --dataset_use; registered datasets: a, b; "
                                          r"nor is it an existing file or folder, or a Hugging Face dataset in the "
                                          r"local cache"):
        AnnotationSet("nope", seed=0, registry={"a": {}, "b": {}})


def test_a_missing_split_lists_the_splits(sources):
    entry = dict(sources["parquet_folder"], split="validation")
    with pytest.raises(SourceError, match=r"split 'validation' not in .*parquet_dir; splits: test, train"):
        AnnotationSet("ds", seed=0, registry={"ds": entry})
    test_split = AnnotationSet("ds", seed=0, registry={"ds": dict(sources["parquet_folder"], split="test")})
    assert records_of(test_split) == expected_records()[:3]


def test_the_same_source_twice_is_an_error(sources):
    path = sources["json"]["annotation_path"]
    with pytest.raises(SourceError, match=f"dataset '{path}' is named twice in --dataset_use \\('{path}' and "
                                          f"'{path}%50'\\): each of its samples would be trained twice"):
        AnnotationSet(f"{path},{path}%50", seed=0)
    with pytest.raises(SourceError, match="--dataset_use reads .*samples.json twice \\('a' and 'b'\\)"):
        AnnotationSet("a,b", seed=0, registry={"a": sources["json"], "b": sources["json"]})


@pytest.mark.parametrize("content", [b"[{\"a\": 1},\n {\"b\": }]", b"", b"{\"a\": 1}\n{\"b\": 2}\n", b"[1, 2] x",
                                     b"[]", b"[{\"a\": 1},]", b"\"just a string\"", b"[{\"a\": \xff}]"])
def test_broken_json_files_give_load_annotations_messages(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as expected:
        load_annotations(str(path))
    with pytest.raises(ValueError) as got:
        AnnotationSet(str(path), seed=0)
    assert str(got.value) == str(expected.value)


def test_a_single_object_json_file_is_one_record(tmp_path):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "one.json").write_text(json.dumps(record))
    assert records_of(AnnotationSet(str(tmp_path / "one.json"), seed=0)) == [record]


def test_bad_jsonl_lines_keep_their_place_or_raise_as_before(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"conversations": []}\n{broken\n\n{"x": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError) as expected:
        load_annotations(str(path), bad_lines="raise")
    with pytest.raises(ValueError) as got:
        AnnotationSet(str(path), seed=0, bad_lines="raise")
    assert str(got.value) == str(expected.value)
    assert str(got.value) == (f"{path}:2: invalid JSON line: Expecting property name enclosed in double quotes "
                              f"(column 2)")
    kept = records_of(AnnotationSet(str(path), seed=0, bad_lines="keep"))
    assert kept == load_annotations(str(path), bad_lines="keep")
    assert isinstance(kept[1], BadRecord) and isinstance(kept[3], BadRecord) and kept[2] == {"x": 1}


def test_hub_dataset_from_the_local_cache_offline(tmp_path):
    """A hub name read from a prepared datasets cache, with HF_HUB_OFFLINE=1; a missing one is named."""
    script = textwrap.dedent(f"""
        import json, os, shutil
        import pyarrow as pa, pyarrow.parquet as pq
        from datasets.packaged_modules.parquet.parquet import Parquet
        from qwenvl.data.annotations import AnnotationSet
        from qwenvl.data.sources import SourceError
        pq.write_table(pa.Table.from_pylist([{{"question": "q%d" % i, "answer": "a"}} for i in range(5)]),
                       "{tmp_path}/train.parquet")
        builder = Parquet(dataset_name="tiny_set", data_files={{"train": ["{tmp_path}/train.parquet"]}}, hash="abc")
        builder.download_and_prepare()
        cache = os.path.join(os.environ["HF_HOME"], "datasets")
        # where load_dataset("someone/tiny_set") would have prepared it
        os.makedirs(os.path.join(cache, "someone___tiny_set"))
        config = os.listdir(os.path.join(cache, "tiny_set"))[0]
        shutil.move(os.path.join(cache, "tiny_set", config), os.path.join(cache, "someone___tiny_set", "default"))
        annotations = AnnotationSet("someone/tiny_set%40", seed=0)
        print(json.dumps([annotations[i] for i in range(len(annotations))]))
        try:
            AnnotationSet("someone/other_set", seed=0)
        except SourceError as exc:
            print(exc)
        from qwenvl.data import load_registry_file  # a hub name in a registry file stays a hub name
        with open("{tmp_path}/registry.yaml", "w") as handle:
            handle.write("tiny:\\n  annotation_path: someone/tiny_set\\n  system_prompt: Be brief.\\n")
        load_registry_file("{tmp_path}/registry.yaml")
        print(json.dumps(AnnotationSet("tiny", seed=0)[1]))
    """)
    env = dict(python_env(), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               QWENVL_ANNOTATION_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    expected = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
                for i in sample_indices(5, 0.4, 0, "someone/tiny_set")]
    assert json.loads(lines[0]) == expected
    assert "unknown dataset 'someone/other_set' in --dataset_use" in lines[1]
    assert f"or a Hugging Face dataset in the local cache ({tmp_path / 'hf' / 'datasets'})" in lines[1]
    assert json.loads(lines[2]) == {"conversations": [{"from": "system", "value": "Be brief."},
                                                      {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a"}]}


# ---------------------------------------------------------------- cache
def test_cache_is_reused_and_rebuilt_when_the_file_or_mapping_changes(tmp_path, cache_dir):
    path = tmp_path / "data.jsonl"
    line = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n"
    path.write_text(line * 3)
    source = resolve_source(str(path))
    first = open_store(source)
    stamp = os.stat(first.path).st_mtime_ns
    again = open_store(resolve_source(str(path)))
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == stamp  # reused, not rewritten
    path.write_text(line * 4)
    changed = open_store(resolve_source(str(path)))
    assert changed.path != first.path and len(changed) == 4
    mapped = resolve_source(str(path))
    mapped.system_prompt = "Be brief."
    assert store_path(mapped) != changed.path
    assert open_store(mapped)[0]["conversations"][0] == {"from": "system", "value": "Be brief."}
    assert len(list(cache_dir.glob("*.arrow"))) == 3


def test_exact_lengths_hook_round_trips(tmp_path):
    store = open_store(resolve_source(str(DEMO / "text_only.jsonl")))
    assert store.load_lengths("tokens-abc") is None
    store.save_lengths("tokens-abc", list(range(10, 10 + len(store))))
    annotations = AnnotationSet(str(DEMO / "text_only.jsonl") + "%50", seed=1)
    kept = sample_indices(len(store), 0.5, 1, str(DEMO / "text_only.jsonl"))
    assert annotations.lengths("tokens-abc").tolist() == [10 + i for i in kept]
    with pytest.raises(ValueError, match="expected 8 values, got shape"):
        store.save_lengths("bad", [1, 2])


def test_store_pickles_as_its_path():
    import pickle

    annotations = AnnotationSet("demo_text_only%50", seed=9)
    clone = pickle.loads(pickle.dumps(annotations))
    assert records_of(clone) == records_of(annotations) and clone.refs[1] == annotations.refs[1]
    assert len(pickle.dumps(annotations.stores[0])) < 2000


def test_two_processes_converting_at_once_write_one_file(tmp_path, cache_dir):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image> " + "word " * 50},
                                                           {"from": "gpt", "value": "answer " * 30}]})
    path.write_text((line + "\n") * 20000)
    script = textwrap.dedent(f"""
        import json, logging
        from qwenvl.data.annotations import AnnotationSet
        logging.basicConfig(level=logging.INFO)
        annotations = AnnotationSet("{path}%10", seed=7)
        print(json.dumps([annotations.stores[0].path, [annotations.refs[i].index for i in range(len(annotations))]]))
    """)
    env = dict(python_env(), QWENVL_ANNOTATION_CACHE=str(cache_dir))
    processes = [subprocess.Popen([PYTHON, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    (path_a, kept_a), (path_b, kept_b) = (json.loads(out) for out, _ in outputs)
    assert path_a == path_b and kept_a == kept_b == sample_indices(20000, 0.1, 7, str(path))
    stored = [p.name for p in cache_dir.iterdir() if not p.name.endswith((".lock", ".meta", ".files.json"))]
    assert stored == [os.path.basename(path_a)]  # no second store, no temporary file left
    converted = [":converting " in err for _, err in outputs]  # the log line of the process that converts
    assert sorted(converted) == [False, True], [err for _, err in outputs]


def test_a_mapped_jsonl_set_checks_its_mapping_against_every_record(tmp_path):
    rows = single_turn_rows()[1:]  # the first row has no image: the mapping must not be judged by it alone
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    columns = {"image": "img", "question": "q", "answer": "a", "system": "sys"}
    registry = {"qa": {"annotation_path": str(tmp_path / "qa.jsonl"), "data_path": str(DEMO), "columns": columns}}
    assert records_of(AnnotationSet("qa", seed=0, registry=registry)) == expected_records()[1:]
    registry["qa"]["columns"] = dict(columns, image="picture")
    with pytest.raises(SourceError, match=r"maps 'image' to column 'picture', which .*qa.jsonl does not have; its "
                                          r"columns: a, img, q, sys"):
        AnnotationSet("qa", seed=0, registry=registry)
