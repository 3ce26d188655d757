"""Loading the encoder on the inference thread, and waiting for it: `EncoderHost`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import metrics
from ..config import Settings
from ..errors import BackendError, ModelUnavailable
from .encoder import Encoder, ModelSpec, load_encoder
from .inference import InferenceThread

log = logging.getLogger(__name__)

LOAD_WAIT_S = 90.0
"""How long /predict waits for a model still loading (Label Studio gives it 100 s)."""

State = Literal["loading", "ready", "failed"]


@dataclass
class ModelState:
    state: State = "loading"
    error: str | None = None
    load_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def max_batch(settings: Settings) -> int:
    """CPU: batch 1 → 8 gains only 1.4× on ViT-B/32 (performance-notes.md); GPU: batch big."""
    if settings.BATCH_SIZE:
        return settings.BATCH_SIZE
    device = settings.DEVICE
    gpu = device.startswith(("cuda", "mps")) or device == "auto" and torch.cuda.is_available()
    return 64 if gpu else 8


class EncoderHost:
    """The encoder (given, or loaded in the background on the inference thread) and its state."""

    def __init__(self, settings: Settings, inference: InferenceThread,
                 encoder: Encoder | None = None) -> None:
        self.settings = settings
        self.inference = inference
        self.spec = ModelSpec.from_settings(settings)
        self.model_label = self.spec.label()  # the weights as loaded, even if the file changes
        # random weights differ in every process: their embeddings must never be reused
        self.embedding_model = self.model_label + (f"#{uuid.uuid4().hex[:8]}"
                                                  if self.spec.random_weights else "")
        self.status = ModelState()
        self.encoder = encoder

    def start(self) -> None:
        """Mark a given encoder ready, or load one on the (started) inference thread."""
        if self.encoder is not None:
            self._mark_ready(0.0)
            return
        self.inference.submit(self._load)

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.encoder = load_encoder(self.settings)
        except BackendError as exc:
            self.status = ModelState("failed", str(exc))
            log.error("model failed to load: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - anything else is a load failure too
            self.status = ModelState("failed", f"{type(exc).__name__}: {exc}")
            log.exception("model failed to load")
            return
        self._mark_ready(time.perf_counter() - started)

    def _mark_ready(self, seconds: float) -> None:
        assert self.encoder is not None
        details: dict[str, Any] = getattr(self.encoder, "describe", dict)()
        self.status = ModelState("ready", None, round(seconds, 3), details)
        metrics.MODEL_LOAD_SECONDS.set(seconds)
        metrics.MODEL_READY.set(1)
        log.info("model %s ready in %.1f s: %s", self.model_label, seconds, details)

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    def check_not_failed(self) -> None:
        if self.status.state == "failed":
            raise ModelUnavailable(f"The model failed to load: {self.status.error}")

    async def wait_ready(self, timeout: float = LOAD_WAIT_S) -> Encoder:
        deadline = time.monotonic() + timeout
        while self.status.state == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.check_not_failed()
        if self.encoder is None:
            raise ModelUnavailable(f"The model is still loading after {timeout:.0f} s; retry.")
        return self.encoder

    def loaded(self) -> Encoder:
        """The encoder, for code that runs only once `wait_ready` returned."""
        assert self.encoder is not None
        return self.encoder
