"""Micro-CLIP testbed: a tiny open_clip model trained on synthetic "colour shape" images.

The model is trained from scratch on CPU at test-session start (about two minutes on two
idle cores), then cached on disk under a name that hashes this file, so tests can exercise
real open_clip loading, tokenisation, preprocessing and zero-shot classification offline.
Five (colour, shape) pairs are never shown in training, to test compositional zero-shot.
The "siglip" family fine-tunes the cached CLIP model with a sigmoid loss and logit bias.

Run ``python -m tests.support.microclip [--family clip|siglip] [--cache DIR]`` to train (or
load) the model and print its zero-shot accuracy on held-out images of seen and unseen pairs.
"""

from __future__ import annotations

import argparse
import colorsys
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import open_clip
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from PIL import Image, ImageDraw

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
LABELS: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# The diagonal: every colour and every shape still appears in training with four partners.
UNSEEN_PAIRS: frozenset[tuple[str, str]] = frozenset(zip(COLOURS, SHAPES, strict=True))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in UNSEEN_PAIRS
)
FAMILIES: tuple[str, ...] = ("clip", "siglip")
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
THREADS_ENV = "MICROCLIP_THREADS"  # torch threads while training; default: all usable cores

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.int64]

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 45, 185),
}
# Training-only "off-palette" images: shapes in random colours at least this far in hue from
# every named colour, captioned by shape alone. They make the image tower's shape features
# colour-invariant, which is what lets it recognise unseen pairs such as "red circle".
_OFF_PALETTE_MIN_HUE_GAP = 25.0
# A training item is (colour, shape); colour None marks an off-palette image.
_TRAIN_ITEMS: tuple[tuple[str | None, str], ...] = SEEN_PAIRS + tuple((None, s) for s in SHAPES)
# Seed streams: training pool and held-out images never share random numbers.
_TRAIN_STREAM = 0
_HELD_OUT_STREAM = 1
_SUPERSAMPLE = 4

# Full captions name both attributes; partial ones name only one, which pushes both towers
# towards a factorised (colour + shape) embedding and helps on unseen pairs.
_FULL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {s}.",
    "a {c} {s}",
    "{c} {s}",
    "a picture of a {c} {s}",
    "a drawing of a {c} {s}.",
    "a {s} that is {c}",
    "a {c} coloured {s}",
)
_COLOUR_TEMPLATES: tuple[str, ...] = ("a {c} shape", "something {c}", "a photo of something {c}.")
_SHAPE_TEMPLATES: tuple[str, ...] = ("a {s}", "a photo of a {s}.", "a {s} shape")


@dataclass(frozen=True)
class Recipe:
    """Architecture and training hyperparameters (all part of the cache key)."""

    image_size: int = 32
    # A tuple of stage depths selects open_clip's ModifiedResNet: a from-scratch ViT learns
    # the shapes far too slowly for a two-minute CPU budget, a small CNN learns them quickly.
    vision_layers: tuple[int, ...] = (1, 1, 1, 1)
    vision_width: int = 16
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 2
    context_length: int = 16
    embed_dim: int = 64
    render_size: int = 64
    pool_per_pair: int = 150
    off_palette_per_shape: int = 1500
    partial_caption_prob: float = 0.5
    steps: int = 600
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    train_token_embedding: bool = False
    logit_lr_mult: float = 1.0
    # Fine-tune the cached model of this family instead of training from scratch.
    warm_start: str | None = None
    seed: int = 0


DEFAULT_RECIPES: dict[str, Recipe] = {
    "clip": Recipe(),
    # SigLIP from scratch learns colour and shape much more slowly than CLIP here and loses
    # the unseen pairs, so it briefly fine-tunes the CLIP model with the sigmoid loss instead.
    "siglip": Recipe(warm_start="clip", steps=150, lr=1e-3, logit_lr_mult=20),
}


@dataclass(frozen=True)
class MicroClip:
    model_name: str
    config_path: Path
    checkpoint_path: Path
    family: str


# --------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":
        radii, count = [r], 48
    elif shape == "square":
        radii, count = [r], 4
    elif shape == "triangle":
        radii, count = [r * 1.15], 3
    elif shape == "star":
        radii, count = [r * 1.1, r * 0.45], 10
    elif shape == "cross":
        return _cross_polygon(cx, cy, r, angle)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / count),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / count))
        for i in range(count)
    ]


