"""Video pipeline throughput: clips/s of ``load_video`` per decoder and where the time goes.

Single process, one thread, default video flags (base_interval 2 s, 4-8
frames, 4-32 x 28*28 pixels per frame). Two clip sets:

- demo: the three clips of ``demo/videos`` (1-5.5 s, 112x84 to 224x168);
- long: one generated 640x360 30 fps H.264 clip (``--long_seconds``, x264's
  default 250-frame GOP), where decoding has to seek.

Stages: probe (container metadata + sampling plan), decode (the sampled frames
only), resize (PIL bicubic to the planned size), patchify (normalise + cut).

    python bench/video_pipeline.py [--repeats 20] [--long_seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def long_clip(folder: Path, seconds: int) -> Path:
    """A 640x360 30 fps clip: a moving square over a gradient with a little noise (so it does not compress away)."""
    import numpy as np

    from tools.make_demo_videos import write_video

    rng = np.random.default_rng(0)
    frames = np.empty((seconds * 30, 360, 640, 3), dtype=np.uint8)
    gradient = np.linspace(0, 200, 640, dtype=np.float32)[None, :, None]
    for i in range(len(frames)):
        frame = np.broadcast_to(gradient, (360, 640, 3)) + rng.normal(0, 6, (360, 640, 3))
        left = (i * 4) % 560
        frame[140:220, left:left + 80] = (220, 40, 40)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return write_video(folder / "long.mp4", frames, fps=30, crf=23)


def measure(paths: list[str], backend: str, repeats: int) -> dict[str, float]:
    """Mean milliseconds per clip of each stage, and clips/s of ``load_video`` end to end."""
    from qwenvl.data.video import load_video, plan_video, probe_video, read_frames
    from qwenvl.data.vision import VisionConfig, patchify, resize_frames
    from qwenvl.train.argument import DataArguments

    args, cfg = DataArguments(), VisionConfig()
    stages = {"probe": [], "decode": [], "resize": [], "patchify": []}
    for path in paths:
        load_video(path, "", args, cfg, backend=backend)  # warm up (imports, LUT)
    for _ in range(repeats):
        for path in paths:
            t0 = time.perf_counter()
            plan = plan_video(probe_video(path), args, cfg)
            t1 = time.perf_counter()
            frames = read_frames(path, plan.indices, backend)
            t2 = time.perf_counter()
            frames = resize_frames(frames, plan.height, plan.width)
            t3 = time.perf_counter()
            patchify(frames, cfg)
            t4 = time.perf_counter()
            for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[key].append(value)
    out = {key: 1e3 * statistics.fmean(values) for key, values in stages.items()}
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            load_video(path, "", args, cfg, backend=backend)
    out["clips/s"] = repeats * len(paths) / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="passes over each clip set")
    parser.add_argument("--long_seconds", type=int, default=20, help="length of the long clip (0: skip it)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from qwenvl.data.video import available_backends, probe_video

    demo = sorted(str(p) for p in (REPO_ROOT / "demo" / "videos").glob("*.mp4"))
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"demo": demo}
        if args.long_seconds:
            sets["long"] = [str(long_clip(Path(tmp), args.long_seconds))]
        for name, paths in sets.items():
            metas = [probe_video(p) for p in paths]
            sizes = ", ".join(f"{m.width}x{m.height} {m.num_frames / m.fps:.1f}s@{m.fps:g}" for m in metas)
            print(f"{name}: {len(paths)} clip(s): {sizes}")
        print("\n| clips | backend | clips/s | probe ms | decode ms | resize ms | patchify ms |")
        print("|-------|---------|---------|----------|-----------|-----------|-------------|")
        for name, paths in sets.items():
            for backend in available_backends():
                repeats = args.repeats if name == "demo" else max(1, args.repeats // 4)
                r = measure(paths, backend, repeats)
                print(f"| {name:<5} | {backend:<7} | {r['clips/s']:7.1f} | {r['probe']:8.2f} | {r['decode']:9.2f} "
                      f"| {r['resize']:9.2f} | {r['patchify']:11.2f} |")
    print("\nms are per clip (mean); clips/s is load_video end to end, one process, one thread.")


if __name__ == "__main__":
    main()
