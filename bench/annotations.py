"""Benchmark: annotation store (memory-mapped Arrow) against the in-memory record list, per node.

For synthetic JSONL files (an image path and 2-6 turns of 50-400 characters per sample) it
measures, each in a fresh process:

- construction time, cold (the store is converted) and warm (it is reused), and the
  baseline ``load_annotations`` + a list of records and ``SampleRef``s (what
  ``LazySupervisedDataset`` holds today);
- RSS of the process after construction;
- the summed private memory (Private_Dirty) of that process and 4 DataLoader workers (fork), when
  the workers have started and after 2000 random items (then once more after one
  ``gc.collect()`` in each worker, which copies every page holding a tracked object);
- a per-node extrapolation (8 ranks x 4 workers; the store's file counted once, in the
  page cache) to 10M samples, linear in the number of samples from the two largest sizes.

Also compares, on 100k samples, the store's one-JSON-column layout with a nested Arrow
schema (file size, random-row read time).

Usage::

    python bench/annotations.py                  # 10k and 100k samples (a minute)
    python bench/annotations.py --sizes 1000000  # the full run (several minutes, ~6 GB RAM for the baseline)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
MB = 1 << 20
WORKERS = 4
ITEMS = 2000
NODE_RANKS = 8
_GC = -1  # sentinel index: the worker runs gc.collect()


def write_jsonl(path: str, size: int, seed: int = 0) -> None:
    """``size`` realistic samples: one image, 1-3 human/gpt pairs of 50-400 characters."""
    rng = random.Random(seed)
    words = ["the", "image", "shows", "a", "red", "circle", "next", "to", "blue", "square", "on", "white",
             "background", "what", "color", "is", "object", "left", "of", "and", "there", "are", "three", "items"]

    def text(low: int, high: int) -> str:
        target = rng.randint(low, high)
        out: list[str] = []
        length = 0
        while length < target:
            word = rng.choice(words)
            out.append(word)
            length += len(word) + 1
        return " ".join(out)

    with open(path, "w", encoding="utf-8") as handle:
        for i in range(size):
            turns = []
            for pair in range(rng.randint(1, 3)):
                question = text(50, 400)
                turns.append({"from": "human", "value": ("<image>\n" if pair == 0 else "") + question})
                turns.append({"from": "gpt", "value": text(50, 400)})
            record = {"id": f"sample-{i}", "image": f"images/{i % 1000:03d}/{i}.jpg", "conversations": turns}
            handle.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- child process
class RecordDataset:
    """A torch-style dataset over records: returns the record's turn count (touches the record like training)."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> int:
        if i == _GC:
            gc.collect()
            return 0
        record = self.records[i]
        return len(record["conversations"]) + len(record["image"])


def private_dirty(pids: list[int]) -> int:
    """Summed Private_Dirty bytes: memory each process holds alone (its heap, pages copied on write).

    Not USS: USS also counts clean pages of the memory-mapped store that only one process has
    touched, which are page cache shared by the node, not a process's own memory.
    """
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            total += sum(int(line.split()[1]) * 1024 for line in handle if line.startswith("Private_Dirty:"))
    return total


def child(mode: str, path: str, cache_dir: str, workers: bool, gc_workers: int = WORKERS) -> dict:
    """Build the records one way, then (optionally) read 2000 random items through 4 DataLoader workers.

    ``gc_workers`` of the workers run ``gc.collect()`` at the end; the growth it causes is scaled
    to all 4 (the in-memory baseline at 1M samples would need ~2 GB more per collecting worker).
    """
    import psutil
    import pyarrow  # noqa: F401  (imported by training anyway, through datasets; not the store's cost)
    import torch

    os.environ["QWENVL_ANNOTATION_CACHE"] = cache_dir
    from qwenvl.data.annotations import AnnotationSet
    from qwenvl.data.data_qwen import SampleRef, load_annotations

    me = psutil.Process()
    rss_imports = me.memory_info().rss
    start = time.perf_counter()
    if mode.startswith("store"):
        records = AnnotationSet(path, seed=0)
        _refs = records.refs
        _lengths = records.rough_lengths()
    else:
        loaded = load_annotations(path)
        records = [loaded[i] for i in range(len(loaded))]  # LazySupervisedDataset's copy of the kept records
        _refs = [SampleRef(path, path, "", i) for i in range(len(loaded))]
        del loaded
    seconds = time.perf_counter() - start
    me = psutil.Process()
    result = {"mode": mode, "seconds": seconds, "rss": me.memory_info().rss, "rss_imports": rss_imports}
    if not workers:
        return result
    rng = random.Random(1)
    order = [rng.randrange(len(records)) for _ in range(ITEMS + 3 * WORKERS)]
    # Workers take indices in turn and keep one in flight (prefetch_factor=1): the plain items after
    # the 2000 keep the gc.collect() sentinels from running before the "after" measurement.
    gc_round = [_GC] * gc_workers + order[-WORKERS:][:WORKERS - gc_workers]
    sampler = order[:WORKERS + ITEMS + WORKERS] + gc_round + order[-WORKERS:]
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    loader = torch.utils.data.DataLoader(RecordDataset(records), batch_size=1, num_workers=WORKERS,
                                         sampler=sampler, multiprocessing_context="fork", prefetch_factor=1)
    if mode == "store_frozen":
        gc.freeze()  # objects made so far are never collected, so a worker's gc.collect() does not copy them
    iterator = iter(loader)
    for _ in range(WORKERS):
        next(iterator)
    pids = [me.pid] + [w.pid for w in iterator._workers]
    time.sleep(0.5)
    result["workers_before"] = private_dirty(pids)
    for _ in range(ITEMS):
        next(iterator)
    result["workers_after"] = private_dirty(pids)
    for _ in range(2 * WORKERS):
        next(iterator)
    time.sleep(0.5)
    result["workers_after_gc"] = (result["workers_after"]
                                  + (private_dirty(pids) - result["workers_after"]) * WORKERS / gc_workers)
    for _ in iterator:
        pass
    del iterator
    return result


