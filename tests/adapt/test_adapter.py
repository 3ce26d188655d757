"""`adapter.score` gives, to the bit, what predict and review computed before it replaced their
own zero-shot-or-adapter branches (each restated here as it was)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.adapt.adapter import Adapter, score
from backend.adapt.calibration import Platt
from backend.adapt.fit import normalise_rows
from backend.zeroshot.scoring import ZeroShotHead, label_logits, probabilities

from ..support.vectors import unit

LABELS, GROUPS, DIM = 5, 7, 16


def heads() -> list[ZeroShotHead]:
    rng = np.random.default_rng(1)
    groups = torch.from_numpy(unit(rng.normal(size=(GROUPS, DIM)))).float()
    owners = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    mean = torch.from_numpy(unit(rng.normal(size=(LABELS, DIM)))).float()
    return [ZeroShotHead(mean, torch.arange(LABELS), LABELS, "mean", "softmax", 100.0, 0.0),
            ZeroShotHead(groups, owners, LABELS, "max", "softmax", 30.0, 0.0),
            ZeroShotHead(mean, torch.arange(LABELS), LABELS, "mean", "sigmoid", 10.0, -5.0)]


def adapters(scoring: str) -> list[Adapter | None]:
    rng = np.random.default_rng(2)
    residual, bias = rng.normal(size=(LABELS, DIM)), rng.normal(size=LABELS)
    if scoring == "softmax":
        return [None, Adapter("zero-shot", temperature=0.7),
                Adapter("probe", residual, bias, 1.3), Adapter("prototypes", residual, None, 0.9)]
    platt = Platt(rng.uniform(0.5, 2, LABELS), rng.normal(size=LABELS))
    return [None, Adapter("zero-shot"),
            Adapter("zero-shot", platt=platt, thresholds=rng.uniform(0.2, 0.8, LABELS)),
            Adapter("prototypes", residual, bias, platt=platt)]


def cases() -> list[tuple[ZeroShotHead, Adapter | None]]:
    return [(head, adapter) for head in heads() for adapter in adapters(head.scoring)]


def embeddings() -> torch.Tensor:
    """As the encoder gives them: float32, normalised in float32."""
    rows = torch.from_numpy(np.random.default_rng(3).normal(size=(9, DIM))).float()
    return rows / rows.norm(dim=-1, keepdim=True)


def old_predict(head: ZeroShotHead, vector: torch.Tensor,
                adapter: Adapter | None) -> tuple[np.ndarray, np.ndarray | None]:
    if adapter is None:
        return probabilities(head, vector)[0], None
    z0 = label_logits(head, vector.float()).double().numpy()
    return adapter.probabilities(z0, vector.double().numpy(), head.scoring)[0], adapter.thresholds


def old_review(head: ZeroShotHead, vectors: np.ndarray, adapter: Adapter | None) -> np.ndarray:
    if adapter is None:
        return probabilities(head, torch.from_numpy(vectors))
    with torch.no_grad():
        z0 = label_logits(head, torch.from_numpy(vectors.astype(np.float32))).double().numpy()
    return adapter.probabilities(z0, vectors, head.scoring)


@pytest.mark.parametrize(("head", "adapter"), cases())
def test_score_is_the_predict_branch_bit_for_bit(head, adapter):
    for found in embeddings():  # one task's embedding at a time, as predict scores them
        vector = found.unsqueeze(0)
        probs, thresholds = old_predict(head, vector, adapter)
        scored = score(head, vector.numpy(), adapter)
        assert scored.probs.dtype == np.float64 and np.array_equal(scored.probs[0], probs)
        assert scored.thresholds is thresholds


@pytest.mark.parametrize(("head", "adapter"), cases())
def test_score_is_the_review_branch_bit_for_bit(head, adapter):
    vectors = normalise_rows(embeddings().numpy().astype(np.float64))  # as project_view has them
    scored = score(head, vectors, adapter)
    assert np.array_equal(scored.probs, old_review(head, vectors, adapter))
    assert np.array_equal(score(head, vectors[[4, 1]], adapter).probs,
                          old_review(head, vectors[[4, 1]], adapter))
