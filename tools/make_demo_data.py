"""Write the demo dataset: small PIL-drawn images with known answers and annotation files.

Everything is drawn here (no third-party media), deterministically: re-running
the script rewrites the same files. Media paths in the annotation files are
relative to the output folder (`demo/`), so register the demo datasets with
`"data_path": "demo"` (or the absolute path of that folder).

Usage:
    python tools/make_demo_data.py                   # writes ./demo
    python tools/make_demo_data.py --output_dir /tmp/demo
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in absolute pixels, corners inclusive
Color = tuple[int, ...] | int

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "demo"


@dataclass(frozen=True)
class DemoObject:
    """One drawn shape: `name` is how answers refer to it ("the red circle")."""

    name: str
    shape: str  # "circle", "ellipse", "square", "rectangle", "triangle"
    color: Color
    box: Box


@dataclass(frozen=True)
class DemoImage:
    """One image file: PIL `mode` ("RGB", "RGBA", "L", "P"), `size` (width, height)."""

    file: str  # relative to the output folder
    size: tuple[int, int]
    mode: str
    background: Color
    objects: tuple[DemoObject, ...]


RED, GREEN, BLUE = (220, 30, 30), (30, 160, 60), (30, 60, 220)

IMAGES: dict[str, DemoImage] = {
    image.file.split("/")[-1].split(".")[0]: image
    for image in [
        DemoImage("images/red_circle.jpg", (320, 240), "RGB", (255, 255, 255),
                  (DemoObject("the red circle", "circle", RED, (120, 80, 200, 160)),)),
        DemoImage("images/blue_square.jpg", (224, 224), "RGB", (235, 235, 235),
                  (DemoObject("the blue square", "square", BLUE, (62, 62, 162, 162)),)),
        DemoImage("images/green_triangle.jpg", (640, 480), "RGB", (255, 255, 255),
                  (DemoObject("the green triangle", "triangle", GREEN, (220, 140, 420, 340)),)),
        DemoImage("images/two_shapes.jpg", (400, 300), "RGB", (255, 255, 255),
                  (DemoObject("the red circle", "circle", RED, (40, 90, 160, 210)),
                   DemoObject("the blue square", "square", BLUE, (240, 90, 360, 210)))),
        DemoImage("images/orange_circle_rgba.png", (128, 128), "RGBA", (0, 0, 0, 0),
                  (DemoObject("the orange circle", "circle", (250, 140, 20, 255), (24, 24, 104, 104)),)),
        DemoImage("images/purple_triangle_rgba.png", (96, 160), "RGBA", (255, 255, 255, 0),
                  (DemoObject("the purple triangle", "triangle", (130, 40, 170, 220), (8, 40, 88, 120)),)),
        DemoImage("images/yellow_ellipse_wide.jpg", (480, 120), "RGB", (20, 30, 90),
                  (DemoObject("the yellow ellipse", "ellipse", (250, 220, 40), (160, 20, 320, 100)),)),
        DemoImage("images/green_bar_tall.jpg", (100, 400), "RGB", (255, 255, 255),
                  (DemoObject("the green bar", "rectangle", GREEN, (30, 40, 70, 360)),)),
        DemoImage("images/gray_square_l.png", (64, 64), "L", 0,
                  (DemoObject("the gray square", "square", 150, (16, 16, 48, 48)),)),
        DemoImage("images/three_shapes_p.png", (256, 192), "P", (255, 255, 255),
                  (DemoObject("the red circle", "circle", RED, (16, 56, 80, 120)),
                   DemoObject("the green square", "square", GREEN, (96, 56, 160, 120)),
                   DemoObject("the blue triangle", "triangle", BLUE, (176, 56, 240, 120)))),
        DemoImage("images/five_dots.jpg", (300, 200), "RGB", (255, 255, 255),
                  tuple(DemoObject(f"dot {i + 1}", "circle", (0, 0, 0), (30 + 52 * i, 80, 60 + 52 * i, 110))
                        for i in range(5))),
    ]
}  # fmt: skip

# Inline images, kept tiny: 56x56 = 3136 pixels, the released min_pixels.
INLINE_RED_CIRCLE = DemoImage("inline_red_circle.png", (56, 56), "RGB", (255, 255, 255),
                              (DemoObject("the red circle", "circle", RED, (12, 12, 44, 44)),))  # fmt: skip
INLINE_BLUE_SQUARE = DemoImage("inline_blue_square.png", (56, 56), "RGB", (255, 255, 255),
                               (DemoObject("the blue square", "square", BLUE, (14, 14, 42, 42)),))  # fmt: skip


def draw_image(spec: DemoImage) -> Image.Image:
    """Draw the shapes of `spec` and return the image in `spec.mode`.

    Args:
        spec (DemoImage): size, mode, background and shapes.

    Returns:
        Image.Image: the drawn image; "P" images are drawn in RGB and quantised to a small palette.

    Example:
        >>> draw_image(IMAGES["red_circle"]).getpixel((160, 120))
        (220, 30, 30)
    """
    canvas_mode = "RGB" if spec.mode == "P" else spec.mode
    image = Image.new(canvas_mode, spec.size, spec.background)
    draw = ImageDraw.Draw(image)
    for obj in spec.objects:
        x1, y1, x2, y2 = obj.box
        if obj.shape in ("circle", "ellipse"):
            draw.ellipse(obj.box, fill=obj.color)
        elif obj.shape in ("square", "rectangle"):
            draw.rectangle(obj.box, fill=obj.color)
        elif obj.shape == "triangle":  # apex at the top centre, base along the bottom edge
            draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=obj.color)
        else:
            raise ValueError(
                f"shape should be one of circle, ellipse, square, rectangle, triangle but found {obj.shape!r}"
            )
    if spec.mode == "P":
        image = image.quantize(colors=len(spec.objects) + 1, method=Image.Quantize.MEDIANCUT)
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        path.write_bytes(encode_png(image))
    else:
        image.save(path, format="JPEG", quality=85, subsampling=2)


def box_text(box: Box) -> str:
    """Qwen2.5-VL box text in absolute pixels.

    Example:
        >>> box_text((120, 80, 200, 160))
        '(120,80),(200,160)'
    """
    x1, y1, x2, y2 = box
    return f"({x1},{y1}),({x2},{y2})"


def grounding_text(*objects: DemoObject) -> str:
    """Qwen2.5-VL grounding answer: one reference + box per object, joined by ", ".

    Example:
        >>> grounding_text(IMAGES["red_circle"].objects[0])
        '<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(120,80),(200,160)<|box_end|>'
    """
    return ", ".join(
        f"<|object_ref_start|>{obj.name}<|object_ref_end|><|box_start|>{box_text(obj.box)}<|box_end|>"
        for obj in objects
    )


def _conversation(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Alternate human / gpt turns, optionally after a system turn."""
    conversation = [{"from": "system", "value": system}] if system is not None else []
    conversation += [{"from": "human" if i % 2 == 0 else "gpt", "value": turn} for i, turn in enumerate(turns)]
    return conversation


