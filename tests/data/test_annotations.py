"""qwenvl/data/annotations.py: older stores of a source are removed after a rebuild, others are kept."""

from __future__ import annotations

import gc
import json
import subprocess
import textwrap

import pytest

from qwenvl.data.annotations import open_store, store_path
from qwenvl.data.sources import resolve_source
from tests.conftest import PYTHON, REPO_ROOT, python_env

TURNS = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_ANNOTATION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_samples(path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "conversations": TURNS}) + "\n" for i in range(count)))


def store_files(store_file: str, *lengths: str) -> set[str]:
    """The names a store leaves in the cache folder: itself, its .meta and .lock, and its lengths arrays."""
    name = store_file.rsplit("/", 1)[1]
    return {name, f"{name}.meta", f"{name}.lock", *(f"{name[:-len('.arrow')]}.{n}.npy" for n in lengths)}


def test_a_rebuild_removes_the_older_store_and_its_side_files_only(tmp_path, cache_dir):
    data = tmp_path / "data.jsonl"
    write_samples(data, 3)
    write_samples(tmp_path / "other" / "data.jsonl", 2)  # another source, same file name: same store name prefix
    other = open_store(resolve_source(str(tmp_path / "other" / "data.jsonl")))
    other.save_lengths("tokens-a", [7, 8])
    prompted = resolve_source(str(data))
    prompted.system_prompt = "Be brief."  # the same file under another mapping: another source
    prompted_path = open_store(prompted).path
    old = open_store(resolve_source(str(data)))
    old.save_lengths("tokens-a", [1, 2, 3])
    old.save_lengths("tokens-b", [4, 5, 6])
    old_path = old.path
    del old
    gc.collect()  # closes the old store (a store that is open is in use)
    kept = store_files(other.path, "tokens-a") | store_files(prompted_path)
    assert {p.name for p in cache_dir.iterdir()} == kept | store_files(old_path, "tokens-a", "tokens-b")

    write_samples(data, 4)
    new_path = store_path(resolve_source(str(data)))
    with open(f"{new_path}.tmp-999999", "wb") as handle:  # what a killed build of the new key leaves
        handle.write(b"partial")
    new = open_store(resolve_source(str(data)))
    assert new.path == new_path != old_path
    assert {p.name for p in cache_dir.iterdir()} == kept | store_files(new_path)
    assert [new[i]["id"] for i in range(len(new))] == [0, 1, 2, 3]
    assert other[1] == {"id": 1, "conversations": TURNS} and other.load_lengths("tokens-a").tolist() == [7, 8]
    assert open_store(prompted)[0]["conversations"][0] == {"from": "system", "value": "Be brief."}


def test_a_store_another_process_reads_is_kept_until_a_later_rebuild(tmp_path, cache_dir):
    data = tmp_path / "data.jsonl"
    write_samples(data, 3)
    first = open_store(resolve_source(str(data))).path
    reader = subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(f"""
            import sys
            from qwenvl.data.annotations import open_store
            from qwenvl.data.sources import resolve_source
            store = open_store(resolve_source("{data}"))
            print(store.path, flush=True)
            sys.stdin.readline()  # until told: the store is open, as in a running job
            print(store[2]["id"], flush=True)
        """)],
        cwd=REPO_ROOT, env=dict(python_env(), QWENVL_ANNOTATION_CACHE=str(cache_dir)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == first, reader.stderr.read()[-2000:] if reader.poll() else ""
        gc.collect()  # this process no longer holds the first store
        write_samples(data, 4)
        second = open_store(resolve_source(str(data))).path
        assert (cache_dir / first.rsplit("/", 1)[1]).exists()  # the reader still has it open
        out, err = reader.communicate("go\n", timeout=120)
        assert reader.returncode == 0 and out.strip() == "2", err[-2000:]
    finally:
        if reader.poll() is None:
            reader.kill()
    gc.collect()
    write_samples(data, 5)
    third = open_store(resolve_source(str(data)))
    assert len(third) == 5
    assert {p.name for p in cache_dir.iterdir()} == store_files(third.path)  # first and second both removed
    assert second != third.path