def _cross_polygon(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    w = r * 0.33
    outline = [(w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w), (r, w)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]


def _shape_alpha(shape: str, rng: np.random.Generator, size: int) -> FloatArray:
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    points = [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in _shape_polygon(shape, cx, cy, r, angle)]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _background(rng: np.random.Generator, size: int) -> FloatArray:
    base = rng.uniform(175, 240) if rng.random() < 0.5 else rng.uniform(15, 80)
    tint = rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = rng.uniform(-15, 15, size=2)
    gradient = gx * ramp[None, :, None] + gy * ramp[:, None, None]
    return np.full((size, size, 3), base, dtype=np.float32) + tint + gradient


def _hue(rgb: Sequence[float]) -> float:
    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360


def _off_palette_rgb(rng: np.random.Generator) -> FloatArray:
    named_hues = [_hue(rgb) for rgb in _RGB.values()]
    while True:
        hue, sat, val = rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.2, 1)
        gap = min(min(abs(hue - h), 360 - abs(hue - h)) for h in named_hues)
        if sat < 0.25 or gap >= _OFF_PALETTE_MIN_HUE_GAP:
            return np.asarray(colorsys.hsv_to_rgb(hue / 360, sat, val), dtype=np.float32) * 255


def _named_rgb(colour: str, rng: np.random.Generator) -> FloatArray:
    return np.asarray(_RGB[colour], dtype=np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 10, size=3)