def _file(name: str) -> str:
    return IMAGES[name].file


def single_image_samples() -> list[dict[str, Any]]:
    """One image per sample; multi-turn samples carry `<image>` in the first human turn only."""
    data_uri = "data:image/png;base64," + base64.b64encode(encode_png(draw_image(INLINE_RED_CIRCLE))).decode()
    bare_base64 = base64.b64encode(encode_png(draw_image(INLINE_BLUE_SQUARE))).decode()
    return [
        {"image": _file("red_circle"), "conversations": _conversation(
            "<image>\nWhat shape is shown?", "A red circle.")},
        {"image": _file("blue_square"), "conversations": _conversation(
            "What color is the square?\n<image>", "Blue.")},
        {"image": _file("green_triangle"), "conversations": _conversation(
            "<image>\nWhat shape is shown?", "A green triangle.",
            "What color is the background?", "White.")},
        {"image": _file("orange_circle_rgba"), "conversations": _conversation(
            "<image>\nDescribe the image.", "An orange circle on a transparent background.")},
        {"image": _file("purple_triangle_rgba"), "conversations": _conversation(
            "<image>\nWhat shape is shown?", "A purple triangle.")},
        {"image": _file("yellow_ellipse_wide"), "conversations": _conversation(
            "<image>\nWhat is in the picture?", "A yellow ellipse on a dark blue background.")},
        {"image": _file("green_bar_tall"), "conversations": _conversation(
            "<image>\nIs the bar horizontal or vertical?", "Vertical. It is a green bar.")},
        {"image": _file("gray_square_l"), "conversations": _conversation(
            "<image>\nWhat shape is shown?", "A gray square on a black background.")},
        {"image": _file("three_shapes_p"), "conversations": _conversation(
            "<image>\nHow many shapes are there?", "Three.",
            "Which one is on the left?", "The red circle.",
            "And which one is on the right?", "The blue triangle.")},
        {"image": _file("five_dots"), "conversations": _conversation(
            "<image>\nHow many dots are there?", "Five.")},
        {"image": data_uri, "conversations": _conversation(
            "<image>\nWhat shape is shown?", "A red circle.")},
        {"image": bare_base64, "conversations": _conversation(
            "<image>\nWhat color is the square?", "Blue.")},
    ]  # fmt: skip


