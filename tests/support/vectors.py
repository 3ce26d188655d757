"""Small array helpers for tests that build embeddings and scores by hand."""

from __future__ import annotations

import numpy as np


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as CLIP embeddings are."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
