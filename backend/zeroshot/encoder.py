"""The open_clip model, loaded once per process: images and texts in, L2-normalised embeddings out.

What it knows about the model and nothing else: device and precision, the preprocessing the
weights were trained with, the tokenizer, and the scoring constants (`logit_scale`, and
`logit_bias` for the SigLIP family, whose presence is what makes a model "sigmoid").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from ..config import Settings
from ..errors import ConfigError, ModelUnavailable

log = logging.getLogger(__name__)

Family = Literal["clip", "siglip"]
TEXT_BATCH = 256
_SCHEMAS = ("hf-hub:", "local-dir:")


class Encoder(Protocol):
    """What the rest of the backend needs from an image-text model."""

    family: Family
    logit_scale: float
    logit_bias: float | None
    input_size: int

    pixel_steps: tuple[tuple[Any, ...], ...] | None
    """The PIL part of `preprocess` as plain data (images/steps.py) when `encode_pixels` can
    finish it; None: only `preprocess` + `encode_images` work for this model."""

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load, as the settings name them."""

    name: str
    pretrained: str
    config_path: Path | None = None
    cache_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls(settings.MODEL_NAME, settings.MODEL_PRETRAINED, settings.MODEL_CONFIG,
                   settings.MODEL_CACHE_DIR)

    @property
    def has_schema(self) -> bool:
        return self.name.startswith(_SCHEMAS)

    @property
    def is_file(self) -> bool:
        return bool(self.pretrained) and Path(self.pretrained).is_file()

    @property
    def random_weights(self) -> bool:
        return not self.has_schema and self.pretrained.lower() in ("", "none")

    def label(self) -> str:
        """Short, stable identity for model_version: architecture and weights."""
        if self.has_schema:
            schema, _, rest = self.name.partition(":")
            return f"{schema}:{Path(rest).name or rest}"
        if self.is_file:
            path = Path(self.pretrained)
            stat = path.stat()
            ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            return f"{self.name}/{path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:6]}"
        return f"{self.name}/{self.pretrained or 'none'}"


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={name} but CUDA is not available here; set DEVICE=auto or cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"DEVICE={name} but MPS is not available here; set DEVICE=auto or cpu.")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Mixed precision only where it pays: GPU. On CPU, BF16 autocast is slower at batch > 1
    (ViT-B-32, batch 8: 194 ms/img vs 59 in FP32), so BF16 there means BF16 weights instead."""
    if precision == "fp32" or device.type == "cpu" and precision in ("auto", "bf16"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def weights_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """CPU with PRECISION=bf16: the model's weights in BF16 (ViT-B-32, batch 8, 2 Zen 4 cores:
    28 ms/img vs 59 in FP32; embeddings' cosine to FP32 ≥ 0.9999 on random weights). Only worth
    it where the CPU computes BF16 natively (AVX512-BF16, AMX): see `cpu_has_bf16`."""
    if device.type == "cpu" and precision == "bf16":
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs BF16 matrix products natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class OpenClipEncoder:
    """An open_clip model in eval mode on one device."""

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Any, device: torch.device, dtype: torch.dtype | None,
                 weights: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        bias = getattr(model, "logit_bias", None)
        self.family: Family = "siglip" if bias is not None else "clip"
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        self.logit_bias = float(bias.detach().reshape(-1)[0].item()) if bias is not None else None
        self.input_size = _input_size(model)
        self._head, self._tail = _split_preprocess(preprocess)
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        if self._tail is not None:  # shaped for (N, 3, S, S), on the device, once
            mean, std = _normalize_constants(preprocess)
            self._mean, self._std = (c.to(device).view(1, 3, 1, 1) for c in (mean, std))
        self.pixel_steps = _pixel_steps(self._head, self.input_size) if self._tail else None
        self.weights = weights  # after reading the scoring constants: in FP32, not rounded
        if weights is not None:
            self.model = self.model.to(weights)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image → (3, S, S) float tensor, exactly as the weights were trained."""
        if self._tail is None:
            return self._preprocess(image)
        for step in self._head:
            image = step(image)
        return self._tail(image)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float → (N, D) float32 on CPU, L2-normalised."""
        with self._autocast():
            features = self.model.encode_image(
                pixels.to(self.device, dtype=self.weights or pixels.dtype, non_blocking=True))
        return _normalise(features)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) or (N, 3, S, S) uint8, after `pixel_steps` → (N, D) float32 on CPU,
        L2-normalised. Normalised on the device, in the float32 order of `preprocess`
        (x / 255, then (x - mean) / std): on CPU, the same embeddings bit for bit."""
        if self._mean is None or self._std is None:
            raise TypeError("this model's preprocessing does not split: use encode_images")
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.shape[-1] == 3:  # NHWC → NCHW, while still uint8 (a quarter of the bytes)
            pixels = pixels.permute(0, 3, 1, 2)
        # per-channel constants over whole planes: vectorised, where broadcasting over a last
        # dimension of 3 is not (the same arithmetic per element, so the same values)
        mean, std = self._mean, self._std
        # One new float tensor, made contiguous NCHW in the same pass that converts it (a
        # copy, never the caller's tensor), then the same three operations in place: the
        # values of `(x / 255.0 - mean) / std` without its uint8 copy and three temporaries
        # (batch 8, 2 busy cores, median: 224 px 0.8 → 0.65 ms, 4.7 → 2.2 ms where fresh
        # memory has to fault in; 384 px 4-25 → 2-6 ms).
        values = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return self.encode_images(values.div_(255.0).sub_(mean).div_(std))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N prompts → (N, D) float32 on CPU, each L2-normalised."""
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start:start + TEXT_BATCH])).to(self.device)
            with self._autocast():
                chunks.append(_normalise(self.model.encode_text(tokens)))
        return torch.cat(chunks) if chunks else torch.empty(0)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "device": str(self.device),
                "precision": str(self.dtype or self.weights or torch.float32).removeprefix(
                    "torch."),
                "logit_scale": round(self.logit_scale, 4), "logit_bias": self.logit_bias,
                "input_size": self.input_size}


def _normalise(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    normalised: torch.Tensor = features / features.norm(dim=-1, keepdim=True)
    return normalised.cpu()


def _split_preprocess(preprocess: Any) -> tuple[list[Any], Callable[[Any], torch.Tensor] | None]:
    """open_clip's pipelines end in ToTensor + Normalize: torch ops that, run in the decode
    threads, each start PyTorch's intra-op thread pool and oversubscribe the CPUs (2.4 ms per
    image alone, 30 ms beside the encoder on 2 cores). The same arithmetic in NumPy, in the same
    float32 order, gives identical tensors on one core. Other pipelines run unchanged."""
    from torchvision import transforms as tv

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not (isinstance(steps[-2], tv.ToTensor)
                              and isinstance(steps[-1], tv.Normalize)):
        return [], None
    norm = steps[-1]
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    if mean.size not in (1, 3) or std.size not in (1, 3) or norm.inplace:
        return [], None

    def to_normalised_tensor(image: Any) -> torch.Tensor:
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            tensor: torch.Tensor = norm(steps[-2](image))  # what torchvision would do
            return tensor
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
        pixels = (pixels - mean) / std  # HWC broadcast over channels, as Normalize per channel
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    return steps[:-2], to_normalised_tensor


def _normalize_constants(preprocess: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The final Normalize's mean and std as float32 tensors of 3 (one per channel)."""
    norm = preprocess.transforms[-1]
    mean = np.broadcast_to(np.asarray(norm.mean, dtype=np.float32), (3,))
    std = np.broadcast_to(np.asarray(norm.std, dtype=np.float32), (3,))
    return torch.from_numpy(mean.copy()), torch.from_numpy(std.copy())


