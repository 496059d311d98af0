"""Grounding boxes and points in answer text, placed on the image the model sees.

Two ways of writing them are read:

- Qwen's special tokens: ``<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  (the label part is optional; one ``<|box_start|>`` may hold several boxes, comma-separated);
- the JSON the Qwen2.5-VL / Qwen3-VL cookbooks use: ``{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}`` and
  ``{"point_2d": [x, y], "label": "cat"}``, anywhere in the text (a fenced ```json block or inline).

The numbers mean what the family says (``ModelFamily.grounding_range``): absolute pixels of the
resized image (Qwen2.5-VL) or 0-1000 relative coordinates (Qwen2-VL, Qwen3-VL). ``place`` converts
them to pixels of the resized image and flags what falls outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwenvl.models import ModelFamily

_NUMBER = r"-?\d+(?:\.\d+)?"
_POINT = rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
_TOKEN_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?<\|box_start\|>(?P<body>.*?)<\|box_end\|>",
    re.DOTALL)
_BODY_BOX = re.compile(rf"{_POINT}\s*,\s*{_POINT}")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_JSON_KEY = re.compile(rf'"(?P<key>bbox_2d|point_2d)"\s*:\s*\[(?P<values>\s*{_NUMBER}(?:\s*,\s*{_NUMBER})*\s*)\]')
_JSON_LABEL = re.compile(r'"label"\s*:\s*"(?P<label>(?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Grounding:
    """One box (4 numbers: x1, y1, x2, y2) or point (2 numbers: x, y) as written in an answer.

    Attributes:
        label: the object's name ("" when none is written).
        coords: the numbers as written, in the family's frame.
        text: the exact text it was parsed from.
    """

    label: str
    coords: tuple[float, ...]
    text: str

    @property
    def is_box(self) -> bool:
        return len(self.coords) == 4


@dataclass(frozen=True)
class PlacedGrounding:
    """A ``Grounding`` in pixels of the resized image.

    Attributes:
        grounding: what was written.
        pixels: (x1, y1, x2, y2) or (x, y) in pixels of the resized image.
        problem: why it is suspicious ("" when it is not): outside the image, or an empty/inverted box.
    """

    grounding: Grounding
    pixels: tuple[float, ...]
    problem: str = ""


def parse_grounding(text: str) -> list[Grounding]:
    """Every box and point written in ``text``, in order of appearance.

    Args:
        text: an answer.

    Returns:
        the boxes and points; text without any gives ``[]``.

    Example:
        >>> parse_grounding("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>")
        [Grounding(label='cat', coords=(1.0, 2.0, 30.0, 40.0), text='(1,2),(30,40)')]
        >>> [g.coords for g in parse_grounding('[{"bbox_2d": [5, 6, 7, 8], "label": "dog"}, {"point_2d": [3, 4]}]')]
        [(5.0, 6.0, 7.0, 8.0), (3.0, 4.0)]
    """
    found: list[tuple[int, Grounding]] = []
    for match in _TOKEN_BOX.finditer(text):
        label = (match.group("label") or "").strip()
        for box in _BODY_BOX.finditer(match.group("body")):
            found.append((match.start("body") + box.start(),
                          Grounding(label, tuple(float(box.group(k)) for k in range(1, 5)), box.group(0))))
    for match in _JSON_OBJECT.finditer(text):
        obj = match.group(0)
        label_match = _JSON_LABEL.search(obj)
        label = label_match.group("label") if label_match else ""
        for key in _JSON_KEY.finditer(obj):
            values = tuple(float(v) for v in key.group("values").split(","))
            if len(values) == (4 if key.group("key") == "bbox_2d" else 2):
                found.append((match.start() + key.start(), Grounding(label, values, key.group(0))))
    return [grounding for _, grounding in sorted(found, key=lambda pair: pair[0])]


def place(groundings: list[Grounding], family: ModelFamily, width: int, height: int) -> list[PlacedGrounding]:
    """Boxes and points in pixels of the resized ``width`` x ``height`` image, in the family's frame.

    A box whose corner falls outside ``[0, width] x [0, height]`` (or a point outside the image) is
    flagged ``outside the WxH image``; a box with ``x2 <= x1`` or ``y2 <= y1`` is flagged ``empty or inverted``.

    Args:
        groundings: from ``parse_grounding``.
        family: the checkpoint's family (``grounding_scale``).
        width: resized image width in pixels (``grid_w * patch_size``).
        height: resized image height in pixels.

    Returns:
        one ``PlacedGrounding`` per grounding, in order.

    Example:
        >>> [p.pixels for p in place(parse_grounding('{"bbox_2d": [0, 0, 500, 1000]}'), QWEN3_VL, 640, 480)]
        [(0.0, 0.0, 320.0, 480.0)]
    """
    sx, sy = family.grounding_scale(width, height)
    placed = []
    for grounding in groundings:
        pixels = tuple(v * (sx if k % 2 == 0 else sy) for k, v in enumerate(grounding.coords))
        xs, ys = pixels[0::2], pixels[1::2]
        problem = ""
        if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
            problem = f"outside the {width}x{height} image"
        elif grounding.is_box and (pixels[2] <= pixels[0] or pixels[3] <= pixels[1]):
            problem = "empty or inverted box (x2 <= x1 or y2 <= y1)"
        placed.append(PlacedGrounding(grounding, pixels, problem))
    return placed
