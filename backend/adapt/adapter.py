"""Image embeddings → a control's probabilities, zero-shot or through an adapter: `score`.

The one place predict, review and adaptation turn embeddings into served probabilities. An
`Adapter` (fitted by fit.py) adds a residual to the zero-shot logits, `z = z0(x) + x · Rᵀ + c`,
then calibrates (temperature for softmax, Platt for sigmoid). Without one, the zero-shot head
scores alone, as zeroshot/scoring.py does (torch softmax or sigmoid, uncalibrated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..zeroshot.scoring import ZeroShotHead, label_logits, probabilities
from .calibration import Platt

Array = npt.NDArray[np.float64]
Vectors = npt.NDArray[np.floating[Any]]
"""(N, D) L2-normalised image embeddings, float32 (as encoded) or float64 (renormalised)."""


@dataclass(frozen=True)
class Adapter:
    """What a fit adds to the zero-shot head of one control."""

    method: str  # "zero-shot" (calibration only), "prototypes" or "probe"
    residual: Array | None = None  # (L, D)
    bias: Array | None = None  # (L,)
    temperature: float = 1.0  # softmax heads
    platt: Platt | None = None  # sigmoid heads
    thresholds: Array | None = None  # multi-label decisions
    params: dict[str, float] = field(default_factory=dict)

    def logits(self, z0: Array, vectors: Array) -> Array:
        if self.residual is None:
            return z0
        z = z0 + vectors @ self.residual.T
        return z + self.bias if self.bias is not None else z

    def probabilities(self, z0: Array, vectors: Array, scoring: str) -> Array:
        return calibrated(self.logits(z0, vectors), scoring, self.temperature, self.platt)


@dataclass(frozen=True)
class Scored:
    """A control's probabilities for N images and the per-label decision thresholds that go
    with them (multi-label adapters only; None: the score threshold rule decides)."""

    probs: Array  # (N, L) float64 in [0, 1]
    thresholds: Array | None = None  # (L,)


def score(head: ZeroShotHead, vectors: Vectors, adapter: Adapter | None = None) -> Scored:
    """The served probabilities of `vectors` under the zero-shot `head` and `adapter`, if any.

    Both paths compute the logits from float32 embeddings; the adapter adds its residual to
    float64 embeddings (the float32 values widened, or the float64 ones as given)."""
    if adapter is None:
        return Scored(probabilities(head, torch.from_numpy(vectors)))
    x = vectors.astype(np.float64)
    return Scored(adapter.probabilities(zero_shot_logits(head, x), x, head.scoring),
                  adapter.thresholds)


def zero_shot_logits(head: ZeroShotHead, vectors: Vectors) -> Array:
    """(N, D) embeddings → (N, L) float64 zero-shot logits (computed in float32)."""
    with torch.no_grad():
        logits = label_logits(head, torch.from_numpy(vectors.astype(np.float32)))
    return logits.double().numpy()


def calibrated(logits: Array, scoring: str, temperature: float, platt: Platt | None) -> Array:
    if scoring == "softmax":
        return softmax(logits / temperature)
    if platt is not None:
        return platt.apply(logits)
    return 1.0 / (1.0 + np.exp(-logits))


def softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: Array = exp / exp.sum(axis=1, keepdims=True)
    return result
