"""qwenvl/data/annotations.py: older stores of a source are removed after a rebuild, others are kept; a killed
conversion is never read; an edit that keeps size and mtime is seen."""

from __future__ import annotations

import gc
import glob
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from qwenvl.data.annotations import hashes_path, open_store, store_path
from qwenvl.data.chat import load_annotations
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


def hash_files(*sources) -> set[str]:
    """The names of the sources' content-hash records (``file_hashes``) and their locks: one per source, kept."""
    names = set()
    for source in sources:
        name = os.path.basename(hashes_path(source, os.environ["QWENVL_ANNOTATION_CACHE"]))
        names |= {name, f"{name}.lock"}
    return names


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
    kept = (store_files(other.path, "tokens-a") | store_files(prompted_path)
            | hash_files(other.source, prompted, resolve_source(str(data))))
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
    # first and second both removed
    assert {p.name for p in cache_dir.iterdir()} == store_files(third.path) | hash_files(third.source)
    assert second != third.path


# ---------------------------------------------------------------- faults that lose work
CONVERT = textwrap.dedent("""
    import sys
    from qwenvl.data.annotations import open_store
    from qwenvl.data.sources import resolve_source
    open_store(resolve_source(sys.argv[1]))
""")


def test_a_conversion_killed_midway_is_never_read_and_the_next_run_converts_it_whole(tmp_path, cache_dir):
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": f"q{i} " * (i % 7)},
                                                                   {"from": "gpt", "value": f"a{i}"}]}) + "\n"
                            for i in range(120_000)))
    source = resolve_source(str(data))
    final = store_path(source)
    temporary = None
    process = subprocess.Popen([PYTHON, "-c", CONVERT, str(data)], cwd=REPO_ROOT,
                               env=dict(python_env(), QWENVL_ANNOTATION_CACHE=str(cache_dir)), stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        # Killed once a few batches of rows are written into its temporary: mid-conversion.
        while temporary is None or os.path.getsize(temporary) < 1 << 20:
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.time() < deadline, "the conversion never started"
            temporary = next(iter(glob.glob(f"{final}.tmp-{process.pid}")), None)
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert os.path.exists(temporary) and not os.path.exists(final)  # killed between the two: nothing published
    assert os.path.exists(f"{final}.lock")  # its build lock is left behind (the kernel released the flock)

    started = time.time()
    store = open_store(resolve_source(str(data)))  # not blocked by the dead builder's lock
    assert store.path == final and time.time() - started < 60
    assert not os.path.exists(temporary)  # the dead process's leftover is removed
    expected = load_annotations(str(data))
    assert len(store) == len(expected) == 120_000
    assert all(store[i] == expected[i] for i in range(0, 120_000, 7)) and store[119_999] == expected[119_999]
    assert json.loads(open(f"{final}.meta").read())["bytes"] == os.path.getsize(final)

    # A store cut short after it was published (a copy that stopped, a full disk) is rebuilt, not read.
    del store
    gc.collect()
    os.truncate(final, os.path.getsize(final) // 2)
    rebuilt = open_store(resolve_source(str(data)))
    assert rebuilt.path == final and len(rebuilt) == 120_000 and rebuilt[119_999] == expected[119_999]


def test_an_edit_that_keeps_size_and_mtime_is_seen_and_a_touch_does_not_reconvert(tmp_path, cache_dir):
    data = tmp_path / "data.jsonl"
    write_samples(data, 40_000)  # 3.4 MB: an edit in the middle is out of reach of a hash of the first and last MB
    time.sleep(2.1)  # the file is older than 2 s when it is hashed: its signature is trusted from then on
    first = open_store(resolve_source(str(data)))
    assert [first[i]["conversations"][1]["value"] for i in (0, 20_000, 39_999)] == ["yo"] * 3
    record = cache_dir / os.path.basename(hashes_path(first.source, str(cache_dir)))
    checked = json.loads(record.read_text())["checked_ns"]
    assert open_store(resolve_source(str(data))).path == first.path
    assert json.loads(record.read_text())["checked_ns"] == checked  # warm: the signature held, nothing hashed

    # Edit the middle record in place, same size, then put the old mtime back.
    before = os.stat(data)
    text = data.read_text()
    data.write_text(text.replace('"yo"}]}\n{"id": 20001,', '"no"}]}\n{"id": 20001,'))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(data)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = open_store(resolve_source(str(data)))
    assert edited.path != first.path
    assert [edited[i]["conversations"][1]["value"] for i in (0, 19_999, 20_000, 20_001)] == ["yo", "yo", "no", "yo"]

    # touch, and a copy of the same bytes over the file: hashed again, the same store found, no conversion.
    stamp = os.stat(edited.path).st_mtime_ns
    os.utime(data)
    assert open_store(resolve_source(str(data))).path == edited.path
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    os.replace(copy, data)  # a new inode
    again = open_store(resolve_source(str(data)))
    assert again.path == edited.path and os.stat(again.path).st_mtime_ns == stamp
    assert json.loads(record.read_text())["files"][0][4] == os.stat(data).st_ino
