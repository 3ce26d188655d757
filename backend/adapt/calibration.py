"""Honest confidence: calibration fits and the metrics that judge them.

- softmax heads: one temperature T, minimising the NLL of `softmax(z / T)`;
- sigmoid heads (SigLIP, multi-label): Platt scaling `σ(a_c · z_c + b_c)` per label, pulled
  toward one shared (a, b) so labels with few examples borrow from the rest;
- multi-label thresholds: per label, the one maximising F1 on reviewed items when the label has
  enough positives, else one shared threshold.

Every fit here sees out-of-fold logits only (fit.py makes them), never the items the
head was fitted on, or the fitted confidence would be as optimistic as the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

Array = npt.NDArray[np.float64]

ECE_BINS = 15
MIN_POSITIVES_FOR_OWN_THRESHOLD = 10
"""A label's own multi-label threshold needs this many positives (a working rule)."""
TEMPERATURE_PRIOR_ITEMS = 4.0
GOLDEN_STEPS = 30
"""Golden-section steps: the bracket [0.05, 20] shrinks to a relative precision of ~1e-5."""
PLATT_PULL = 1.0
"""Strength of the pull of per-label Platt parameters toward the shared ones."""
PLATT_PSEUDO_ITEMS = 20.0
"""The pull weighs like this many items: labels seen far less keep the shared fit."""


# --- metrics -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """How good and how honest a set of predictions is."""

    n: int
    accuracy: float
    nll: float
    ece: float
    brier: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "accuracy": round(self.accuracy, 4), "nll": round(self.nll, 4),
                "ece": round(self.ece, 4), "brier": round(self.brier, 4)}


def single_label_scores(probs: Array, truth: npt.NDArray[np.int64]) -> Scores:
    """(N, L) probabilities of exclusive labels against (N,) true label indices."""
    n = len(truth)
    if n == 0:
        return Scores(0, float("nan"), float("nan"), float("nan"), float("nan"))
    rows = np.arange(n)
    picked = probs.argmax(axis=1)
    hits = (picked == truth).astype(float)
    nll = float(-np.mean(np.log(np.clip(probs[rows, truth], 1e-12, 1.0))))
    onehot = np.zeros_like(probs)
    onehot[rows, truth] = 1.0
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    return Scores(n, float(hits.mean()), nll, expected_calibration_error(probs.max(axis=1), hits),
                  brier)


def multi_label_scores(probs: Array, truth: Array) -> Scores:
    """(N, L) independent probabilities against (N, L) 0/1 truth; accuracy is per decision
    at 0.5 (only for comparing heads: served decisions use fitted thresholds)."""
    n = probs.size
    if n == 0:
        return Scores(0, float("nan"), float("nan"), float("nan"), float("nan"))
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    nll = float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p)))
    accuracy = float(np.mean((probs >= 0.5) == (truth > 0.5)))
    return Scores(len(probs), accuracy, nll, expected_calibration_error(p.ravel(), truth.ravel()),
                  float(np.mean((probs - truth) ** 2)))


def expected_calibration_error(confidence: Array, correct: Array, bins: int = ECE_BINS) -> float:
    """ECE with equal-width bins: the mean |accuracy − confidence| weighted by bin size."""
    if len(confidence) == 0:
        return float("nan")
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def reliability(confidence: Array, correct: Array, bins: int = 10) -> list[dict[str, float]]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram)."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(inside.sum()),
                         "confidence": float(confidence[inside].mean()),
                         "accuracy": float(correct[inside].mean())})
    return rows


# --- fits --------------------------------------------------------------------------------------
def fit_temperature(logits: Array, truth: npt.NDArray[np.int64],
                    prior_items: float | None = None) -> float:
    """T minimising the NLL of softmax(logits / T), golden-section search on log T.

    A Gaussian prior on log T around 0 (weighing like `prior_items` items) keeps a handful of
    all-correct corrections from driving T to zero, i.e. to certainty."""
    if len(truth) == 0:
        return 1.0
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(truth, dtype=np.int64))

    prior = TEMPERATURE_PRIOR_ITEMS if prior_items is None else prior_items

    def nll(log_t: float) -> float:
        data = torch.nn.functional.cross_entropy(z / np.exp(log_t), y, reduction="sum")
        return float(data) + prior * log_t ** 2

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(GOLDEN_STEPS):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


@dataclass(frozen=True)
class Platt:
    """Per-label `σ(a · z + b)`; arrays of shape (L,)."""

    a: Array
    b: Array

    def apply(self, logits: Array) -> Array:
        return 1.0 / (1.0 + np.exp(-(self.a * logits + self.b)))


def fit_platt(logits: Array, truth: Array, pull: float = PLATT_PULL) -> Platt:
    """Per-label Platt scaling on (N, L) logits and 0/1 truth, shrunk toward shared (a, b).

    Minimises the summed binary NLL plus `pull · PLATT_PSEUDO_ITEMS · ‖(a_c, b_c) − (a, b)‖²`
    per label, so a label with few examples keeps the shared fit and one with many gets its
    own."""
    n_labels = logits.shape[1]
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(truth, dtype=np.float64))
    shared = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    own = torch.zeros(n_labels, 2, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([shared, own], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        a, b = shared[0] + own[:, 0], shared[1] + own[:, 1]
        loss_per_label = torch.nn.functional.binary_cross_entropy_with_logits(
            a * z + b, y, reduction="none").sum(dim=0)
        penalty = pull * PLATT_PSEUDO_ITEMS * (own ** 2).sum()
        loss = (loss_per_label.sum() + penalty) / y.numel()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        a = (shared[0] + own[:, 0]).numpy().copy()
        b = (shared[1] + own[:, 1]).numpy().copy()
    return Platt(a, b)


def fit_thresholds(probs: Array, truth: Array,
                   min_positives: int = MIN_POSITIVES_FOR_OWN_THRESHOLD) -> Array:
    """Per-label decision thresholds for multi-label: max F1 on reviewed items; labels with
    fewer than `min_positives` positives share the threshold that is best over all labels."""
    shared = _best_f1_threshold(probs.ravel(), truth.ravel())
    thresholds = np.full(probs.shape[1], shared)
    for label in range(probs.shape[1]):
        if truth[:, label].sum() >= min_positives:
            thresholds[label] = _best_f1_threshold(probs[:, label], truth[:, label])
    return thresholds


def _best_f1_threshold(scores: Array, truth: Array) -> float:
    if truth.sum() == 0:
        return 0.5
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    true_pos = np.cumsum(hits)
    f1 = 2 * true_pos / (np.arange(1, len(hits) + 1) + hits.sum())
    best = int(np.argmax(f1))
    below = ranked[best + 1] if best + 1 < len(ranked) else 0.0
    return float((ranked[best] + below) / 2)  # between the last kept and the first dropped
