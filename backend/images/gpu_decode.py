"""JPEG bytes → model-sized uint8 pixels on the GPU, in batches, with nvJPEG.

The geometry is the CPU path's (open_clip's "shortest" preprocess): resize the shorter side to
`size` (bicubic, antialiased) and crop the centre to size x size, as uint8 (N, 3, S, S) on the
device; normalising to float is left to the caller (on the device too).

Only 3-component (YCbCr) baseline or progressive JPEGs go to nvJPEG. Everything else (PNG,
WebP, grayscale, CMYK/YCCK, MPO, anything Pillow must convert), and any JPEG nvJPEG refuses,
takes the CPU path per image (images.decode), so the results and the errors are the CPU path's.
The pixel cap (MAX_IMAGE_PIXELS) and the byte cap (MAX_DECODE_BYTES, here on the full-size
image: nvJPEG has no DCT-domain draft) are checked on the header before any GPU decode; a JPEG
over the byte cap at full size goes to the CPU path, whose draft may bring it under.

Differences from the CPU path: Pillow's `draft` reduces a large JPEG in the DCT domain before
the bicubic resize, nvJPEG decodes it whole; tests/images/test_gpu_decode.py states the pixel
tolerance and checks that the micro CLIP's top-1 does not change.

torch and torchvision are imported inside the functions: importing `backend.images` stays light.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DecodeError
from .decode import check_bytes, check_pixels, decode_image, open_image
from .steps import apply_steps, shortest_side_steps

if TYPE_CHECKING:
    import torch

NVJPEG_MODES = frozenset({"RGB"})
"""Pillow modes of JPEGs that nvJPEG decodes here: 3-component YCbCr (Pillow says RGB)."""


@dataclass(frozen=True)
class DecodedBatch:
    """What `decode_batch` made of N images."""

    pixels: torch.Tensor
    """(N, 3, size, size) uint8 on the device; the rows of failed images are zeros."""
    errors: dict[int, DecodeError]
    """Index → why that image could not be decoded (the CPU path's own error)."""
    on_cpu: frozenset[int]
    """Indices decoded by the CPU path (not a JPEG for nvJPEG, over a cap, or refused by it)."""


def decode_batch(images: Sequence[bytes], *, size: int, max_pixels: int,
                 max_bytes: int | None = None, formats: Sequence[str] | None = None,
                 content_types: Sequence[str | None] | None = None,
                 device: str | torch.device = "cuda") -> DecodedBatch:
    """Decode and fit `images` to size x size uint8 pixels on `device`, JPEGs in one nvJPEG
    batch (with device="cpu": torchvision's libjpeg decode, the same geometry; for tests).

    Args:
        size: the model's input side (the encoder's input_size).
        max_pixels, max_bytes, formats: MAX_IMAGE_PIXELS, MAX_DECODE_BYTES, IMAGE_FORMATS.
        content_types: per image, what the server said it was (for error messages).
    """
    import torch

    target = torch.device(device)
    types = list(content_types) if content_types is not None else [None] * len(images)
    plan = [_nvjpeg_orientation(data, max_pixels, max_bytes, formats) for data in images]
    chosen = [i for i, orientation in enumerate(plan) if orientation is not None]
    decoded = dict(zip(chosen, _decode_jpegs([images[i] for i in chosen], target)))
    rows: list[torch.Tensor] = []
    errors: dict[int, DecodeError] = {}
    on_cpu: set[int] = set()
    for i, data in enumerate(images):
        tensor = decoded.get(i)
        if tensor is not None:
            rows.append(fit(_upright(tensor, plan[i] or 1), size))
            continue
        on_cpu.add(i)
        try:
            rows.append(cpu_pixels(data, size=size, max_pixels=max_pixels, max_bytes=max_bytes,
                                   formats=formats, content_type=types[i]).to(target))
        except DecodeError as exc:
            errors[i] = exc
            rows.append(torch.zeros((3, size, size), dtype=torch.uint8, device=target))
    pixels = torch.stack(rows) if rows else torch.empty((0, 3, size, size), dtype=torch.uint8,
                                                          device=target)
    return DecodedBatch(pixels, errors, frozenset(on_cpu))


def _nvjpeg_orientation(data: bytes, max_pixels: int, max_bytes: int | None,
                        formats: Sequence[str] | None) -> int | None:
    """The EXIF orientation (1 = upright) of a JPEG nvJPEG should decode, from its header
    alone, within the caps; None for anything the CPU path must take (it says why it fails)."""
    if formats and "JPEG" not in formats:
        return None
    try:
        header = open_image(data, max_pixels, None, ["JPEG"])
        if header.format != "JPEG" or header.mode not in NVJPEG_MODES:
            return None
        check_pixels(header, max_pixels)
        if max_bytes is not None:
            check_bytes(header, max_bytes)  # whole: nvJPEG has no draft
        orientation = header.getexif().get(0x0112, 1)
    except Exception:  # a cap, or a header Pillow cannot read: the CPU path says why
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _decode_jpegs(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 per JPEG on `device`, None where it failed: one batch call, and one call
    per image when the batch fails (a batch returns nothing when one image is bad)."""
    if not jpegs:
        return []
    import torch

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    try:
        return list(_torchvision_decode(tensors, device))
    except RuntimeError:
        pass
    decoded: list[torch.Tensor | None] = []
    for tensor in tensors:
        try:
            decoded.append(_torchvision_decode([tensor], device)[0])
        except RuntimeError:
            decoded.append(None)
    return decoded


def _torchvision_decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; they work as documented
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return decoded if isinstance(decoded, list) else [decoded]


def _upright(tensor: torch.Tensor, orientation: int) -> torch.Tensor:
    """The (C, H, W) tensor as its EXIF orientation says to show it (Pillow's transposes)."""
    import torch

    if orientation in (5, 6, 7, 8):
        tensor = tensor.transpose(-1, -2)  # 5: TRANSPOSE; the others are it plus a flip
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return torch.flip(tensor, flips) if flips else tensor


def fit(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 → (3, size, size) uint8: the shorter side resized to `size` (bicubic,
    antialiased, as Pillow does) and the centre cropped, as open_clip's preprocess does."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(tensor, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped: torch.Tensor = F.center_crop(resized, [size, size])
    return cropped


def cpu_pixels(data: bytes, *, size: int, max_pixels: int, max_bytes: int | None = None,
               formats: Sequence[str] | None = None,
               content_type: str | None = None) -> torch.Tensor:
    """The CPU path: images.decode (draft, EXIF, any mode to RGB) then open_clip's resize and
    crop as the decode processes apply them (images.steps); (3, size, size) uint8 on the CPU.
    Raises DecodeError."""
    import torch

    image = decode_image(data, max_pixels=max_pixels, draft_size=size, content_type=content_type,
                         max_bytes=max_bytes, formats=formats)
    array = np.asarray(apply_steps(image, shortest_side_steps(size)), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
