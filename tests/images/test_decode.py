"""What annotation projects really contain, decoded upright to RGB — or refused with a reason."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.errors import DecodeError
from backend.images.decode import decode_image

LIMIT = 50_000_000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def left_red_right_blue(width: int = 64, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(left_red_right_blue(), "JPEG", exif=exif, quality=95)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.size == (32, 64)
    top, bottom = image.getpixel((16, 2)), image.getpixel((16, 61))
    assert top[0] > 200 and top[2] < 60      # red ends up on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image = decode_image(encode(cmyk, "JPEG", quality=95), max_pixels=LIMIT)
    r, g, b = image.getpixel((8, 8))
    assert image.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_composited_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    data = encode(palette, "PNG", transparency=0)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.getpixel((1, 1)) == (255, 0, 0) and image.getpixel((6, 6)) == (255, 255, 255)


def test_rgba_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"), max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 64 * 8).reshape(8, 64)).astype(np.uint16)
    image = decode_image(encode(Image.fromarray(ramp), "PNG"), max_pixels=LIMIT)
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255  # not clipped to white


def test_float_tiff_is_rescaled():
    data = np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(8, 8)
    image = decode_image(encode(Image.fromarray(data, mode="F"), "TIFF"), max_pixels=LIMIT)
    assert np.asarray(image).min() == 0 and np.asarray(image).max() == 255


def test_webp_and_first_frame_of_animated_gif():
    assert decode_image(encode(left_red_right_blue(), "WEBP"), max_pixels=LIMIT).size == (64, 32)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image(gif.getvalue(), max_pixels=LIMIT)
    assert image.getpixel((4, 4))[0] > 200  # the first (red) frame


def test_large_jpeg_is_decoded_at_reduced_size_with_draft():
    data = encode(left_red_right_blue(2048, 1024), "JPEG", quality=90)
    full = decode_image(data, max_pixels=LIMIT)
    reduced = decode_image(data, max_pixels=LIMIT, draft_size=224)
    assert full.size == (2048, 1024)
    assert min(reduced.size) >= 224 and reduced.size[0] < 2048


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (b"", None, "empty (0 bytes)"),
        (b"<!DOCTYPE html><html><body>Login</body></html>", "text/html", "an HTML page"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml", "SVG"),
        (b"%PDF-1.7\n...", "application/pdf", "a PDF document"),
        (b'{"error": "nope"}', "application/json", "JSON"),
        (b"\x00\x01\x02\x03garbage", None, "unrecognised data starting with 00010203"),
    ],
)
def test_non_images_are_named(data, content_type, message):
    with pytest.raises(DecodeError, match="not an image|empty") as caught:
        decode_image(data, max_pixels=LIMIT, content_type=content_type)
    assert message in str(caught.value)


def test_truncated_jpeg_is_refused():
    data = encode(left_red_right_blue(256, 256), "JPEG")
    with pytest.raises(DecodeError, match="corrupt or truncated JPEG"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 MP, a few KB on the wire
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="exceeds MAX_IMAGE_PIXELS"):
        decode_image(bomb, max_pixels=LIMIT)


# --- small files that decode to a lot of memory (issue 13, item 4) --------------------------
def zero_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of zeros written row by row: a few hundred KB on disk whatever its size decoded,
    and built without ever holding the decoded image."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def float_tiff(width: int, height: int) -> bytes:
    values = np.zeros((height, width), dtype=np.float32)
    values[:, : width // 2] = 1.0
    return encode(Image.fromarray(values, mode="F"), "TIFF", compression="tiff_adobe_deflate")


PEAK_SCRIPT = """
import resource, sys
from backend.images.decode import decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image(data, max_pixels=10**9, draft_size=224, max_bytes=10**9)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.mode, image.size[0], image.size[1], (after - before) * 1024)
"""


def decode_peak(data: bytes, tmp_path) -> tuple[str, int]:
    """Decode in a fresh process; the mode and the peak memory the decode added, in bytes."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[3])


@pytest.mark.parametrize(("name", "make", "held"), [
    ("16-bit gray PNG", lambda: zero_png(4000, 4000, 16, 0), 4000 * 4000 * 2),
    ("RGBA PNG", lambda: zero_png(4000, 4000, 8, 6), 4000 * 4000 * 4),
    ("float TIFF", lambda: float_tiff(4000, 4000), 4000 * 4000 * 4),
])
def test_small_files_that_decode_large_stay_within_the_decoded_size(name, make, held, tmp_path):
    data = make()
    assert len(data) < held // 50, f"{name}: the test file should be small on disk"
    mode, peak = decode_peak(data, tmp_path)
    assert mode == "RGB"
    # what Pillow holds, plus working copies of the reduced image: no full-resolution
    # float64 arrays or RGBA copies (before: 5 to 13 times the decoded size)
    assert peak < 1.5 * held + 16 * 2**20, f"{name}: decoding took {peak / 2**20:.0f} MiB"


def test_decoded_size_over_the_byte_budget_is_refused_before_decoding():
    data = zero_png(4000, 4000, 16, 0)
    with pytest.raises(DecodeError, match="MAX_DECODE_BYTES=1000000") as caught:
        decode_image(data, max_pixels=LIMIT, max_bytes=1_000_000)
    assert "4000x4000 I;16 PNG decodes to 32000000 bytes" in str(caught.value)


def test_a_jpeg_counts_at_the_size_it_is_drafted_to():
    data = encode(left_red_right_blue(2048, 1024), "JPEG", quality=90)
    budget = 2048 * 1024 * 4 // 8  # the full-size decode would be 8 times this
    assert min(decode_image(data, max_pixels=LIMIT, draft_size=224, max_bytes=budget).size) >= 224
    with pytest.raises(DecodeError, match="MAX_DECODE_BYTES"):
        decode_image(data, max_pixels=LIMIT, max_bytes=budget)


def test_formats_outside_the_allowed_list_are_refused_by_name():
    psd_like = encode(left_red_right_blue(), "PNG")
    with pytest.raises(DecodeError, match=r"a PNG image, a format not accepted here: "
                                          r"IMAGE_FORMATS=JPEG,WEBP \(add PNG"):
        decode_image(psd_like, max_pixels=LIMIT, formats=("JPEG", "WEBP"))
    tga = encode(left_red_right_blue(), "TGA")  # opens without the list: 43 formats do
    assert decode_image(tga, max_pixels=LIMIT).size == (64, 32)
    with pytest.raises(DecodeError, match="accepted formats: IMAGE_FORMATS=JPEG,PNG"):
        decode_image(tga, max_pixels=LIMIT, formats=("JPEG", "PNG"))


def test_exif_orientation_is_applied_after_reducing():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(left_red_right_blue(1600, 800), "PNG", exif=exif)
    image = decode_image(data, max_pixels=LIMIT, draft_size=100)
    assert image.size == (200, 400)  # reduced by 4, then turned upright
    assert image.getpixel((100, 3))[0] > 200 and image.getpixel((100, 396))[2] > 200


def test_palette_and_sixteen_bit_images_are_reduced_without_mixing_values():
    palette = Image.new("P", (1000, 1000), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image = decode_image(encode(palette, "PNG"), max_pixels=LIMIT, draft_size=100)
    assert image.size == (200, 200) and image.getpixel((10, 10)) == (255, 0, 0)
