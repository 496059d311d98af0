"""Time get_rope_index_25 against transformers' Qwen2_5_VLModel.get_rope_index on long sequences.

Both run on the same input in the same process; the table gives median milliseconds per call.

Usage:
    python bench/rope2d.py
    python bench/rope2d.py --runs 500
    python bench/rope2d.py --threads 1   # as in a DataLoader worker

On a small shared machine, intra-op threads can stall behind other processes; 1 thread is
as fast here (the ops are small) and steadier.
"""

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from qwenvl.data.rope2d import get_rope_index_25  # noqa: E402

MERGE = 2
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653

# name -> (sequence length, number of images, image grid (t, h, w) in patches)
CASES = {
    "16k tokens, 8 images (1, 56, 56)": (16384, 8, (1, 56, 56)),
    "32k tokens, 32 images (1, 40, 40)": (32768, 32, (1, 40, 40)),
}


def make_sequence(length: int, num_images: int, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, length) ids: text, then images wrapped in vision start / end, evenly spread; (num_images, 3) grids."""
    image_tokens = grid[0] * grid[1] * grid[2] // MERGE**2
    text = (length - num_images * (image_tokens + 2)) // (num_images + 1)
    if text < 1:
        raise ValueError(f"{num_images} images of grid {grid} need more than {length} tokens")
    ids: list[int] = []
    for _ in range(num_images):
        ids += [10 + i % 1000 for i in range(text)] + [VISION_START] + [IMAGE] * image_tokens + [VISION_END]
    ids += [10 + i % 1000 for i in range(length - len(ids))]
    return torch.tensor([ids]), torch.tensor([grid] * num_images)


def transformers_rope_index() -> Callable:
    """Qwen2_5_VLModel.get_rope_index bound to a stand-in carrying only the config."""
    stand_in = types.SimpleNamespace(
        config=Qwen2_5_VLConfig(vision_config={"spatial_merge_size": MERGE, "tokens_per_second": 2})
    )
    stand_in.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stand_in)
    return types.MethodType(Qwen2_5_VLModel.get_rope_index, stand_in)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(max(3, runs // 10)):  # warm-up
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed calls of ours (transformers gets a tenth)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    theirs = transformers_rope_index()
    rows = []
    for name, (length, num_images, grid) in CASES.items():
        ids, grids = make_sequence(length, num_images, grid)
        token_type = (ids == IMAGE).int()  # (1, length): 0 text, 1 image
        ours_pos, ours_delta = get_rope_index_25(MERGE, ids, grids)
        their_pos, their_delta = theirs(ids, token_type, image_grid_thw=grids)
        if not (torch.equal(ours_pos, their_pos) and torch.equal(ours_delta, their_delta)):
            raise RuntimeError(f"{name}: get_rope_index_25 disagrees with transformers")
        ours_ms = median_ms(lambda: get_rope_index_25(MERGE, ids, grids), args.runs)
        their_ms = median_ms(lambda: theirs(ids, token_type, image_grid_thw=grids), max(5, args.runs // 10))
        rows.append((name, ours_ms, their_ms, their_ms / ours_ms))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.runs} runs")
    print(f"| {'case':<34} | {'ours ms':>8} | {'transformers ms':>15} | {'ratio':>6} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 17}|{'-' * 8}|")
    for name, ours_ms, their_ms, ratio in rows:
        print(f"| {name:<34} | {ours_ms:>8.3f} | {their_ms:>15.3f} | {ratio:>5.0f}x |")


if __name__ == "__main__":
    main()
