"""Images -> pixel values and grids, the Qwen2-VL way, without torchvision.

One patchifier serves images and videos: an image is a clip of one frame that
is repeated up to ``temporal_patch_size`` frames, exactly like the model's own
image processor does. ``tests/data/test_vision.py`` checks the output against
transformers' ``Qwen2VLImageProcessorPil``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")
_DATA_URI_RE = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """What the image/video processor needs, read once from the checkpoint.

    Attributes mirror the names of ``preprocessor_config.json``.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 576 * 28 * 28
    # Applied before smart_resize (--image_resize_mode, --image_max_size; see ``pre_resize``).
    resize_mode: str = "keep_aspect"
    max_size: int | None = None

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this (28 for Qwen2/2.5-VL)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_image_processor(cls, processor: Any, min_pixels: int, max_pixels: int, resize_mode: str = "keep_aspect",
                             max_size: int | None = None) -> "VisionConfig":
        """Read patch/merge sizes and normalisation from a loaded image processor (``resize_mode`` and
        ``max_size``: ``--image_resize_mode`` / ``--image_max_size``, see ``pre_resize``)."""
        return cls(
            patch_size=int(processor.patch_size),
            merge_size=int(processor.merge_size),
            temporal_patch_size=int(processor.temporal_patch_size),
            image_mean=tuple(float(x) for x in processor.image_mean),
            image_std=tuple(float(x) for x in processor.image_std),
            rescale_factor=float(getattr(processor, "rescale_factor", 1 / 255)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            resize_mode=resize_mode,
            max_size=None if max_size is None else int(max_size),
        )


# Larger images are refused before their pixels are decoded (a decompression bomb: a few KB of
# PNG/JPEG that would decode to gigabytes). PIL's own warning threshold, ~0.27 GB as RGB.
MAX_IMAGE_PIXELS = 89_478_485

# errno values a network file system (NFS, Lustre, FUSE mounts) returns for failures that may
# go away on retry; FileNotFoundError and friends are never transient.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EBUSY", "EINTR", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED",
        "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ENOLINK", "ECOMM", "EREMOTEIO",
    ) if hasattr(errno, name)
)


def is_transient_io_error(exc: BaseException) -> bool:
    """True for I/O errors worth retrying (EIO, ESTALE, timeouts ...), False for missing files and the like.

    Example:
        >>> is_transient_io_error(OSError(errno.ESTALE, "Stale file handle"))
        True
        >>> is_transient_io_error(FileNotFoundError(errno.ENOENT, "No such file"))
        False
    """
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


class ImageError(ValueError):
    """An image that cannot be used; the message says why and ``kind`` labels it.

    Kinds: ``missing_media`` (no such file), ``bad_media_ref`` (not a non-empty string),
    ``bad_image`` (does not decode), ``decompression_bomb`` (over ``MAX_IMAGE_PIXELS``),
    ``bad_aspect_ratio`` (over 200), ``too_small`` (no patch left after resizing).
    """

    def __init__(self, message: str, kind: str = "bad_image"):
        super().__init__(message)
        self.kind = kind


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count in [min_pixels, max_pixels].

    Args:
        height: source height in pixels.
        width: source width in pixels.
        factor: patch_size * merge_size (28).
        min_pixels: lower bound on height * width after resizing.
        max_pixels: upper bound on height * width after resizing.

    Returns:
        (resized_height, resized_width).

    Raises:
        ImageError: if a side is 0 or the aspect ratio exceeds 200.

    Example:
        >>> smart_resize(480, 640, 28, 16 * 28 * 28, 576 * 28 * 28)
        (476, 644)
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side: {width}x{height}", "too_small")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(
            f"aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f} ({width}x{height})",
            "bad_aspect_ratio",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise ImageError(f"{width}x{height} image resizes to {w_bar}x{h_bar}: no {factor}x{factor} patch is left",
                         "too_small")
    return h_bar, w_bar


RESIZE_MODES = ("keep_aspect", "crop", "stretch")


