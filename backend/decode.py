"""Image bytes → an upright RGB `PIL.Image`, within pixel limits, or a DecodeError saying why.

Handles what real annotation projects contain: EXIF-rotated phone photos, CMYK JPEGs from
print pipelines, palette and alpha PNGs (composited on white), 16-bit and float scans, WebP,
animated GIF/WebP (first frame). Large JPEGs are decoded at reduced size in the DCT domain
(`Image.draft`) because the model only needs `input_size` pixels per side.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DecodeError

ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

# Pillow warns about images between MAX_IMAGE_PIXELS and twice that; _check_pixels refuses
# them with a clearer message, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None,
                 content_type: str | None = None) -> Image.Image:
    """Decode `data`; raise DecodeError for anything that is not a usable image."""
    if not data:
        raise DecodeError("the image is empty (0 bytes)")
    # Pillow refuses images over twice this before reading any pixel; keep it at our limit.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"exceeds MAX_IMAGE_PIXELS={max_pixels}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise DecodeError(_not_an_image(data, content_type)) from None
    _check_pixels(image, max_pixels)
    if draft_size and image.format == "JPEG":
        image.draft(None, (draft_size, draft_size))  # DCT-domain downscale
    try:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image) or image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"corrupt or truncated {image.format or 'image'} data ({exc})") from None


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"{width}x{height} = {width * height} pixels exceeds MAX_IMAGE_PIXELS={max_pixels} "
            "(a decompression bomb, or raise the limit for huge scans)"
        )
    if width == 0 or height == 0:
        raise DecodeError(f"the image has no pixels ({width}x{height})")


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
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0  # full 16-bit range → 8-bit
    else:
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8), mode="L")


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _not_an_image(data: bytes, content_type: str | None) -> str:
    known = next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)
    if known is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        known = "WEBP"
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
    return f"not an image: got {kind}{served} ({len(data)} bytes)"
