"""A model's PIL preprocessing (resize, centre crop, mode) as plain data, and the function that
applies it: what the decode processes run without importing torch or the model.

The encoder translates its torchvision pipeline into these steps (zeroshot/encoder.py,
`pixel_steps`); each step reproduces torchvision's PIL code path exactly (same output size
arithmetic, same Pillow call), so the pixels are the ones the encoder would have made.

    ("resize", (size,) or (height, width), pil_resample, max_size or None)
    ("center_crop", (height, width))
    ("convert", mode)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

Step = tuple[Any, ...]
Steps = tuple[Step, ...]


def apply_steps(image: Image.Image, steps: Sequence[Step]) -> Image.Image:
    """`image` through `steps`, in order."""
    for step in steps:
        kind = step[0]
        if kind == "resize":
            image = _resize(image, step[1], step[2], step[3])
        elif kind == "center_crop":
            image = _center_crop(image, step[1])
        elif kind == "convert":
            image = image.convert(step[1])
        else:
            raise ValueError(f"unknown preprocessing step {kind!r}")
    return image


def shortest_side_steps(side: int) -> Steps:
    """open_clip's usual preprocessing: the shorter side resized to `side` (bicubic), then the
    centre cropped to side x side."""
    return (("resize", (side,), Image.Resampling.BICUBIC, None), ("center_crop", (side, side)))


def _resize(image: Image.Image, size: Sequence[int], resample: int,
            max_size: int | None) -> Image.Image:
    """torchvision.transforms.functional.resize on a PIL image."""
    width, height = image.size
    new_height, new_width = _resized(height, width, size, max_size)
    if (new_height, new_width) == (height, width):
        return image
    return image.resize((new_width, new_height), resample)


def _resized(height: int, width: int, size: Sequence[int],
             max_size: int | None) -> tuple[int, int]:
    """torchvision's `_compute_resized_output_size`: (height, width)."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_height, new_width


def _center_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
    """torchvision.transforms.functional.center_crop on a PIL image (zero padding included)."""
    crop_height, crop_width = int(size[0]), int(size[1])
    width, height = image.size
    if crop_width > width or crop_height > height:
        left = (crop_width - width) // 2 if crop_width > width else 0
        top = (crop_height - height) // 2 if crop_height > height else 0
        padded = Image.new(image.mode, (max(width, crop_width), max(height, crop_height)), 0)
        padded.paste(image, (left, top))
        image = padded
        width, height = image.size
        if (crop_width, crop_height) == (width, height):
            return image
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))
