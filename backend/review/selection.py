"""Which tasks a human should label next, chosen over their cached image embeddings.

Strategies (all deterministic for a given seed):
- `uncertainty`: the top-k by an uncertainty measure of the current head (uncertainty.py);
- `coreset`: k-center greedy — each pick is the item farthest from everything picked or
  labelled so far (diversity; at very low budgets it favours outliers);
- `uncertain_diverse`: k-center greedy restricted to the most uncertain items (a few times the
  budget), so a batch is not k near-duplicates of one confusing image;
- `cold_start`: before any label, the most typical item of each of k clusters (k-means on the
  embeddings, typicality = inverse mean distance to its nearest neighbours), with clusters
  shared out across the zero-shot guesses so every predicted class is covered first.
A `random` slice is always set aside first (default 10 % of the budget): unbiased items for
evaluating and calibrating the head, which the other strategies would never pick.
Embeddings are L2-normalised rows; distances are cosine distances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..zeroshot.uncertainty import priority

Array = npt.NDArray[np.float64]
Index = npt.NDArray[np.int64]
STRATEGIES = ("uncertainty", "coreset", "uncertain_diverse", "cold_start", "random")
UNCERTAIN_POOL_FACTOR = 4
TYPICALITY_NEIGHBOURS = 10
KMEANS_STEPS = 25


@dataclass(frozen=True)
class Pick:
    """Chosen item positions, in pick order, with why each was chosen."""

    index: Index
    reasons: list[str]
    params: dict[str, Any] = field(default_factory=dict)


def select(strategy: str, budget: int, embeddings: Array, probs: Array | None = None, *,
           labelled: Index | None = None, random_fraction: float = 0.1, seed: int = 0,
           uncertainty: str = "margin") -> Pick:
    """Pick `budget` unlabelled items (positions into `embeddings`) by `strategy`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy in ("uncertainty", "uncertain_diverse") and probs is None:
        raise ValueError(f"strategy {strategy!r} needs the current head's probabilities")
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(embeddings), dtype=bool)
    if labelled is not None:
        taken[labelled] = True
    budget = min(budget, int((~taken).sum()))
    n_random = budget if strategy == "random" else int(round(budget * random_fraction))
    picks = list(rng.choice(np.flatnonzero(~taken), size=n_random, replace=False))
    reasons = ["random slice"] * n_random
    taken[picks] = True
    rest = budget - n_random
    chosen, why = _strategy(strategy, rest, embeddings, probs, taken, rng, uncertainty)
    params = {"strategy": strategy, "budget": budget, "random_fraction": random_fraction,
              "seed": seed, "uncertainty": uncertainty,
              "labelled": 0 if labelled is None else len(labelled)}
    return Pick(np.asarray(picks + chosen, dtype=np.int64), reasons + why, params)


def _strategy(strategy: str, k: int, x: Array, probs: Array | None, taken: npt.NDArray[np.bool_],
              rng: np.random.Generator, measure: str) -> tuple[list[int], list[str]]:
    if k <= 0 or strategy == "random":
        return [], []
    free = np.flatnonzero(~taken)
    if strategy == "uncertainty":
        assert probs is not None
        score = priority(probs[free], measure)
        order = free[np.argsort(-score, kind="stable")[:k]]
        return [int(i) for i in order], [f"{measure} uncertainty"] * len(order)
    if strategy == "uncertain_diverse":
        assert probs is not None
        score = priority(probs[free], measure)
        pool = free[np.argsort(-score, kind="stable")[:k * UNCERTAIN_POOL_FACTOR]]
        chosen = k_center(x, pool, np.flatnonzero(taken), k)
        return chosen, [f"{measure} uncertainty, diverse"] * len(chosen)
    if strategy == "coreset":
        chosen = k_center(x, free, np.flatnonzero(taken), k)
        return chosen, ["coverage (k-center)"] * len(chosen)
    guesses = probs.argmax(axis=1) if probs is not None else np.zeros(len(x), dtype=np.int64)
    chosen = cold_start(x, free, guesses, k, rng)
    return chosen, ["typical of its cluster (cold start)"] * len(chosen)