def _pixel_steps(head: Sequence[Any], side: int) -> tuple[tuple[Any, ...], ...] | None:
    """`head` (the PIL transforms before ToTensor) as images/steps.py data, if every step is
    one it reproduces and the result is side × side RGB; else None."""
    from torchvision import transforms as tv
    from torchvision.transforms.functional import pil_modes_mapping

    steps: list[tuple[Any, ...]] = []
    for step in head:
        if isinstance(step, tv.Resize):
            size = (step.size,) if isinstance(step.size, int) else tuple(step.size)
            steps.append(("resize", size, pil_modes_mapping[step.interpolation],
                          step.max_size))
        elif isinstance(step, tv.CenterCrop):
            steps.append(("center_crop", tuple(step.size)))
        elif _converts_to_rgb(step):
            steps.append(("convert", "RGB"))
        else:
            return None
    final = [s for s in steps if s[0] == "center_crop" or s[0] == "resize" and len(s[1]) == 2]
    if not final or tuple(final[-1][1]) != (side, side):
        return None
    return tuple(steps)


def _converts_to_rgb(step: Any) -> bool:
    """open_clip's `MaybeConvertMode("RGB")` or (older) `_convert_to_rgb`."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"


def _input_size(model: Any) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_encoder(settings: Settings) -> OpenClipEncoder:
    """Build the encoder the settings describe. Raises ConfigError or ModelUnavailable."""
    import open_clip  # deferred: importing open_clip costs seconds, /health must not wait

    spec = ModelSpec.from_settings(settings)
    device = resolve_device(settings.DEVICE)
    if settings.THREADS:
        torch.set_num_threads(settings.THREADS)
    if spec.config_path is not None:
        open_clip.add_model_config(str(spec.config_path))
    _check_known(open_clip, spec)
    with _hub_errors(spec):
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name,
            pretrained=None if spec.random_weights else spec.pretrained,
            device=device,
            cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
        )
        tokenizer = open_clip.get_tokenizer(
            spec.name, cache_dir=str(spec.cache_dir) if spec.cache_dir else None
        )
    if spec.random_weights:
        log.warning("MODEL_PRETRAINED=none: %s has RANDOM weights; predictions are noise",
                    spec.name)
    if weights_dtype(device, settings.PRECISION) and not cpu_has_bf16():
        log.warning("PRECISION=bf16 on a CPU without native BF16 (AVX512-BF16 or AMX): "
                    "likely slower than fp32")
    return OpenClipEncoder(model, preprocess, tokenizer, device,
                           autocast_dtype(device, settings.PRECISION),
                           weights_dtype(device, settings.PRECISION))


def _check_known(open_clip: Any, spec: ModelSpec) -> None:
    if spec.has_schema:
        return
    if spec.name not in open_clip.list_models():
        raise ConfigError(
            f"MODEL_NAME={spec.name!r} is not an open_clip architecture. Use one of "
            "open_clip.list_models() (e.g. ViT-B-16-SigLIP, ViT-B-32-256), set MODEL_CONFIG to a "
            "model-config JSON for a custom one, or use MODEL_NAME=local-dir:/path."
        )
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.random_weights or spec.is_file or spec.pretrained in tags:
        return
    raise ConfigError(
        f"MODEL_PRETRAINED={spec.pretrained!r} is neither a pretrained tag of {spec.name} "
        f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file."
    )


@contextlib.contextmanager
def _hub_errors(spec: ModelSpec) -> Iterator[None]:
    """Turn download and checkpoint failures into one message that says how to go offline."""
    try:
        yield
    except (ConfigError, ModelUnavailable):
        raise
    except Exception as exc:
        raise ModelUnavailable(_load_failure_hint(spec, exc)) from exc


def _load_failure_hint(spec: ModelSpec, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500].rstrip(".")
    if spec.is_file or spec.has_schema and spec.name.startswith("local-dir:"):
        return (f"Could not load {spec.label()} ({reason}). Check that the checkpoint matches "
                f"the architecture {spec.name} (MODEL_CONFIG for custom ones).")
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"Could not load {spec.label()}{offline}: {reason}. The weights (and, for SigLIP, the "
        "tokenizer) come from the Hugging Face Hub. Without network access, download them "
        "elsewhere and either set MODEL_PRETRAINED=/path/to/open_clip_model.safetensors (a local "
        "checkpoint file for MODEL_NAME), or set MODEL_NAME=local-dir:/path/to/dir holding "
        "open_clip_config.json, the weights and the tokenizer files, or mount a populated "
        "Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1."
    )
