"""Packing fill ratio and token-counting speed, for tools/pack_data.py.

Part 1, packing: synthetic long-tail sample lengths (lognormal, median ~600, at most 4096,
20k samples) packed three ways; fill = real tokens / tokens the batches occupy:
    padded batches of 8   random batches, each padded to its longest sample
    chunks of 256         the original tool: binpacking.to_constant_volume on every 256 samples
    first-fit decreasing  ours (tools.pack_data.first_fit_decreasing) over all samples

Part 2, counting: samples per second for the exact count of every demo image sample:
    header only           ours (TokenCounter.count): image sizes from file headers, nothing decoded
    decode images         decode every image to learn its size (open_image), same text path
    full preprocessing    LazySupervisedDataset[i]: decode, resize, patchify, rope - what training does
plus the same on photo-sized JPEGs (--photos N synthetic 1600x1200 pictures). The paths run
interleaved, best pass of --rounds reported; every count is checked against len(dataset[i]["input_ids"]).

Part 3, online packing at start-up (``--data_packing True`` on an unpacked dataset): a JSONL of
--startup_samples samples over the demo images, counted cold (no cache) with 1 and 2 processes,
then warm (cached counts); and ``plan_bins`` (first-fit decreasing + flat arrays) over 100k and
1M long-tail lengths, the time every rank spends on it, with the fill.

Usage:
    python bench/packing.py
    python bench/packing.py --samples 100000 --rounds 10 --photos 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from qwenvl.data.data_qwen import LazySupervisedDataset, parse_conversation, sample_images  # noqa: E402
from qwenvl.data.token_count import TokenCounter, encode_sample  # noqa: E402
from qwenvl.data.vision import VisionConfig, image_grid_thw, num_vision_tokens, open_image  # noqa: E402
from qwenvl.train.argument import DataArguments  # noqa: E402
from qwenvl.data.packing import count_lengths, first_fit_decreasing, plan_bins  # noqa: E402

DEMO_IMAGE_SETS = ["demo_single_image", "demo_multi_image", "demo_grounding"]


# --------------------------------------------------------------------- packing
def long_tail_lengths(n: int, median: float, sigma: float, longest: int, seed: int) -> list[int]:
    """Lognormal lengths with the given median, redrawn above ``longest`` (so the max is <= longest)."""
    rng = np.random.default_rng(seed)
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        draw = np.rint(rng.lognormal(math.log(median), sigma, size=n)).astype(np.int64)
        out = np.concatenate([out, draw[(draw >= 1) & (draw <= longest)]])
    return out[:n].tolist()


def padded_batches(lengths: Sequence[int], batch: int, seed: int) -> tuple[int, int]:
    """(real tokens, occupied tokens) of random batches padded to their longest sample."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    occupied = 0
    for start in range(0, len(order), batch):
        members = [lengths[i] for i in order[start:start + batch]]
        occupied += len(members) * max(members)
    return sum(lengths), occupied


def chunked_binpacking(lengths: Sequence[int], pack_length: int, chunk: int = 256) -> list[list[int]]:
    """The original tool: ``binpacking.to_constant_volume`` on consecutive chunks of 256 samples."""
    import binpacking

    bins = []
    for start in range(0, len(lengths), chunk):
        weights = {i: lengths[i] for i in range(start, min(start + chunk, len(lengths)))}
        bins.extend(list(b) for b in binpacking.to_constant_volume(weights, pack_length) if b)
    return bins


def timed(fn: Callable, *args) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def packing_table(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    lengths = long_tail_lengths(args.samples, args.median, args.sigma, args.pack_length, args.seed)
    total = sum(lengths)
    rows = []
    (real, occupied), seconds = timed(padded_batches, lengths, 8, args.seed)
    rows.append(("padded random batches of 8", f"{-(-len(lengths) // 8)} batches", f"{100 * real / occupied:.2f}%",
                 f"{seconds * 1e3:.1f} ms"))
    for name, fn in (("chunks of 256 (original)", chunked_binpacking),
                     ("first-fit decreasing (ours)", first_fit_decreasing)):
        bins, seconds = timed(fn, lengths, args.pack_length)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths))), name
        assert all(sum(lengths[i] for i in b) <= args.pack_length for b in bins), name
        rows.append((name, f"{len(bins)} bins", f"{100 * total / (len(bins) * args.pack_length):.2f}%",
                     f"{seconds * 1e3:.1f} ms"))
    rows.append(("lower bound", f"{-(-total // args.pack_length)} bins",
                 f"{100 * total / (-(-total // args.pack_length) * args.pack_length):.2f}%", ""))
    print(f"\nPacking {len(lengths)} samples into {args.pack_length} tokens: lognormal median {args.median}, "
          f"sigma {args.sigma}, longest {max(lengths)}, mean {statistics.mean(lengths):.0f}, "
          f"real tokens {total}")
    return rows