def multi_image_samples() -> list[dict[str, Any]]:
    """Several images per sample, under "image" (list) or "images"; `<image>` tags consume them in order."""
    return [
        {"image": [_file("red_circle"), _file("blue_square")], "conversations": _conversation(
            "<image>\n<image>\nWhich image shows a circle, the first or the second?", "The first.")},
        {"image": [_file("blue_square"), _file("red_circle")], "conversations": _conversation(
            "Image 1: <image>\nImage 2: <image>\nWhat colors are the two shapes, in order?", "Blue, then red.")},
        {"images": [_file("green_triangle"), _file("purple_triangle_rgba"), _file("orange_circle_rgba")],
         "conversations": _conversation(
            "<image><image><image>\nHow many of these images show a triangle?", "Two: the first and the second.")},
        {"images": [_file("green_bar_tall"), _file("yellow_ellipse_wide")], "conversations": _conversation(
            "Which of these images is taller than it is wide?\n<image>\n<image>", "The first one.")},
        {"image": [_file("red_circle"), _file("gray_square_l")], "conversations": _conversation(
            "<image>\nWhat shape is this?", "A red circle.",
            "<image>\nAnd this one?", "A gray square.")},
        {"images": [_file("five_dots"), _file("three_shapes_p")], "conversations": _conversation(
            "<image>\n<image>\nHow many objects are there in the two images together?",
            "Eight: five dots and three shapes.")},
    ]  # fmt: skip


def grounding_samples() -> list[dict[str, Any]]:
    """Answers with boxes `(x1,y1),(x2,y2)` in absolute pixels of the original image (Qwen2.5-VL style)."""
    red_circle, = IMAGES["red_circle"].objects
    two_circle, two_square = IMAGES["two_shapes"].objects
    _, green_square, _ = IMAGES["three_shapes_p"].objects
    green_triangle, = IMAGES["green_triangle"].objects
    yellow_ellipse, = IMAGES["yellow_ellipse_wide"].objects
    purple_triangle, = IMAGES["purple_triangle_rgba"].objects
    return [
        {"image": _file("red_circle"), "conversations": _conversation(
            "<image>\nLocate the red circle in the image.", grounding_text(red_circle))},
        {"image": _file("two_shapes"), "conversations": _conversation(
            "<image>\nWhere is the blue square?", grounding_text(two_square))},
        {"image": _file("two_shapes"), "conversations": _conversation(
            "<image>\nFind every shape in the image.", grounding_text(two_circle, two_square))},
        {"image": _file("three_shapes_p"), "conversations": _conversation(
            "<image>\nOutline the green square.", grounding_text(green_square))},
        {"image": _file("green_triangle"), "conversations": _conversation(
            "<image>\nGive the bounding box of the triangle.", grounding_text(green_triangle))},
        {"image": _file("yellow_ellipse_wide"), "conversations": _conversation(
            "<image>\nWhat is shown?", "A yellow ellipse.",
            "Where is it?", grounding_text(yellow_ellipse))},
        {"image": _file("purple_triangle_rgba"), "conversations": _conversation(
            "<image>\nLocate the purple triangle.", grounding_text(purple_triangle))},
    ]  # fmt: skip


def text_only_samples() -> list[dict[str, Any]]:
    """Conversations without media; one starts with a system turn."""
    return [
        {"conversations": _conversation("What color do you get by mixing blue and yellow?", "Green.")},
        {"conversations": _conversation("How many sides does a triangle have?", "Three.")},
        {"conversations": _conversation(
            "Name a shape with no corners.", "A circle.", system="You are a terse assistant.")},
        {"conversations": _conversation("Is a square a rectangle?", "Yes. A square is a rectangle with equal sides.")},
        {"conversations": _conversation(
            "What is 7 times 6?", "42.",
            "And divided by 2?", "21.")},
        {"conversations": _conversation("Translate 'red' into French.", "Rouge.")},
        {"conversations": _conversation(
            "Describe a circle in one sentence.", "A circle is the set of points at a fixed distance from a centre.")},
        {"conversations": _conversation("Which is larger, 0.5 or 0.45?", "0.5 is larger.")},
    ]  # fmt: skip


def _write_json(path: Path, samples: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, samples: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")


def write_demo(output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> dict[str, int]:
    """Draw the demo images and write the annotation files into output_dir.

    Args:
        output_dir (str | Path): destination folder (created if missing); existing files are overwritten.

    Returns:
        dict[str, int]: number of samples per annotation file name.

    Example:
        >>> write_demo("/tmp/demo")
        {'single_image.json': 12, 'multi_image.json': 6, 'grounding.json': 7, 'text_only.jsonl': 8}
    """
    output_dir = Path(output_dir)
    for spec in IMAGES.values():
        save_image(draw_image(spec), output_dir / spec.file)
    annotations = {
        "single_image.json": single_image_samples(),
        "multi_image.json": multi_image_samples(),
        "grounding.json": grounding_samples(),
        "text_only.jsonl": text_only_samples(),
    }
    for name, samples in annotations.items():
        (_write_jsonl if name.endswith(".jsonl") else _write_json)(output_dir / name, samples)
    return {name: len(samples) for name, samples in annotations.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="folder to write (default: ./demo)")
    args = parser.parse_args(argv)
    counts = write_demo(args.output_dir)
    for name, count in counts.items():
        print(f"{Path(args.output_dir) / name}: {count} samples")


if __name__ == "__main__":
    main()
