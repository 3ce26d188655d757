"""Image bytes → an upright RGB `PIL.Image`, within pixel and memory limits, or a DecodeError
saying why.

Handles what real annotation projects contain: EXIF-rotated phone photos, CMYK JPEGs from
print pipelines, palette and alpha PNGs (composited on white), 16-bit and float scans, WebP,
animated GIF/WebP (first frame). Only the formats the caller allows are opened (IMAGE_FORMATS).

Memory: a small file can decode to gigabytes (a 194 KB 16-bit PNG took 3.4 GB), so the bytes
Pillow will hold are checked against a budget before any pixel is decoded (MAX_DECODE_BYTES),
and an image is reduced to what the model needs *before* it is converted: large JPEGs in the
DCT domain (`Image.draft`), anything else with `Image.reduce` right after loading. Conversions
(rotation, alpha, bit depth) then work on the small copy only.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile as _JPEG  # MPO (phone photos) included

from ..errors import DecodeError

ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_NO_REDUCE_MODES = {"1", "P", "I;16", "I;16B", "I;16L", "I;16N"}
"""Modes `Image.reduce` refuses: these are shrunk by nearest-neighbour resizing instead."""
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
"""EXIF orientation tag → the transpose that shows the image upright (as ImageOps does)."""
REDUCE_MARGIN = 2
"""Images are reduced while their shorter side stays at least this many times `draft_size`,
so the model's own (bicubic) resize still has pixels to work with."""

# Pillow warns about images between MAX_IMAGE_PIXELS and twice that; check_pixels refuses
# them with a clearer message, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None,
                 content_type: str | None = None, max_bytes: int | None = None,
                 formats: Sequence[str] | None = None) -> Image.Image:
    """Decode `data`; raise DecodeError for anything that is not a usable image.

    Args:
        max_pixels: width x height allowed (MAX_IMAGE_PIXELS).
        draft_size: the model's input side in pixels; larger images are reduced towards it.
        max_bytes: bytes the decoded image may take as Pillow holds it (MAX_DECODE_BYTES).
        formats: Pillow format names that may be opened (IMAGE_FORMATS); None = all.
    """
    if not data:
        raise DecodeError("the image is empty (0 bytes)")
    image = open_image(data, max_pixels, content_type, formats)
    check_pixels(image, max_pixels)
    if draft_size and isinstance(image, _JPEG):
        image.draft(None, (draft_size, draft_size))  # DCT-domain downscale, mode and size too
    if max_bytes is not None:
        check_bytes(image, max_bytes)
    try:
        image.load()
        orientation = image.getexif().get(0x0112)
        small = _shrink(image, draft_size) if draft_size else image
        return to_rgb(_upright(small, orientation))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"corrupt or truncated {image.format or 'image'} data ({exc})") from None


def open_image(data: bytes, max_pixels: int, content_type: str | None,
               formats: Sequence[str] | None) -> Image.Image:
    """The image's header read (no pixels yet), in one of `formats`; DecodeError otherwise."""
    # Pillow refuses images over twice this before reading any pixel; keep it at our limit.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        return Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"exceeds MAX_IMAGE_PIXELS={max_pixels}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise DecodeError(_not_an_image(data, content_type, formats)) from None


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Refuse an image of more than `max_pixels` (MAX_IMAGE_PIXELS), from its header."""
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"{width}x{height} = {width * height} pixels exceeds MAX_IMAGE_PIXELS={max_pixels} "
            "(a decompression bomb, or raise the limit for huge scans)"
        )
    if width == 0 or height == 0:
        raise DecodeError(f"the image has no pixels ({width}x{height})")


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel of `mode` as Pillow holds it: 8-bit multi-band modes take 4 (RGB too)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def check_bytes(image: Image.Image, max_bytes: int) -> None:
    """Refuse an image whose decoded pixels would take more than `max_bytes`."""
    width, height = image.size
    needed = width * height * pixel_bytes(image.mode)
    if needed > max_bytes:
        raise DecodeError(
            f"{width}x{height} {image.mode} {image.format or 'image'} decodes to {needed} bytes, "
            f"over MAX_DECODE_BYTES={max_bytes} (a decompression bomb, or raise "
            "MAX_DECODE_BYTES for huge scans)"
        )


def _shrink(image: Image.Image, draft_size: int) -> Image.Image:
    """The image reduced by the largest integer factor that keeps its shorter side at least
    REDUCE_MARGIN x `draft_size`; unchanged when it is already that small."""
    width, height = image.size
    factor = min(width, height) // (REDUCE_MARGIN * draft_size)
    if factor < 2:
        return image
    if image.mode in _NO_REDUCE_MODES:
        size = (max(1, width // factor), max(1, height // factor))
        return image.resize(size, Image.Resampling.NEAREST)
    return image.reduce(factor)


def _upright(image: Image.Image, orientation: object) -> Image.Image:
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, alpha composited on white, high bit depths rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _rescale_to_8bit(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit: the top 8 bits; 32-bit int and float: min..max stretched to 0..255. In float32,
    in place: one working copy of the (already reduced) image, never a float64 one."""
    if image.mode.startswith("I;16"):
        values16 = np.asarray(image).astype(np.uint16, copy=False)  # native byte order
        return Image.fromarray((values16 >> 8).astype(np.uint8), mode="L")
    values = np.array(image, dtype=np.float32)
    np.nan_to_num(values, copy=False)
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= 255.0 / (high - low) if high > low else 0.0
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"qoif", "QOI"),
          (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"),
          (b"icns", "ICNS"), (b"DDS ", "DDS"), (b"SIMPLE  =", "FITS"), (b"\x00\x00\x01\x00", "ICO"))


def _not_an_image(data: bytes, content_type: str | None,
                  formats: Sequence[str] | None = None) -> str:
    known = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    if known is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        known = "WEBP"
    if known and formats and known not in formats:
        return (f"a {known} image, a format not accepted here: IMAGE_FORMATS="
                f"{','.join(formats)} (add {known} to IMAGE_FORMATS to accept it)")
    if known:
        return f"corrupt or truncated {known} data: its header cannot be read ({len(data)} bytes)"
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        kind = "an HTML page (a login page or an error page?)"
    elif head.startswith(b"<svg") or b"<svg" in head:
        kind = "SVG vector graphics (not supported; rasterise it first)"
    elif head.startswith((b"<?xml", b"<")):
        kind = "XML/text"
    elif head.startswith(b"%pdf"):
        kind = "a PDF document"
    elif head.startswith((b"{", b"[")):
        kind = "JSON"
    else:
        kind = f"unrecognised data starting with {data[:8].hex()}"
    served = f" served as {content_type}" if content_type else ""
    accepted = f"; accepted formats: IMAGE_FORMATS={','.join(formats)}" if formats else ""
    return f"not an image: got {kind}{served} ({len(data)} bytes){accepted}"