def pre_resize(height: int, width: int, mode: str = "keep_aspect", max_size: int | None = None
               ) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """Size (and centre crop box) of an image before the family's ``smart_resize``.

    - ``keep_aspect``: scaled so the longer side is at most ``max_size`` (never enlarged);
    - ``crop``: the centre square of side ``min(height, width)``, then scaled to at most ``max_size``;
    - ``stretch``: exactly ``max_size`` x ``max_size`` (the aspect ratio is not kept).

    Args:
        height, width: the image's size.
        mode: one of ``RESIZE_MODES``.
        max_size: side limit in pixels; None = none (``stretch`` needs one).

    Returns:
        (height, width, box): the size to resize to, and the crop box (left, top, right, bottom) of
        the source taken first, or None.

    Raises:
        ValueError: an unknown mode, or ``stretch`` without ``max_size``.

    Example:
        >>> pre_resize(480, 640, "keep_aspect", 320), pre_resize(480, 640, "crop", 224)[:2]
        ((240, 320, None), (224, 224))
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode should be one of {', '.join(RESIZE_MODES)} but found {mode!r}")
    box = None
    if mode == "stretch":
        if max_size is None:
            raise ValueError("resize_mode stretch needs max_size (the square side to stretch to)")
        return max_size, max_size, None
    if mode == "crop":
        side = min(height, width)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        height = width = side
    if max_size is not None and max(height, width) > max_size:
        scale = max_size / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return height, width, box


def image_grid_thw(height: int, width: int, cfg: VisionConfig) -> tuple[int, int, int]:
    """Patch grid (t, h, w) the processor produces for an image of this size (``pre_resize`` first).

    Example:
        >>> image_grid_thw(480, 640, VisionConfig())
        (1, 34, 46)
    """
    height, width, _ = pre_resize(height, width, cfg.resize_mode, cfg.max_size)
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def num_vision_tokens(grid_thw: tuple[int, int, int] | list[int], merge_size: int) -> int:
    """LLM tokens for one image/video: t * h * w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge_size * merge_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white.

    Handles P (with or without transparency), RGBA, LA, L, 1, I;16 / I (16/32-bit
    greyscale, scaled to 8 bits), F, CMYK and YCbCr.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 65535.0 * 255.0
        else:
            top = array.max() if array.size else 1.0
            array = array / (top if top > 255 else 255.0) * 255.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