def run_child(mode: str, path: str, cache_dir: str, workers: bool, gc_workers: int = WORKERS) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path, "--cache", cache_dir,
               "--gc-workers", str(gc_workers)]
    if workers:
        command.append("--workers")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- schema comparison
def compare_schemas(path: str, cache_dir: str, rows: int = 1000) -> list[list[str]]:
    """One JSON-text column (the store) against a nested Arrow schema: size and random-row read time."""
    import pyarrow as pa

    from qwenvl.data.annotations import AnnotationSet

    os.environ["QWENVL_ANNOTATION_CACHE"] = cache_dir
    store = AnnotationSet(path, seed=0).stores[0]
    with open(path, encoding="utf-8") as handle:
        table = pa.Table.from_pylist([json.loads(line) for line in handle])
    nested = os.path.join(cache_dir, "nested.arrow")
    with pa.OSFile(nested, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8192)
    del table
    mapped = pa.ipc.open_stream(pa.memory_map(nested)).read_all()
    picks = [random.Random(2).randrange(len(store)) for _ in range(rows)]
    start = time.perf_counter()
    for i in picks:
        store[i]
    json_us = (time.perf_counter() - start) / rows * 1e6
    start = time.perf_counter()
    for i in picks:
        mapped.slice(i, 1).to_pylist()[0]
    nested_us = (time.perf_counter() - start) / rows * 1e6
    return [["JSON text column (store)", f"{os.path.getsize(store.path) / MB:.0f}", f"{json_us:.1f}"],
            ["nested Arrow schema", f"{os.path.getsize(nested) / MB:.0f}", f"{nested_us:.1f}"]]


# ---------------------------------------------------------------- table
def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", default=None, help="where the JSONL files and caches go (a temp folder)")
    parser.add_argument("--no-schema", action="store_true", help="skip the JSON-column vs nested-schema comparison")
    parser.add_argument("--child", choices=["store", "store_frozen", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--workers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gc-workers", type=int, default=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.cache, args.workers, args.gc_workers)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_annotations_")
    os.makedirs(workdir, exist_ok=True)
    rows, node = [], {}
    for size in args.sizes:
        path = os.path.join(workdir, f"samples_{size}.jsonl")
        if not os.path.exists(path):
            write_jsonl(path, size)
        cache = os.path.join(workdir, f"cache_{size}")
        subprocess.run(["rm", "-rf", cache], check=True)
        cold = run_child("store", path, cache, workers=False)
        warm = run_child("store", path, cache, workers=True)
        frozen = run_child("store_frozen", path, cache, workers=True)
        store_file = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache) if f.endswith(".arrow"))
        base = run_child("baseline", path, cache, workers=True, gc_workers=1 if size > 300_000 else WORKERS)
        file_mb = os.path.getsize(path) / MB
        for name, build, measured, shared in (
            ("store", f"{cold['seconds']:.1f} / {warm['seconds']:.2f}", warm, store_file),
            ("store, gc.freeze()", f"- / {frozen['seconds']:.2f}", frozen, store_file),
            ("in-memory (today)", f"{base['seconds']:.1f}", base, 0),
        ):
            private = NODE_RANKS * measured["workers_after_gc"]
            node.setdefault(name, []).append((size, private, shared))
            rows.append([f"{size:,}", f"{file_mb:.0f}", name, build,
                         f"{measured['rss'] / MB:.0f} (+{(measured['rss'] - measured['rss_imports']) / MB:.0f})",
                         f"{measured['workers_before'] / MB:.0f}", f"{measured['workers_after'] / MB:.0f}",
                         f"{measured['workers_after_gc'] / MB:.0f}",
                         f"{(measured['workers_after'] - measured['workers_before']) / WORKERS / MB:.0f} / "
                         f"{(measured['workers_after_gc'] - measured['workers_before']) / WORKERS / MB:.0f}",
                         f"{private / 2**30:.2f} + {shared / 2**30:.2f}"])
        print(f"done {size:,}", file=sys.stderr, flush=True)
    print(table(["samples", "JSONL MB", "records", "build s (cold / warm)", "RSS MB (+ over imports)",
                 "private MB (1+4) before", "after 2000 items", "after gc", "growth/worker MB (items / +gc)",
                 "node GB: private + shared file"], rows))
    print()
    extrapolated = []
    for name, points in node.items():
        if len(points) < 2:  # a fixed cost (interpreter, torch) cannot be told from a per-sample one
            continue
        (n0, p0, s0), (n1, p1, s1) = points[-2], points[-1]
        for target in (1_000_000, 10_000_000):
            private = p1 + (p1 - p0) / (n1 - n0) * (target - n1)
            shared = s1 + (s1 - s0) / (n1 - n0) * (target - n1)
            extrapolated.append([name, f"{target:,}", f"{private / 2**30:.1f} + {shared / 2**30:.1f}"])
    if extrapolated:
        print(table(["records", "samples", "per node GB, 8 ranks x (1 + 4 workers): private + shared file"],
                    extrapolated))
    if not args.no_schema:
        size = min(args.sizes, key=lambda s: abs(s - 100_000))
        print()
        print(f"layout, {size:,} samples, 1000 random rows:")
        print(table(["layout", "file MB", "us per row"],
                    compare_schemas(os.path.join(workdir, f"samples_{size}.jsonl"),
                                    os.path.join(workdir, f"cache_{size}"))))


if __name__ == "__main__":
    main()
