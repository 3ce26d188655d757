"""Per-label probabilities → how unsure the model is, in the measures active learning uses.

Single-label (each row sums to 1 over exclusive labels):
- least confidence: 1 − p(top);
- margin: p(top) − p(second) (small = unsure);
- entropy: −Σ p log p, divided by log L so it lies in [0, 1] whatever the label count.
Multi-label (independent scores with per-label thresholds): each label's distance from its
threshold; the smallest one says how close the control is to a different decision.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def least_confidence(probs: Array) -> Array:
    return np.asarray(1.0 - probs.max(axis=1), dtype=np.float64)


def margin(probs: Array) -> Array:
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top_two = -np.partition(-probs, 1, axis=1)[:, :2]
    return np.asarray(top_two[:, 0] - top_two[:, 1], dtype=np.float64)


def entropy(probs: Array) -> Array:
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    p = np.clip(probs, 1e-12, 1.0)
    return np.asarray(-(p * np.log(p)).sum(axis=1) / np.log(probs.shape[1]), dtype=np.float64)


def threshold_distance(probs: Array, thresholds: Array) -> Array:
    """(N, L): how far each label's score is from the threshold that decides it."""
    return np.asarray(np.abs(probs - thresholds), dtype=np.float64)


def measures(probs: Array, multiple: bool = False,
             thresholds: Array | None = None) -> dict[str, Array]:
    """All measures for (N, L) probabilities, as arrays of N values (higher = more unsure,
    except `margin` and `threshold_distance`, where lower is more unsure)."""
    if multiple:
        cut = thresholds if thresholds is not None else 0.5 * probs.max(axis=1, keepdims=True)
        distance = threshold_distance(probs, np.broadcast_to(cut, probs.shape))
        return {"threshold_distance": distance.min(axis=1),
                "least_confidence": least_confidence(probs)}
    return {"least_confidence": least_confidence(probs), "margin": margin(probs),
            "entropy": entropy(probs)}


def priority(probs: Array, strategy: str = "margin") -> Array:
    """One number per item, higher = ask a human first."""
    if strategy == "margin":
        return 1.0 - margin(probs)
    if strategy == "entropy":
        return entropy(probs)
    if strategy == "least_confidence":
        return least_confidence(probs)
    raise ValueError(f"unknown uncertainty strategy {strategy!r}; use margin, entropy or "
                     "least_confidence")
