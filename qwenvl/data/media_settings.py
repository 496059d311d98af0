"""How a run turned media into tokens, saved next to the model so inference and the tools do the same.

The image processor's config already carries the pixel limits (``preprocessor_config.json``); what it cannot
hold (the resize mode applied before the family's own resize, ``--image_max_size``, the video frame sampling
and ``--video_max_duration``) is written by training into ``media_settings.json`` of the output folder.
``tools/infer.py`` and the dataset tools read it back as their defaults; a flag given to a tool still wins.

Example:
    >>> save_media_settings({"image_resize_mode": "crop", "image_max_size": 448}, "output/demo")
    >>> read_media_settings("output/demo")["image_resize_mode"]
    'crop'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MEDIA_SETTINGS_FILE = "media_settings.json"

# DataArguments flags that change how media become tokens (the pixel limits are in preprocessor_config.json too).
MEDIA_FLAGS = ("max_pixels", "min_pixels", "base_interval", "video_max_frames", "video_min_frames",
               "video_max_frame_pixels", "video_min_frame_pixels", "video_fps", "video_max_pixels", "video_min_pixels",
               "image_resize_mode", "image_max_size", "video_max_duration")


def media_values(data_args: Any) -> dict[str, Any]:
    """The ``MEDIA_FLAGS`` values of ``data_args`` as JSON numbers, strings or null.

    Example:
        >>> media_values(DataArguments(image_resize_mode="crop", image_max_size=448))["image_max_size"]
        448
    """
    values = {}
    for name in MEDIA_FLAGS:
        value = getattr(data_args, name)
        values[name] = int(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return values


def save_media_settings(values: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``folder/media_settings.json`` atomically (a temporary file renamed over it).

    Args:
        values: flag name -> value (``media_values``); names outside ``MEDIA_FLAGS`` are refused.
        folder: the output folder (created if missing).

    Returns:
        the file written.

    Raises:
        ValueError: a name that is not a media flag.
    """
    unknown = sorted(set(values) - set(MEDIA_FLAGS))
    if unknown:
        raise ValueError(f"expected media flags ({', '.join(MEDIA_FLAGS)}) but found {', '.join(unknown)}")
    path = Path(folder) / MEDIA_SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(values), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_media_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The media flags a run saved in ``folder`` (``{}`` when it saved none: an older or a released checkpoint).

    Raises:
        ValueError: the file is not a JSON object of media flags (names the file).
    """
    path = Path(folder) / MEDIA_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the saved media settings: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of media flags but found {type(values).__name__}")
    unknown = sorted(set(values) - set(MEDIA_FLAGS))
    if unknown:
        raise ValueError(f"{path}: expected media flags ({', '.join(MEDIA_FLAGS)}) but found {', '.join(unknown)}")
    return values