def render(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of a `colour` `shape` on a noisy light or dark background."""
    return _render_rgb(_named_rgb(colour, rng), shape, rng, size)


def _render_rgb(fg: FloatArray, shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    alpha = _shape_alpha(shape, rng, size)
    background = _background(rng, size)
    image = background * (1 - alpha) + fg * alpha
    image += rng.normal(0, rng.uniform(2, 10), size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")


def held_out_images(
    pairs: Iterable[tuple[str, str]], n_per_pair: int, seed: int, size: int = 64
) -> list[tuple[Image.Image, str, str]]:
    """Fresh images for evaluation, drawn from a seed stream disjoint from training."""
    rng = np.random.default_rng((_HELD_OUT_STREAM, seed))
    return [(render(c, s, rng, size), c, s) for c, s in pairs for _ in range(n_per_pair)]


# --------------------------------------------------------------------------- config / cache


def _recipe_hash(family: str, recipe: Recipe) -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(json.dumps([family, asdict(recipe), open_clip.__version__]).encode())
    return digest.hexdigest()[:8]


def model_name_for(family: str, recipe: Recipe | None = None) -> str:
    recipe = recipe or DEFAULT_RECIPES[family]
    # get_tokenizer() switches to an HF SigLIP tokenizer for any name containing "siglip".
    prefix = {"clip": "micro-clip", "siglip": "micro-sigmoid-clip"}[family]
    return f"{prefix}-{_recipe_hash(family, recipe)}"


def model_config(family: str, recipe: Recipe) -> dict[str, Any]:
    """open_clip model config (the contents of `<model_name>.json`)."""
    config: dict[str, Any] = {
        "embed_dim": recipe.embed_dim,
        "vision_cfg": {
            "image_size": recipe.image_size,
            "layers": list(recipe.vision_layers),
            "width": recipe.vision_width,
            "head_width": recipe.vision_head_width,
        },
        "text_cfg": {
            "context_length": recipe.context_length,
            "vocab_size": 49408,
            "width": recipe.text_width,
            "heads": recipe.text_width // 64,
            "layers": recipe.text_layers,
        },
    }
    if family == "siglip":
        config["init_logit_scale"] = math.log(10)
        config["init_logit_bias"] = -10
    return config


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the cache from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_valid(mc: MicroClip, config: dict[str, Any]) -> bool:
    try:
        if json.loads(mc.config_path.read_text()) != config:
            return False
        state = torch.load(mc.checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:  # missing, unreadable or foreign files all mean "train again"
        return False
    return "logit_scale" in state and (mc.family != "siglip" or "logit_bias" in state)


def ensure_micro_clip(cache_dir: Path, family: str = "clip") -> MicroClip:
    """Return the cached micro-CLIP for `family`, training and caching it first if needed."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    recipe = DEFAULT_RECIPES[family]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = model_name_for(family, recipe)
    mc = MicroClip(name, cache_dir / f"{name}.json", cache_dir / f"{name}.pt", family)
    config = model_config(family, recipe)
    if _is_valid(mc, config):
        return mc
    init_state = None
    if recipe.warm_start:
        base = ensure_micro_clip(cache_dir, recipe.warm_start)
        init_state = torch.load(base.checkpoint_path, map_location="cpu", weights_only=True)
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent trainer finishes before we re-check
        if not _is_valid(mc, config):
            _train_and_save(mc, config, recipe, init_state)
    return mc


def _train_and_save(mc: MicroClip, config: dict[str, Any], recipe: Recipe,
                    init_state: dict[str, torch.Tensor] | None) -> None:
    # The config goes first (training needs it registered); the checkpoint's rename is the
    # commit point, so readers never see a config/checkpoint pair from different runs.
    _atomic_write(mc.config_path, lambda f: f.write(json.dumps(config, indent=2).encode()))
    start = time.perf_counter()
    state, stats = train(mc.model_name, mc.config_path, mc.family, recipe, init_state)
    stats["train_seconds"] = round(time.perf_counter() - start, 1)
    stats["threads"] = _thread_count()
    _atomic_write(mc.checkpoint_path, lambda f: torch.save(state, f))
    stats_path = mc.checkpoint_path.with_suffix(".stats.json")
    _atomic_write(stats_path, lambda f: f.write(json.dumps(stats, indent=2).encode()))


def training_stats(mc: MicroClip) -> dict[str, Any]:
    """What the training run recorded (wall time, final loss, ...), if available."""
    path = mc.checkpoint_path.with_suffix(".stats.json")
    return json.loads(path.read_text()) if path.exists() else {}


def load_micro_clip(mc: MicroClip) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Any]:
    """(model in eval mode, inference preprocess, tokenizer) through open_clip's public API."""
    open_clip.add_model_config(str(mc.config_path))
    model, _, preprocess = open_clip.create_model_and_transforms(
        mc.model_name, pretrained=str(mc.checkpoint_path)
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(mc.model_name)


# --------------------------------------------------------------------------- training


def _thread_count() -> int:
    return int(os.environ.get(THREADS_ENV) or len(os.sched_getaffinity(0)))


def _captions() -> list[tuple[str, str | None, str | None]]:
    """Every training caption with the (colour, shape) it commits to (None = unspecified)."""
    captions: list[tuple[str, str | None, str | None]] = []
    for c, s in SEEN_PAIRS:
        captions += [(t.format(c=c, s=s), c, s) for t in _FULL_TEMPLATES]
    captions += [(t.format(c=c), c, None) for c in COLOURS for t in _COLOUR_TEMPLATES]
    captions += [(t.format(s=s), None, s) for s in SHAPES for t in _SHAPE_TEMPLATES]
    return captions


class _CaptionSampler:
    """Samples captions for training items (indices into _TRAIN_ITEMS) and knows which match."""

    def __init__(self, tokenizer: Any, partial_prob: float) -> None:
        captions = _captions()
        self.tokens = tokenizer([text for text, _, _ in captions])
        self.partial_prob = partial_prob
        # Attribute codes: -1 = the caption leaves it open, -2 = an off-palette image.
        self.caption_colour = np.array([COLOURS.index(c) if c else -1 for _, c, _ in captions])
        self.caption_shape = np.array([SHAPES.index(s) if s else -1 for _, _, s in captions])
        self.item_colour = np.array([COLOURS.index(c) if c else -2 for c, _ in _TRAIN_ITEMS])
        self.item_shape = np.array([SHAPES.index(s) for _, s in _TRAIN_ITEMS])
        matches = self._matches(np.arange(len(_TRAIN_ITEMS)), np.arange(len(captions)))
        is_full = (self.caption_colour >= 0) & (self.caption_shape >= 0)
        self.full = [np.flatnonzero(row & is_full) for row in matches]
        self.partial = [np.flatnonzero(row & ~is_full) for row in matches]

    def _matches(self, item_ids: IntArray, caption_ids: IntArray) -> npt.NDArray[np.bool_]:
        cap_c = self.caption_colour[caption_ids][None, :]
        cap_s = self.caption_shape[caption_ids][None, :]
        ok_c = (cap_c == -1) | (cap_c == self.item_colour[item_ids][:, None])
        ok_s = (cap_s == -1) | (cap_s == self.item_shape[item_ids][:, None])
        return ok_c & ok_s

    def sample(self, item_ids: IntArray, rng: np.random.Generator) -> IntArray:
        partial = rng.random(len(item_ids)) < self.partial_prob
        return np.array([
            rng.choice(self.partial[i] if is_partial or not len(self.full[i]) else self.full[i])
            for i, is_partial in zip(item_ids, partial, strict=True)
        ])

    def positives(self, item_ids: IntArray, caption_ids: IntArray) -> torch.Tensor:
        """[image, caption] matrix: does image i satisfy caption j?"""
        return torch.from_numpy(self._matches(item_ids, caption_ids))


class _MultiPositiveSigLipLoss(SigLipLoss):
    """SigLipLoss where every matching image/caption pair in the batch is a positive.

    With 20 training pairs a batch holds many images of the same pair; treating them as
    negatives of each other (plain SigLIP) caps matching probabilities near 1/duplicates.
    """

    positives: torch.Tensor

    def get_ground_truth(self, device: torch.device, dtype: torch.dtype, num_logits: int,
                         negative_only: bool = False) -> torch.Tensor:
        labels = 2 * self.positives.to(device=device, dtype=dtype) - 1
        return -torch.ones_like(labels) if negative_only else labels


def _image_pool(preprocess: Callable[[Image.Image], torch.Tensor], recipe: Recipe
                ) -> tuple[torch.Tensor, IntArray]:
    """Preprocessed training images and the index into _TRAIN_ITEMS of each."""
    rng = np.random.default_rng((_TRAIN_STREAM, recipe.seed))
    images, item_ids = [], []
    for item_id, (colour, shape) in enumerate(_TRAIN_ITEMS):
        count = recipe.pool_per_pair if colour else recipe.off_palette_per_shape
        for _ in range(count):
            rgb = _named_rgb(colour, rng) if colour else _off_palette_rgb(rng)
            images.append(preprocess(_render_rgb(rgb, shape, rng, recipe.render_size)))
            item_ids.append(item_id)
    return torch.stack(images), np.array(item_ids)


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay, logit = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("logit_"):
            logit.append(p)
        elif p.ndim < 2 or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay, "base_lr": recipe.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": recipe.lr},
        {"params": logit, "weight_decay": 0.0, "base_lr": recipe.lr * recipe.logit_lr_mult},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_factor(step: int, recipe: Recipe) -> float:
    warmup = max(1, int(recipe.steps * recipe.warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))


def _batches(n_pool: int, recipe: Recipe, rng: np.random.Generator) -> Iterator[IntArray]:
    for _ in range(recipe.steps):
        yield rng.integers(0, n_pool, size=recipe.batch_size)


StepCallback = Callable[[int, float], None]


@contextmanager
def _without_log_records(fragment: str) -> Iterator[None]:
    def keep(record: logging.LogRecord) -> bool:
        return fragment not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def train(model_name: str, config_path: Path, family: str, recipe: Recipe,
          init_state: dict[str, torch.Tensor] | None = None, on_step: StepCallback | None = None,
          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the model registered from `config_path`, from scratch or from `init_state`.

    Returns (state_dict, stats).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_thread_count())
    try:
        return _train(model_name, config_path, family, recipe, init_state, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model_name: str, config_path: Path, family: str, recipe: Recipe,
           init_state: dict[str, torch.Tensor] | None, on_step: StepCallback | None,
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(recipe.seed)
    with _without_log_records("No pretrained weights loaded"):  # expected: we train from scratch
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    if init_state is not None:
        # A CLIP start has no logit_bias; the SigLIP config's init value is kept for it.
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if unexpected or set(missing) - {"logit_bias"}:
            raise RuntimeError(f"warm start mismatch: missing={missing} unexpected={unexpected}")
    # Random token embeddings already separate the few dozen words we use; freezing the
    # 49408-row table saves most of the optimizer and backward time.
    model.token_embedding.requires_grad_(recipe.train_token_embedding)
    tokenizer = open_clip.get_tokenizer(model_name)
    pool, pool_items = _image_pool(preprocess, recipe)
    sampler = _CaptionSampler(tokenizer, recipe.partial_caption_prob)
    loss_fn = _MultiPositiveSigLipLoss() if family == "siglip" else ClipLoss()
    optimizer = _optimizer(model, recipe)
    rng = np.random.default_rng((_TRAIN_STREAM, recipe.seed, 1))
    model.train()
    loss = torch.zeros(())
    for step, idx in enumerate(_batches(len(pool), recipe, rng)):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(step, recipe)
        item_ids = pool_items[idx]
        caption_ids = sampler.sample(item_ids, rng)
        image_features = model.encode_image(pool[idx], normalize=True)
        # A batch repeats captions a lot: encode each distinct one once.
        unique_ids, inverse = np.unique(caption_ids, return_inverse=True)
        text_features = model.encode_text(sampler.tokens[unique_ids], normalize=True)[inverse]
        if family == "siglip":
            loss_fn.positives = sampler.positives(item_ids, caption_ids)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp(), model.logit_bias)
        else:
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    stats = {"final_loss": round(loss.item(), 4), "logit_scale": round(model.logit_scale.exp().item(), 2)}
    if model.logit_bias is not None:
        stats["logit_bias"] = round(model.logit_bias.item(), 2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def true_label_probabilities(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Any,
    images: Sequence[tuple[Image.Image, str, str]],
    template: str = ZERO_SHOT_TEMPLATES[0],
) -> torch.Tensor:
    """Probability of each image's true label: softmax over LABELS (CLIP) or sigmoid (SigLIP)."""
    texts = tokenizer([template.format(label) for label in LABELS])
    text_features = model.encode_text(texts, normalize=True)
    batch = torch.stack([preprocess(image) for image, _, _ in images])
    image_features = model.encode_image(batch, normalize=True)
    logits = model.logit_scale.exp() * image_features @ text_features.T
    if model.logit_bias is not None:
        probs = torch.sigmoid(logits + model.logit_bias)
    else:
        probs = logits.softmax(dim=-1)
    truth = torch.tensor([LABELS.index(f"{c} {s}") for _, c, s in images])
    return probs[torch.arange(len(images)), truth]


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Any,
    images: Sequence[tuple[Image.Image, str, str]],
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
) -> float:
    """Top-1 accuracy over the 25 LABELS using open_clip's zero-shot classifier recipe."""
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames=LABELS, templates=list(templates),
        num_classes_per_batch=len(LABELS), device="cpu", use_tqdm=False,
    )
    batch = torch.stack([preprocess(image) for image, _, _ in images])
    features = model.encode_image(batch, normalize=True)
    predicted = (features @ classifier).argmax(dim=-1).tolist()
    truth = [LABELS.index(f"{c} {s}") for _, c, s in images]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return correct / len(images)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="clip")
    parser.add_argument("--cache", type=Path, default=Path(".testbed-cache"))
    parser.add_argument("--n-per-pair", type=int, default=40)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    mc = ensure_micro_clip(args.cache, args.family)
    elapsed = time.perf_counter() - start
    stats = training_stats(mc)
    print(f"model {mc.model_name} ({mc.family}) -> {mc.checkpoint_path} "
          f"({mc.checkpoint_path.stat().st_size / 2**20:.1f} MiB)")
    print(f"ensure_micro_clip: {elapsed:.1f}s; recorded training: {stats}")
    model, preprocess, tokenizer = load_micro_clip(mc)
    seen = held_out_images(SEEN_PAIRS, args.n_per_pair, seed=0)
    unseen = held_out_images(sorted(UNSEEN_PAIRS), args.n_per_pair, seed=0)
    for name, images in (("seen", seen), ("unseen", unseen)):
        accuracy = zero_shot_accuracy(model, preprocess, tokenizer, images)
        p_true = true_label_probabilities(model, preprocess, tokenizer, images).median().item()
        print(f"zero-shot top-1 {name + ' pairs:':14s}{accuracy:6.1%}   median p(true label) {p_true:.2f}")
    print(f"(chance top-1 {1 / len(LABELS):.0%}, {len(seen)} seen / {len(unseen)} unseen held-out images)")


if __name__ == "__main__":
    _main()
