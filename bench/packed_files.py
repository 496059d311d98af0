"""Benchmark: opening a packed file (tools/pack_data.py output) for ``--data_packing True``, per process.

Writes a packed file of ``--samples`` demo records in groups of ``--group`` and measures, each in
a fresh process (so RSS is that process's own):

- ``store (cold)``: ``PackedSupervisedDataset`` when the annotation store is built (once per node);
- ``store (warm)``: the same when the store and the group sizes are cached (every later process);
- ``in-memory``: what the dataset held before the store: the whole file parsed, one record and one
  ``PackedSampleRef`` per sample in Python lists (``load_annotations`` + the flattening it did).

Columns: seconds to construct, RSS growth over the imports (MB) and per sample (bytes).

Usage::

    python bench/packed_files.py                    # 200k samples
    python bench/packed_files.py --samples 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import psutil
from transformers import AutoTokenizer
import qwenvl.data as registry
from qwenvl.data.chat import load_annotations
from qwenvl.data.data_qwen_packed import PackedSampleRef, PackedSupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments

mode, path, model = sys.argv[2], sys.argv[3], sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(model)
cfg = VisionConfig.from_image_processor(load_image_processor(model), 4 * 28 * 28, 64 * 28 * 28)
registry.data_dict["bench_pack"] = {"annotation_path": path, "data_path": os.path.join(sys.argv[1], "demo")}
process = psutil.Process()
before = process.memory_info().rss
start = time.perf_counter()
if mode == "in-memory":
    records, refs = [], []
    for g, group in enumerate(load_annotations(path)):
        for position, sample in enumerate(group):
            records.append(sample)
            refs.append(PackedSampleRef("bench_pack", path, "", g, position))
    samples = len(records)
else:
    dataset = PackedSupervisedDataset(tokenizer, DataArguments(dataset_use="bench_pack"), cfg, model_max_length=4096)
    samples = len(dataset.records)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss": process.memory_info().rss - before, "samples": samples}))
"""


def run(mode: str, path: str, model: str, cache: str) -> dict:
    env = dict(os.environ, QWENVL_ANNOTATION_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", CHILD, REPO_ROOT, mode, path, model], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--group", type=int, default=20, help="samples per packed group")
    parser.add_argument("--model", default=os.path.join(REPO_ROOT, "tiny_model", "qwen2_5_vl"),
                        help="checkpoint folder (built when missing)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.model, "config.json")):
        from tools.build_tiny_model import build_tiny_model

        build_tiny_model(args.model, model_type="qwen2_5_vl")
    folder = tempfile.mkdtemp(prefix="bench_packed_")
    records = json.load(open(os.path.join(REPO_ROOT, "demo", "single_image.json"), encoding="utf-8"))
    groups = [[records[(start + k) % len(records)] for k in range(args.group)]
              for start in range(0, args.samples, args.group)]
    path = os.path.join(folder, "bench_pack.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(groups, handle)
    cache = os.path.join(folder, "cache")
    rows = [("store (cold)", run("store", path, args.model, cache)),
            ("store (warm)", run("store", path, args.model, cache)),
            ("in-memory", run("in-memory", path, args.model, cache))]
    print(f"\n{len(groups) * args.group:,} samples in {len(groups):,} groups of {args.group} "
          f"({os.path.getsize(path) / 2**20:.0f} MB JSON)")
    print("| records | construct s | RSS growth MB | bytes per sample |")
    print("|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['seconds']:.2f} | {row['rss'] / 2**20:.0f} | {row['rss'] / row['samples']:.0f} |")


if __name__ == "__main__":
    main()