# Magic bytes of the still-image formats the data meets, with PIL's name of each format: the one table
# that recognises inline base64 images, diagnoses files PIL cannot identify, refuses images listed as
# videos (``video.probe_video``) and names the MIME type of inline images (``sources.data_uri``).
# WEBP is a RIFF container whose bytes 8-12 say "WEBP" (see ``image_format``).
IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Bytes ``image_format`` needs to tell every format of IMAGE_MAGIC (WEBP's tag ends at byte 12).
IMAGE_MAGIC_LENGTH = 12


def image_format(head: bytes) -> str | None:
    """The image format whose magic bytes ``head`` starts with (PIL's format name), or None.

    Args:
        head: the first bytes of a file or of decoded base64 (``IMAGE_MAGIC_LENGTH`` are enough).

    Returns:
        ``"PNG"``, ``"JPEG"``, ``"GIF"``, ``"BMP"``, ``"TIFF"`` or ``"WEBP"``; None for anything else
        (a RIFF that is not WEBP, e.g. an AVI video, is None).

    Example:
        >>> image_format(b"\\x89PNG\\r\\n\\x1a\\n"), image_format(b"RIFF\\x10\\x00\\x00\\x00WEBPVP8 ")
        ('PNG', 'WEBP')
        >>> image_format(b"RIFF\\x10\\x00\\x00\\x00AVI LIST") is None
        True
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in IMAGE_MAGIC if head.startswith(magic)), None)


def _decode_base64(text: str) -> bytes | None:
    """Bytes of an inline image (data URI or bare base64), or None for a path.

    A bare string is taken for base64 only if it has no '.' (paths have an
    extension, base64 never has a dot), uses the base64 alphabet, and decodes
    to bytes that start like an image file.
    """
    match = _DATA_URI_RE.match(text)
    if match:
        try:
            return base64.b64decode(text[match.end():], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"inline base64 image does not decode: {exc}") from exc
    if len(text) < 32 or "." in text or not _BASE64_RE.match(text):
        return None
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None
    return raw if image_format(raw) is not None else None


def resolve_path(path: str, data_path: str) -> str:
    """Join a media path to the dataset's ``data_path`` unless it is absolute."""
    if os.path.isabs(path) or not data_path:
        return path
    return os.path.join(data_path, path)


def _check_pixel_count(width: int, height: int, where: str) -> None:
    """Refuse an image whose header promises more than ``MAX_IMAGE_PIXELS`` (before decoding it)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{where} is {width}x{height} = {width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,}-pixel "
            f"limit (a decompression bomb?); shrink it offline or raise qwenvl.data.vision.MAX_IMAGE_PIXELS",
            "decompression_bomb",
        )


def media_file_problem(path: str, what: str = "image") -> str | None:
    """Why ``path`` cannot be opened as a media file, or None when it can be stat'ed.

    Tells a missing file from a dangling symbolic link and from a symlink loop
    (``os.path.exists`` says False for all three).

    Args:
        path: the resolved file path.
        what: ``"image"`` or ``"video"``, for the message.

    Returns:
        None, or e.g. ``"image file not found: /data/a.jpg"``,
        ``"image file /data/a.jpg is a symlink loop (too many levels of symbolic links)"``,
        ``"image file /data/a.jpg is a broken symbolic link (to '/gone/a.jpg')"``.

    Raises:
        OSError: a transient I/O error (``is_transient_io_error``), for the caller to retry.

    Example:
        >>> media_file_problem("/nope.jpg")
        'image file not found: /nope.jpg'
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"{what} file {path} is a broken symbolic link (to {target!r})"
        return f"{what} file not found: {path}"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{what} file {path} is a symlink loop (too many levels of symbolic links)"
        if is_transient_io_error(exc):
            raise
        return f"{what} file {path} cannot be opened: {exc.strerror or exc}"
    return None


def png_checksum_error(data: bytes) -> str | None:
    """The first chunk of a PNG whose stored CRC differs from the computed one, described; else None.

    Example:
        >>> png_checksum_error(open("bad_crc.png", "rb").read())  # IHDR CRC byte flipped
        'PNG checksum (CRC) error in the IHDR chunk at byte 8 (stored 0x2b8e0e3c, computed 0xd48e0e3c)'
    """
    pos = 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            return None  # truncated: not a checksum problem
        stored = struct.unpack(">I", data[end:end + 4])[0]
        computed = zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF
        if stored != computed:
            name = kind.decode("latin-1")
            return (f"PNG checksum (CRC) error in the {name} chunk at byte {pos} (stored 0x{stored:08x}, "
                    f"computed 0x{computed:08x})")
        if kind == b"IEND":
            return None
        pos = end + 4
    return None


def _diagnose_unidentified(raw: bytes | None, where: str) -> str:
    """The real cause behind PIL's "cannot identify image file" for a file whose magic (``IMAGE_MAGIC``)
    names its format: that format's PIL plugin is asked why.
    """
    unknown = "not an image format PIL can identify"
    try:
        if raw is None:
            with open(where, "rb") as handle:
                data = handle.read(IMAGE_MAGIC_LENGTH)
                if image_format(data) is None:
                    return unknown
                data += handle.read()
        else:
            data = raw
    except OSError:
        return unknown
    fmt = image_format(data)
    if fmt is None:
        return unknown
    if fmt == "PNG":
        crc = png_checksum_error(data)
        if crc is not None:
            return f"{crc}: the file is corrupt"
    Image.init()
    factory = Image.OPEN.get(fmt, (None, None))[0]
    if factory is None:
        return f"a {fmt} file that PIL cannot read"
    try:
        factory(io.BytesIO(data), where).close()
    except Exception as exc:  # noqa: BLE001 - whatever the plugin says is the cause
        return f"broken {fmt} file: {exc}"
    return f"a {fmt} file that PIL cannot identify"


def _describe(exc: BaseException, raw: bytes | None = None, where: str = "") -> str:
    # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names no file and changes every run,
    # and hides the real cause (e.g. a PNG checksum error): look at the bytes.
    if isinstance(exc, UnidentifiedImageError):
        return _diagnose_unidentified(raw, where) if (raw is not None or where) else \
            "not an image format PIL can identify"
    return str(exc)


def _check_reference(source: Any) -> None:
    if isinstance(source, (bytes, bytearray)) and source:
        return
    if not isinstance(source, str) or not source:
        raise ImageError(f"image reference must be a non-empty string, got {source!r}", "bad_media_ref")


def _inline_bytes(source: str | bytes) -> bytes | None:
    """The image's bytes when ``source`` holds them (raw bytes, a data URI or bare base64), else None (a path)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    return _decode_base64(source)


def open_image(source: str | bytes, data_path: str = "") -> Image.Image:
    """Open an image from a path (relative to ``data_path``), its bytes, a data URI or bare base64.

    EXIF orientation is applied and the result is RGB (``to_rgb``). The size in
    the header is checked against ``MAX_IMAGE_PIXELS`` before any pixel is decoded.

    Args:
        source: a path, the file's bytes, a ``data:image/...;base64,`` URI or bare base64.
        data_path: folder that relative paths are joined to.

    Returns:
        the decoded RGB image.

    Raises:
        ImageError: the file is missing, is not an image, is a decompression
            bomb, or the base64 is broken (``kind`` says which).
        OSError: a transient I/O error (``is_transient_io_error``), left for the caller to retry.
    """
    _check_reference(source)
    raw = _inline_bytes(source)
    where = "inline image" if raw is not None else resolve_path(source, data_path)
    try:
        if raw is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
        else:
            missing = media_file_problem(where, "image")
            if missing is not None:
                raise ImageError(missing, "missing_media")
            with warnings.catch_warnings():  # _check_pixel_count says it more clearly
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(where)
        _check_pixel_count(image.width, image.height, where)
        image.load()
        image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where} is a decompression bomb: {exc}", "decompression_bomb") from exc
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        if is_transient_io_error(exc):
            raise
        raise ImageError(f"cannot decode {where}: {_describe(exc, raw, where)}") from exc
    return to_rgb(image)


def image_size(source: str | bytes, data_path: str = "") -> tuple[int, int]:
    """(height, width) of an image as the dataset will see it, from the header only.

    Pixels are not decoded. EXIF orientations 5-8 (rotations by 90 degrees)
    swap the sides, as ``open_image`` does.

    Raises:
        ImageError: as ``open_image`` (missing file, unreadable header, decompression bomb).
        OSError: a transient I/O error.
    """
    _check_reference(source)
    raw = _inline_bytes(source)
    where = "inline image" if raw is not None else resolve_path(source, data_path)
    if raw is None:
        missing = media_file_problem(where, "image")
        if missing is not None:
            raise ImageError(missing, "missing_media")
    try:
        with warnings.catch_warnings():  # _check_pixel_count below says it more clearly
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw) if raw is not None else where)
        with image:
            width, height = image.size
            _check_pixel_count(width, height, where)
            if image.format == "PNG" and "exif" not in image.info:
                # Pillow's PNG getexif() decodes every pixel to reach chunks stored after the image data.
                orientation = _png_orientation(image.fp)
            else:
                orientation = image.getexif().get(0x0112, 1)
            # Pillow reports a TIFF with orientation 5-8 already rotated (it rotates it on load).
            tags = getattr(image, "tag_v2", None)
            stored = (tags.get(256), tags.get(257)) if tags is not None else (width, height)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {where}", "missing_media") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where} is a decompression bomb: {exc}", "decompression_bomb") from exc
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error, IndexError) as exc:
        if is_transient_io_error(exc):
            raise
        raise ImageError(f"cannot read the header of {where}: {_describe(exc, raw, where)}") from exc
    if orientation in (5, 6, 7, 8) and (width, height) == stored:
        width, height = height, width
    return height, width


_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')


def _png_orientation(handle) -> int:
    """EXIF orientation of a PNG read chunk by chunk, seeking over the pixel data.

    Looks where Pillow's ``getexif`` looks (an eXIf chunk, a "Raw profile type exif"
    text chunk, then XMP), wherever in the file they are.
    """
    handle.seek(8)
    found: dict[bytes, bytes] = {}
    while True:
        head = handle.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        if kind not in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            handle.seek(length + 4, 1)  # data and CRC
            continue
        data = handle.read(length)
        handle.seek(4, 1)
        if kind == b"eXIf":
            found.setdefault(b"eXIf", data)
            continue
        key, _, text = data.partition(b"\0")
        if kind == b"zTXt":
            text = zlib.decompress(text[1:])
        elif kind == b"iTXt":  # compression flag, method, then language and translated keyword
            compressed, text = text[0], text[2:].split(b"\0", 2)[2]
            text = zlib.decompress(text) if compressed else text
        if key in (b"Raw profile type exif", b"XML:com.adobe.xmp"):
            found.setdefault(key, text)
    exif = Image.Exif()
    if b"eXIf" in found:
        raw = found[b"eXIf"]
        exif.load(raw if raw.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + raw)
    elif b"Raw profile type exif" in found:  # ImageMagick: a header of 3 lines, then hex
        exif.load(bytes.fromhex("".join(found[b"Raw profile type exif"].decode("latin-1").split("\n")[3:])))
    orientation = exif.get(0x0112)
    if orientation is None and b"XML:com.adobe.xmp" in found:
        match = _XMP_ORIENTATION.search(found[b"XML:com.adobe.xmp"])
        orientation = int(match[1]) if match else None
    return orientation or 1


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic-resize uint8 frames (T, H, W, 3) to (T, height, width, 3), like the processor."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
    return out


def patchify(frames: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalise and cut resized uint8 frames into the vision tower's patches.

    Args:
        frames: (T, H, W, 3) uint8, H and W multiples of ``cfg.factor``. T is
            padded up to a multiple of ``temporal_patch_size`` by repeating the
            last frame (one image -> the same frame twice).
        cfg: patch geometry and normalisation.

    Returns:
        pixel_values: (t * h * w, 3 * temporal_patch_size * patch_size**2) float32,
            rows ordered (t, h/merge, w/merge, merge, merge) as the model expects.
        grid_thw: (t, h, w) in patches.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    ps, ms, tps = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if height % cfg.factor or width % cfg.factor:
        raise ValueError(f"frame size {width}x{height} is not a multiple of {cfg.factor}")
    remainder = num_frames % tps
    if remainder:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tps - remainder, axis=0)], axis=0)
    grid_t, grid_h, grid_w = frames.shape[0] // tps, height // ps, width // ps
    # Gather on uint8 first (4x less memory traffic), normalise the final layout once.
    patches = frames.reshape(grid_t, tps, grid_h // ms, ms, ps, grid_w // ms, ms, ps, 3)
    # -> (t, h/m, w/m, m, m, channel, temporal, ps, ps)
    patches = patches.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    patches = np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, 3, tps * ps * ps)
    # In place, in float32 and in the reference's order (rescale, subtract mean, divide by std),
    # so the values are identical to the image processor's.
    pixel_values = patches.astype(np.float32)
    pixel_values *= np.float32(cfg.rescale_factor)
    pixel_values -= np.asarray(cfg.image_mean, dtype=np.float32)[None, :, None]
    pixel_values /= np.asarray(cfg.image_std, dtype=np.float32)[None, :, None]
    return pixel_values.reshape(patches.shape[0], 3 * tps * ps * ps), (grid_t, grid_h, grid_w)


def process_image(image: Image.Image, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image -> (pixel_values (h*w, 1176) float32, grid (1, h, w)): ``pre_resize`` (resize mode,
    max size), then ``smart_resize``.

    Example:
        >>> pv, grid = process_image(Image.new("RGB", (640, 480)), VisionConfig())
        >>> pv.shape, grid
        ((1564, 1176), (1, 34, 46))
    """
    before_h, before_w, box = pre_resize(image.height, image.width, cfg.resize_mode, cfg.max_size)
    if box is not None:
        image = image.crop(box)
    if (image.height, image.width) != (before_h, before_w):
        image = image.resize((before_w, before_h), Image.Resampling.BICUBIC)
    height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    frames = np.asarray(image, dtype=np.uint8)[None]
    return patchify(frames, cfg)
