"""qwenvl/data/vision.py against transformers' own Qwen2-VL image processor."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwenvl.data.vision import (
    IMAGE_MAGIC_LENGTH,
    ImageError,
    VisionConfig,
    image_format,
    image_grid_thw,
    image_size,
    open_image,
    process_image,
    smart_resize,
    to_rgb,
)

MIN, MAX = 16 * 28 * 28, 576 * 28 * 28


@pytest.fixture(scope="module")
def reference():
    return Qwen2VLImageProcessorPil(min_pixels=MIN, max_pixels=MAX)


@pytest.fixture(scope="module")
def cfg(reference):
    return VisionConfig.from_image_processor(reference, MIN, MAX)


@pytest.mark.parametrize("size", [(640, 480), (100, 50), (1000, 30), (56, 56), (1920, 1080), (29, 300), (27, 27)])
def test_process_image_matches_transformers(reference, cfg, size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = reference(images=[image], return_tensors="np")
    pixel_values, grid = process_image(image, cfg)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    assert pixel_values.shape == expected["pixel_values"].shape
    assert pixel_values.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width", [(480, 640), (10, 2000), (5000, 5000), (28, 28), (1, 200), (300, 7)])
def test_smart_resize_equals_reference_rule(height, width):
    assert smart_resize(height, width, 28, MIN, MAX) == hf_smart_resize(height, width, 28, MIN, MAX)


def test_aspect_ratio_over_200_is_rejected():
    with pytest.raises(ImageError, match="aspect ratio must be at most 200, got 201.0"):
        smart_resize(10, 2010, 28, MIN, MAX)


def test_grid_from_size_equals_processed_grid(cfg):
    for width, height in [(640, 480), (333, 777), (64, 64)]:
        _, grid = process_image(Image.new("RGB", (width, height)), cfg)
        assert image_grid_thw(height, width, cfg) == grid


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_inline_base64_and_data_uri_decode_to_the_same_pixels(tmp_path):
    image = Image.fromarray(np.arange(56 * 56 * 3, dtype=np.uint8).reshape(56, 56, 3))
    raw = _png_bytes(image)
    (tmp_path / "x.png").write_bytes(raw)
    encoded = base64.b64encode(raw).decode()
    from_file = np.asarray(open_image("x.png", str(tmp_path)))
    np.testing.assert_array_equal(np.asarray(open_image(f"data:image/png;base64,{encoded}")), from_file)
    np.testing.assert_array_equal(np.asarray(open_image(encoded)), from_file)
    np.testing.assert_array_equal(np.asarray(open_image(raw)), from_file)  # the file's bytes themselves
    assert image_size(raw) == image_size("x.png", str(tmp_path)) == (56, 56)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_magic_table_names_the_format_pil_writes(fmt):
    """One magic table for the package: it must name every format the way PIL, which wrote the bytes, does."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format=fmt)
    raw = buffer.getvalue()
    assert image_format(raw[:IMAGE_MAGIC_LENGTH]) == Image.open(io.BytesIO(raw)).format == fmt
    encoded = base64.b64encode(raw).decode()  # a bare base64 string of any of them is an inline image
    assert open_image(encoded).size == (8, 8)


def test_magic_table_leaves_videos_and_text_alone(tmp_path):
    import av

    with av.open(str(tmp_path / "clip.avi"), "w") as container:  # a RIFF file that is not WEBP
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")))
        container.mux(stream.encode())
    head = (tmp_path / "clip.avi").read_bytes()[:IMAGE_MAGIC_LENGTH]
    assert head.startswith(b"RIFF") and image_format(head) is None
    assert image_format(b"these are not pixels") is None and image_format(b"") is None


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=f"image file not found: {tmp_path}/nope.jpg"):
        open_image("nope.jpg", str(tmp_path))


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 255] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 0, 255)
    assert to_rgb(Image.new("L", (4, 4), 9)).getpixel((0, 0)) == (9, 9, 9)


def test_exif_rotation_is_applied_and_header_size_agrees(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    opened = open_image("rot.jpg", str(tmp_path))
    assert opened.size == (30, 60)
    assert image_size("rot.jpg", str(tmp_path)) == (60, 30)  # (height, width) as opened


# ------------------------------------------------------------ issue 9: the real cause
def test_symlink_loop_and_dangling_link_are_named_as_such(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    for read in (open_image, image_size):
        with pytest.raises(ImageError) as info:
            read("a.png", str(tmp_path))
        assert (info.value.kind, str(info.value)) == (
            "missing_media", f"image file {tmp_path}/a.png is a symlink loop (too many levels of symbolic links)")
        with pytest.raises(ImageError) as info:
            read("dangling.png", str(tmp_path))
        assert str(info.value) == f"image file {tmp_path}/dangling.png is a broken symbolic link (to '{tmp_path}/gone.png')"


def _chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(chunk type, offset of the chunk, offset of its CRC) of every PNG chunk, walked by hand."""
    out, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], pos, pos + 8 + length))
        pos += 12 + length
    return out


@pytest.mark.parametrize("chunk", [b"IHDR", b"tEXt"])
def test_png_checksum_error_is_reported_as_such(tmp_path, chunk):
    """PIL says "cannot identify image file" for a bad CRC before the pixels: the cause must not be lost."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "a chunk before the pixels")
    Image.new("RGB", (56, 56), (20, 180, 40)).save(tmp_path / "good.png", pnginfo=info)
    data = (tmp_path / "good.png").read_bytes()
    (start, crc_at), = [(pos, crc) for kind, pos, crc in _chunks(data) if kind == chunk]
    stored = int.from_bytes(data[crc_at:crc_at + 4], "big")
    (tmp_path / "bad.png").write_bytes(data[:crc_at + 3] + bytes([data[crc_at + 3] ^ 0x01]) + data[crc_at + 4:])
    cause = (f"PNG checksum (CRC) error in the {chunk.decode()} chunk at byte {start} (stored "
             f"0x{stored ^ 0x01:08x}, computed 0x{stored:08x}): the file is corrupt")
    with pytest.raises(ImageError) as caught:
        open_image("bad.png", str(tmp_path))
    assert (caught.value.kind, str(caught.value)) == ("bad_image", f"cannot decode {tmp_path}/bad.png: {cause}")
    with pytest.raises(ImageError) as caught:
        image_size("bad.png", str(tmp_path))
    assert str(caught.value) == f"cannot read the header of {tmp_path}/bad.png: {cause}"
