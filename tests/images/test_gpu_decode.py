"""Batched JPEG decode (nvJPEG on CUDA; torchvision's libjpeg with device="cpu") agrees with the
CPU path: pixels within a stated tolerance, the micro CLIP's top-1 unchanged, other images and
odd JPEGs decoded by the CPU path itself, the caps checked first."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.errors import DecodeError
from backend.images.decode import decode_image
from backend.images.gpu_decode import cpu_pixels, decode_batch

from ..support.microclip import COLOURS, LABELS, SHAPES, ZERO_SHOT_TEMPLATES, held_out_images

SIZE = 224
LIMIT = 100_000_000
BYTES = 256 * 1024 * 1024
DRAFTED_MAX_ABS = 48
DRAFTED_MEAN_ABS = 2.0
"""Where the CPU path shrinks a JPEG in the DCT domain first (Pillow's `draft`, here 640x480 →
320x240 before the resize to 224) and nvJPEG decodes it whole, pixels differ: measured on these
noisy photo-like JPEGs, max 45 and mean 1.4 levels of 255 (99 % of pixels within 10)."""
UNDRAFTED_MAX_ABS = 2
"""Without a draft (an image already near the model's size) both paths are the same
antialiased bicubic (a = -0.5) on the same libjpeg-turbo pixels: they differ by rounding only
(Pillow's fixed point, torch's uint8 kernel on CPU, float then rounded on CUDA)."""
NEAR_TIE = 0.2
"""The micro CLIP sees 32 px: a few held-out images are near-ties (top-1 probability within
0.2 of the runner-up, about 1 %). Those may swap when the pixels move by the tolerance above
(measured: 1-4 of 300 images swapped, every one with a margin of 0.14 or less); every other
image keeps its top-1."""

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Gradients and shapes under sensor-like noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.6, 1.0, width, dtype=np.float32)[None, :, None]
    image = Image.fromarray((rng.uniform(40, 200, 3) * ramp).astype(np.uint8).repeat(height, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(8, width // 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """640x480 landscape and portrait, a progressive one, and a 12 MP one (4000x3000)."""
    return [jpeg(photo(640, 480, seed), quality=90) for seed in range(4)] + [
        jpeg(photo(480, 640, 4), quality=90),
        jpeg(photo(640, 480, 5), quality=90, progressive=True),
        jpeg(photo(4000, 3000, 6), quality=90),
    ]


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().int() - b.cpu().int()).abs()


@pytest.mark.parametrize("device", DEVICES)
def test_photos_agree_with_the_cpu_path_within_the_stated_tolerance(photos, device):
    batch = decode_batch(photos, size=SIZE, max_pixels=LIMIT, max_bytes=BYTES, device=device)
    assert batch.pixels.shape == (len(photos), 3, SIZE, SIZE)
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.device.type == device
    assert not batch.errors and not batch.on_cpu
    for row, data in zip(batch.pixels, photos):
        diff = difference(row, cpu_pixels(data, size=SIZE, max_pixels=LIMIT, max_bytes=BYTES))
        assert int(diff.max()) <= DRAFTED_MAX_ABS
        assert float(diff.float().mean()) <= DRAFTED_MEAN_ABS


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_draft_the_resize_is_the_same_bicubic(device):
    images = [jpeg(photo(300, 240, seed), quality=95) for seed in range(3)]  # shorter side < 2S
    batch = decode_batch(images, size=SIZE, max_pixels=LIMIT, device=device)
    for row, data in zip(batch.pixels, images):
        assert int(difference(row, cpu_pixels(data, size=SIZE, max_pixels=LIMIT)).max()) <= (
            UNDRAFTED_MAX_ABS)


@pytest.mark.parametrize("device", DEVICES)
def test_exif_orientation_is_applied_as_on_the_cpu(device):
    quadrants = Image.new("RGB", (64, 48), (0, 0, 255))
    quadrants.paste((255, 0, 0), (0, 0, 32, 24))
    quadrants.paste((0, 255, 0), (32, 0, 64, 24))
    images = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        images.append(jpeg(quadrants, exif=exif, quality=95))
    batch = decode_batch(images, size=48, max_pixels=LIMIT, device=device)
    assert not batch.on_cpu
    for orientation, (row, data) in enumerate(zip(batch.pixels, images), start=1):
        expected = cpu_pixels(data, size=48, max_pixels=LIMIT)
        assert int(difference(row, expected).max()) <= 2, f"orientation {orientation}"


@pytest.mark.parametrize("device", DEVICES)
def test_other_images_and_odd_jpegs_take_the_cpu_path(photos, device):
    grey = jpeg(photo(640, 480, 7).convert("L"), quality=90)
    cmyk = jpeg(photo(640, 480, 8).convert("CMYK"), quality=90)
    png = io.BytesIO()
    photo(320, 240, 9).save(png, "PNG")
    images = [photos[0], grey, cmyk, png.getvalue(), b"<html>login</html>", photos[1]]
    batch = decode_batch(images, size=SIZE, max_pixels=LIMIT, max_bytes=BYTES,
                         content_types=[None, None, None, None, "text/html", None], device=device)
    assert batch.on_cpu == {1, 2, 3, 4}
    for i in (1, 2, 3):  # the CPU path's own pixels, exactly
        expected = cpu_pixels(images[i], size=SIZE, max_pixels=LIMIT, max_bytes=BYTES)
        assert torch.equal(batch.pixels[i].cpu(), expected)
    assert set(batch.errors) == {4}
    with pytest.raises(DecodeError) as cpu_error:
        decode_image(images[4], max_pixels=LIMIT, content_type="text/html")
    assert str(batch.errors[4]) == str(cpu_error.value)
    assert "HTML page" in str(batch.errors[4])
    assert not batch.pixels[4].any()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_caps_hold_before_any_gpu_decode(photos, device):
    big = photos[-1]  # 4000x3000
    over_pixels = decode_batch([big], size=SIZE, max_pixels=4000 * 3000 - 1, device=device)
    assert over_pixels.on_cpu == {0} and "MAX_IMAGE_PIXELS" in str(over_pixels.errors[0])
    # whole, it would take 48 MB; the CPU path's draft (1/8) brings it to 0.75 MB
    drafted = decode_batch([big], size=SIZE, max_pixels=LIMIT, max_bytes=10_000_000,
                           device=device)
    assert drafted.on_cpu == {0} and not drafted.errors
    refused = decode_batch([big], size=SIZE, max_pixels=LIMIT, max_bytes=100_000, device=device)
    assert "MAX_DECODE_BYTES" in str(refused.errors[0])
    not_allowed = decode_batch([photos[0]], size=SIZE, max_pixels=LIMIT, formats=["PNG"],
                               device=device)
    assert "IMAGE_FORMATS" in str(not_allowed.errors[0])


def test_an_empty_batch_is_empty():
    batch = decode_batch([], size=SIZE, max_pixels=LIMIT, device="cpu")
    assert batch.pixels.shape == (0, 3, SIZE, SIZE) and not batch.errors


def test_a_corrupt_jpeg_in_a_batch_fails_alone():
    good = jpeg(photo(320, 240, 10), quality=90)
    truncated = good[: len(good) // 3]
    batch = decode_batch([good, truncated, good], size=64, max_pixels=LIMIT, device="cpu")
    assert 1 in batch.on_cpu and set(batch.errors) <= {1}
    assert torch.equal(batch.pixels[0], batch.pixels[2]) and batch.pixels[0].any()


# --- the micro CLIP: top-1 unchanged -----------------------------------------------------------

@pytest.fixture(scope="module")
def micro(micro_clip):
    import open_clip

    from ..support.microclip import load_micro_clip

    model, preprocess, tokenizer = load_micro_clip(micro_clip)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames=LABELS, templates=list(ZERO_SHOT_TEMPLATES),
        num_classes_per_batch=len(LABELS), device="cpu", use_tqdm=False)
    return model, preprocess, classifier


def held_out_jpegs(render_size: int) -> list[bytes]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [jpeg(image, quality=90) for image, _, _ in held_out_images(pairs, 4, 3, render_size)]


@torch.no_grad()
def probabilities(model, classifier, pixels: torch.Tensor) -> torch.Tensor:
    features = model.encode_image(pixels, normalize=True)
    return (model.logit_scale.exp() * features @ classifier).softmax(dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("render_size", [64, 256])
def test_micro_clip_top1_is_unchanged_on_held_out_images(micro, device, render_size):
    model, preprocess, classifier = micro
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = held_out_jpegs(render_size)
    cpu = torch.stack([preprocess(decode_image(data, max_pixels=LIMIT, draft_size=size))
                       for data in images])  # the backend's CPU path
    batch = decode_batch(images, size=size, max_pixels=LIMIT, device=device)
    assert not batch.on_cpu and not batch.errors
    normalise = preprocess.transforms[-1]
    gpu = probabilities(model, classifier, normalise(batch.pixels.cpu().float() / 255))
    expected = probabilities(model, classifier, cpu)
    top2 = expected.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) >= NEAR_TIE
    assert decided.float().mean() >= 0.95  # the near-ties are the exception
    assert torch.equal(gpu.argmax(-1)[decided], expected.argmax(-1)[decided])
    truth = torch.arange(len(LABELS)).repeat_interleave(4)
    accuracy = [float((p.argmax(-1) == truth).float().mean()) for p in (gpu, expected)]
    print(f"\nmicro-CLIP top-1 accuracy, rendered at {render_size} px: {device} decode "
          f"{accuracy[0]:.0%}, CPU path {accuracy[1]:.0%}; top-1 swaps "
          f"{int((gpu.argmax(-1) != expected.argmax(-1)).sum())} of {len(images)}")
    assert abs(accuracy[0] - accuracy[1]) <= 0.03