def k_center(x: Array, candidates: Index, centres: Index, k: int) -> list[int]:
    """Greedy k-center: repeatedly take the candidate farthest from all centres."""
    if len(candidates) == 0:
        return []
    if len(centres):
        nearest = 1.0 - (x[candidates] @ x[centres].T).max(axis=1)
    else:  # nothing labelled: start from the item farthest from the mean
        nearest = 1.0 - x[candidates] @ _unit(x[candidates].mean(axis=0))
    chosen: list[int] = []
    for _ in range(min(k, len(candidates))):
        best = int(np.argmax(nearest))
        chosen.append(int(candidates[best]))
        nearest = np.minimum(nearest, 1.0 - x[candidates] @ x[candidates[best]])
        nearest[best] = -np.inf
    return chosen


def cold_start(x: Array, candidates: Index, guesses: Index, k: int,
               rng: np.random.Generator) -> list[int]:
    """The most typical item of k clusters, clusters shared out across zero-shot guesses."""
    if len(candidates) == 0:
        return []
    classes = np.unique(guesses[candidates])
    shares = _share(k, [int((guesses[candidates] == c).sum()) for c in classes])
    chosen: list[int] = []
    for label, share in zip(classes, shares):
        members = candidates[guesses[candidates] == label]
        if share == 0:
            continue
        assignment = kmeans(x[members], share, rng)
        for cluster in range(share):
            inside = members[assignment == cluster]
            if len(inside):
                chosen.append(int(inside[np.argmax(typicality(x[inside]))]))
    return chosen[:k]


def _share(k: int, sizes: list[int]) -> list[int]:
    """k slots over classes: one each first (largest classes first), the rest by size."""
    order = np.argsort(sizes)[::-1]
    shares = [0] * len(sizes)
    for i in order[:k]:
        shares[i] = 1
    left = k - sum(shares)
    total = sum(sizes)
    if left > 0 and total:
        extra = np.floor(np.array(sizes) / total * left).astype(int)
        for i in order[: left - int(extra.sum())]:
            extra[i] += 1
        shares = [min(s + int(e), size) for s, e, size in zip(shares, extra, sizes)]
    return shares


def kmeans(x: Array, k: int, rng: np.random.Generator, steps: int = KMEANS_STEPS) -> Index:
    """Spherical k-means (k-means++ seeding); returns each row's cluster."""
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = np.clip(1.0 - (x @ np.array(centres).T).max(axis=1), 0.0, None)
        weights = distance / distance.sum() if distance.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=weights)])
    c = np.array(centres)
    assignment = np.zeros(len(x), dtype=np.int64)
    for _ in range(steps):
        assignment = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            if (assignment == j).any():
                c[j] = _unit(x[assignment == j].mean(axis=0))
    return assignment


def typicality(x: Array, neighbours: int = TYPICALITY_NEIGHBOURS) -> Array:
    """Inverse mean cosine distance to the nearest neighbours (TypiClust's density)."""
    if len(x) == 1:
        return np.ones(1)
    distance = 1.0 - x @ x.T
    np.fill_diagonal(distance, np.inf)
    k = min(neighbours, len(x) - 1)
    nearest = np.partition(distance, k - 1, axis=1)[:, :k]
    return np.asarray(1.0 / (nearest.mean(axis=1) + 1e-6), dtype=np.float64)


def likely_label_errors(probs: Array, labels: Index) -> Array:
    """A score per annotated item, higher = more likely mislabelled: how much more the head
    believes its best other label than the annotated one (confident-learning style)."""
    rows = np.arange(len(labels))
    given = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    return np.asarray(others.max(axis=1) - given, dtype=np.float64)


def _unit(vector: Array) -> Array:
    return np.asarray(vector / max(float(np.linalg.norm(vector)), 1e-12), dtype=np.float64)