# -------------------------------------------------------------------- counting
def write_photos(folder: Path, count: int, seed: int) -> list[dict]:
    """``count`` noisy 1600x1200 JPEG photos (camera-like sizes) and one sample per photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for n in range(count):
        base = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((1600, 1200), Image.Resampling.BILINEAR)
        image.save(folder / f"photo{n}.jpg", quality=90)
        samples.append({"image": f"photo{n}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the photo."}, {"from": "gpt", "value": "Noise."}]})
    return samples


def decode_count(counter: TokenCounter, record: dict, data_path: str) -> int:
    """Exact count by decoding every image to learn its size (text path as ours)."""
    cfg = counter.vision_config
    grids = []
    for source in sample_images(record):
        image = open_image(source, data_path)
        grids.append(image_grid_thw(image.height, image.width, cfg))
    ids, _ = encode_sample(counter.encoder, parse_conversation(record), [num_vision_tokens(g, cfg.merge_size)
                                                                         for g in grids], [], counter.model_max_length)
    return len(ids)


def counting_rows(label: str, dataset: LazySupervisedDataset, counter: TokenCounter,
                  rounds: int) -> list[tuple[str, str, str, str]]:
    """Best-of-``rounds`` throughput of the three paths, measured interleaved (one pass each per round),
    so load from other processes on a shared machine hits all paths alike."""
    jobs = list(zip(dataset.records, dataset.refs))
    exact = [len(dataset[i]["input_ids"]) for i in range(len(jobs))]  # also warms the file cache
    paths = {
        "header only (ours)": lambda i, r, d: counter.count(r, d).length,
        "decode images": lambda i, r, d: decode_count(counter, r, d),
        "full preprocessing": lambda i, r, d: len(dataset[i]["input_ids"]),
    }
    best = dict.fromkeys(paths, math.inf)
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            got = [fn(i, record, ref.data_path) for i, (record, ref) in enumerate(jobs)]
            best[name] = min(best[name], time.perf_counter() - start)
            assert got == exact, f"{label}: {name} counts differ from len(dataset[i]['input_ids'])"
    full = len(jobs) / best["full preprocessing"]
    return [(f"{label}: {name}", f"{len(jobs) / seconds:.1f} samples/s", f"{len(jobs) / seconds / full:.1f}x",
             "exact") for name, seconds in best.items()]


def counting_table(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    from transformers import AutoTokenizer

    from qwenvl.train.train_qwen import load_image_processor

    model = args.model
    if model is None:
        default = Path(__file__).resolve().parents[1] / "tiny_model" / "qwen2_5_vl"
        if (default / "config.json").exists():
            model = str(default)
        else:
            from tools.build_tiny_model import build_tiny_model

            model = str(build_tiny_model(tempfile.mkdtemp(prefix="tiny_qwen_"), model_type="qwen2_5_vl"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    data_args = DataArguments(dataset_use=",".join(DEMO_IMAGE_SETS))
    cfg = VisionConfig.from_image_processor(load_image_processor(model), data_args.min_pixels, data_args.max_pixels)
    counter = TokenCounter(tokenizer, data_args, cfg, model_max_length=8192)
    demo = LazySupervisedDataset(tokenizer, data_args, cfg, model_max_length=8192)
    images = sum(len(sample_images(r)) for r in demo.records)
    print(f"\nCounting: {len(demo)} demo samples with {images} images ({', '.join(DEMO_IMAGE_SETS)}), "
          f"max_pixels {data_args.max_pixels}")
    rows = counting_rows("demo", demo, counter, args.rounds)
    if args.photos:
        import qwenvl.data as registry

        folder = Path(tempfile.mkdtemp(prefix="bench_photos_"))
        (folder / "photos.json").write_text(json.dumps(write_photos(folder, args.photos, args.seed)))
        registry.data_dict["bench_photos"] = {"annotation_path": str(folder / "photos.json"), "data_path": str(folder)}
        photos = LazySupervisedDataset(tokenizer, DataArguments(dataset_use="bench_photos"), cfg, model_max_length=8192)
        print(f"and {args.photos} synthetic 1600x1200 JPEG photos")
        rows += counting_rows("photos", photos, counter, max(1, args.rounds // 2))
    return rows


def startup_table(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as training and pack_data run
    from transformers import AutoTokenizer

    import qwenvl.data as registry
    from qwenvl.data.annotations import AnnotationSet
    from qwenvl.data.packing import lengths_name
    from qwenvl.train.train_qwen import load_image_processor

    model = args.model or str(Path(__file__).resolve().parents[1] / "tiny_model" / "qwen2_5_vl")
    if not (Path(model) / "config.json").exists():
        from tools.build_tiny_model import build_tiny_model

        model = str(build_tiny_model(tempfile.mkdtemp(prefix="tiny_qwen_"), model_type="qwen2_5_vl"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    demo = registry.data_list(["demo_single_image"])[0]
    records = json.loads(Path(demo["annotation_path"]).read_text())
    folder = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    os.environ["QWENVL_ANNOTATION_CACHE"] = str(folder / "cache")
    with open(folder / "startup.jsonl", "w") as handle:
        for n in range(args.startup_samples):
            handle.write(json.dumps(records[n % len(records)]) + "\n")
    registry.data_dict["bench_startup"] = {"annotation_path": str(folder / "startup.jsonl"),
                                           "data_path": demo["data_path"]}
    data_args = DataArguments(dataset_use="bench_startup")
    cfg = VisionConfig.from_image_processor(load_image_processor(model), data_args.min_pixels, data_args.max_pixels)
    counter = TokenCounter(tokenizer, data_args, cfg, model_max_length=8192)
    annotations = AnnotationSet("bench_startup", seed=42)
    count_lengths(AnnotationSet("demo_single_image", seed=42), counter, 1, progress=False)  # one-time costs
    rows = []
    for workers in (1, 2):
        for store in annotations.stores:  # cold: drop the cached counts
            for suffix in ("", ".full"):
                path = store.lengths_path(lengths_name(counter) + suffix)
                if os.path.exists(path):
                    os.remove(path)
        counts = count_lengths(annotations, counter, workers, progress=False)
        rows.append((f"count {len(annotations)} samples, cold, {workers} process(es)",
                     f"{counts.seconds:.2f} s", f"{len(annotations) / counts.seconds:.0f} samples/s", ""))
    counts = count_lengths(annotations, counter, 1, progress=False)
    rows.append((f"count {len(annotations)} samples, warm (cache)", f"{counts.seconds * 1e3:.1f} ms", "",
                 f"{counts.counted} counted"))
    for n in (100_000, 1_000_000):
        lengths = np.asarray(long_tail_lengths(n, args.median, args.sigma, args.pack_length, args.seed))
        plan, seconds = timed(plan_bins, lengths, args.pack_length, args.seed)
        rows.append((f"plan_bins {n} samples into {args.pack_length}", f"{seconds:.2f} s", f"{len(plan)} bins",
                     f"fill {100 * plan.fill:.2f}%"))
    return rows


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for n, row in enumerate([header, *rows]):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--median", type=float, default=600)
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma (long tail)")
    parser.add_argument("--pack_length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: tiny_model/qwen2_5_vl, built "
                                                      "in a temp folder when missing)")
    parser.add_argument("--rounds", type=int, default=6, help="timed passes per counting path (best one counts)")
    parser.add_argument("--photos", type=int, default=24, help="synthetic photo-sized JPEGs (0: skip)")
    parser.add_argument("--startup_samples", type=int, default=20000,
                        help="samples counted in the online packing start-up part (0: skip it)")
    args = parser.parse_args(argv)
    print_table(("strategy", "batches", "fill", "time"), packing_table(args))
    print_table(("counting path", "throughput", "vs full", "counts"), counting_table(args))
    if args.startup_samples:
        print(f"\nOnline packing at start-up ({args.startup_samples} samples over the demo images; lengths "
              f"lognormal median {args.median})")
        print_table(("step", "time", "rate / bins", "note"), startup_table(args))


if __name__ == "__main__":
    main()
