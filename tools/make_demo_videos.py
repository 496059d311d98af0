"""Write the demo video clips (``demo/videos/*.mp4``) with PyAV: a coloured shape moving over a plain background.

The clips are tiny (a few KB each) and deterministic: the same PyAV build
writes the same bytes (x264 with one thread). Their durations and frame rates
are chosen so that the default sampling (``base_interval`` 2 s, 4-8 frames)
gives different ``second_per_grid_ts`` (0.5, 1.5, 2.75), and their sizes
cover "already a multiple of 28" and "needs resizing".

Usage:
    python tools/make_demo_videos.py                 # writes demo/videos/
    python tools/make_demo_videos.py --output_dir /tmp/clips
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Clip:
    """One demo clip: ``num_frames`` frames of ``width`` x ``height`` at ``fps``."""

    name: str
    num_frames: int
    fps: int
    width: int
    height: int
    shape: str  # "square", "circle" or "bar"
    colour: tuple[int, int, int]
    background: tuple[int, int, int]


DEMO_CLIPS = (
    # 1 s: 4 sampled frames, 0.5 s per temporal grid step; 112x84 is already a multiple of 28.
    Clip("red_square.mp4", num_frames=12, fps=12, width=112, height=84, shape="square",
         colour=(220, 30, 30), background=(235, 235, 235)),
    # 3 s: 4 frames, 1.5 s per grid step; 160x120 is resized to 168x112.
    Clip("blue_circle.mp4", num_frames=24, fps=8, width=160, height=120, shape="circle",
         colour=(30, 60, 220), background=(250, 245, 210)),
    # 5.5 s: 4 frames, 2.75 s per grid step; 224x168 is over video_max_frame_pixels and shrinks to 168x112.
    Clip("green_bar.mp4", num_frames=33, fps=6, width=224, height=168, shape="bar",
         colour=(20, 160, 60), background=(30, 30, 40)),
)


def render_frame(clip: Clip, index: int) -> np.ndarray:
    """Frame ``index`` of ``clip`` as uint8 (height, width, 3): the shape moves left to right.

    Example:
        >>> render_frame(DEMO_CLIPS[0], 0).shape
        (84, 112, 3)
    """
    frame = np.empty((clip.height, clip.width, 3), dtype=np.uint8)
    frame[:] = clip.background
    size = clip.height // 3
    progress = index / max(clip.num_frames - 1, 1)
    left = int(round(progress * (clip.width - size)))
    top = (clip.height - size) // 2
    if clip.shape == "square":
        frame[top:top + size, left:left + size] = clip.colour
    elif clip.shape == "circle":
        rows, cols = np.ogrid[:clip.height, :clip.width]
        centre_row, centre_col, radius = top + size / 2, left + size / 2, size / 2
        frame[(rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius ** 2] = clip.colour
    elif clip.shape == "bar":
        frame[:, left:left + max(size // 3, 2)] = clip.colour
    else:
        raise ValueError(f"shape should be one of 'square', 'circle' or 'bar' but found {clip.shape!r}")
    return frame


def write_video(
    path: str | Path, frames: np.ndarray, fps: int, crf: int = 18, keyframe_interval: int | None = None
) -> Path:
    """Encode uint8 frames (T, H, W, 3) as H.264 (yuv420p) MP4 at a constant ``fps``.

    Args:
        path: output file (``.mp4``).
        frames: (T, H, W, 3) uint8 RGB; H and W must be even (yuv420p).
        fps: frames per second (an integer, so timestamps are exact).
        crf: x264 quality (lower is better).
        keyframe_interval: frames between keyframes (x264's default, 250, when None).

    Returns:
        path as a Path.

    Example:
        >>> write_video("/tmp/x.mp4", np.zeros((4, 28, 28, 3), np.uint8), fps=4).stat().st_size > 0
        True
    """
    import av  # heavy import only when writing

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames should be uint8 (T, H, W, 3) but found {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size should be even for yuv420p but found {frames.shape[2]}x{frames.shape[1]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        options = {"crf": str(crf), "threads": "1"}
        if keyframe_interval is not None:
            options["g"] = str(keyframe_interval)
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


def write_clip(clip: Clip, output_dir: str | Path) -> Path:
    """Render and encode one demo clip into ``output_dir``."""
    frames = np.stack([render_frame(clip, i) for i in range(clip.num_frames)])
    return write_video(Path(output_dir) / clip.name, frames, clip.fps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "demo" / "videos"))
    args = parser.parse_args(argv)
    for clip in DEMO_CLIPS:
        path = write_clip(clip, args.output_dir)
        print(f"wrote {path} ({path.stat().st_size} bytes, {clip.num_frames} frames at {clip.fps} fps)")


if __name__ == "__main__":
    main()
