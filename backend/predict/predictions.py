"""Per-label probabilities → Label Studio prediction JSON.

Decisions per control (thresholds are the control's `model_score_threshold`):
- single choice: the top label; below the threshold the control is left empty (abstain);
- multiple choice: every label scoring at least the threshold — or, without one, at least half
  the top label's score (a scale-free default for both softmax and sigmoid scores);
- taxonomy: the top leaf; below the threshold, the deepest ancestor whose summed (softmax) or
  best (sigmoid) score clears it, unless `leafsOnly="true"`; `maxUsages` > 1 selects several.

Scores: a region's `score` is the chosen label's probability (the weakest chosen one for
multi-label); the prediction's `score` is the weakest control's, so sorting by it surfaces the
tasks that most need a human. Each region keeps the `top_k` alternatives with probabilities.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..labelstudio.label_config import LabelSpace, Scoring
from ..zeroshot.scoring import Probs

RELATIVE_MULTI_THRESHOLD = 0.5
"""Without a threshold, multi-label keeps labels scoring ≥ this fraction of the top score."""


@dataclass(frozen=True)
class ControlOutcome:
    region: dict[str, Any] | None
    score: float


def decide(space: LabelSpace, probs: Probs, scoring: Scoring, top_k: int,
           region_id: str, thresholds: Probs | None = None) -> ControlOutcome:
    """Turn one control's (L,) probabilities into a region (or None) and its confidence.

    `thresholds`: per-label multi-label thresholds learnt from corrections; a threshold
    written in the label config wins over them."""
    order = np.argsort(-probs, kind="stable")
    if space.multiple:
        chosen = _multi(space, probs, order, thresholds)
        score = float(min(probs[chosen])) if chosen else float(probs[order[0]])
        paths = [space.labels[i].path for i in chosen]
    else:
        paths, score = _single(space, probs, order, scoring)
    alternatives = [_alternative(space, int(i), probs) for i in order[:top_k]]
    if not paths:
        return ControlOutcome(None, _clip(score))
    region = {
        "id": region_id,
        "from_name": space.name,
        "to_name": space.to_name,
        "type": space.kind,
        "value": _value(space, paths),
        "score": _clip(score),
        "top_k": alternatives,
    }
    return ControlOutcome(region, _clip(score))


def _single(space: LabelSpace, probs: Probs, order: np.ndarray[Any, np.dtype[np.intp]],
            scoring: Scoring) -> tuple[list[tuple[str, ...]], float]:
    best = int(order[0])
    score = float(probs[best])
    if space.threshold is None or score >= space.threshold:
        return [space.labels[best].path], score
    if not space.leafs_only:
        backed_off = _back_off(space, probs, space.labels[best].path, scoring)
        if backed_off is not None:
            return [backed_off[0]], backed_off[1]
    return [], score


def _back_off(space: LabelSpace, probs: Probs, path: tuple[str, ...],
              scoring: Scoring) -> tuple[tuple[str, ...], float] | None:
    """Deepest ancestor of `path` whose aggregated score clears the threshold.

    Softmax scores of exclusive leaves add up; independent sigmoid scores do not, so the
    ancestor is as likely as its best leaf."""
    assert space.threshold is not None
    for depth in range(len(path) - 1, 0, -1):
        prefix = path[:depth]
        under = [p for p, label in zip(probs, space.labels) if label.path[:depth] == prefix]
        total = float(sum(under)) if scoring == "softmax" else float(max(under))
        if total >= space.threshold:
            return prefix, min(total, 1.0)
    return None


def _multi(space: LabelSpace, probs: Probs, order: np.ndarray[Any, np.dtype[np.intp]],
           thresholds: Probs | None) -> list[int]:
    top = float(probs[order[0]])
    cuts: Probs
    if space.threshold is not None:
        cuts = np.full(len(probs), space.threshold)
    elif thresholds is not None:
        cuts = thresholds
    else:
        cuts = np.full(len(probs), RELATIVE_MULTI_THRESHOLD * top)
    chosen = [int(i) for i in order if probs[i] >= cuts[i]]
    return chosen[: space.max_labels] if space.max_labels else chosen


def _value(space: LabelSpace, paths: list[tuple[str, ...]]) -> dict[str, Any]:
    if space.kind == "taxonomy":
        return {"taxonomy": [list(path) for path in paths]}
    return {"choices": [path[-1] for path in paths]}


def _alternative(space: LabelSpace, index: int, probs: Probs) -> dict[str, Any]:
    path = space.labels[index].path
    label: Any = list(path) if space.kind == "taxonomy" else path[-1]
    return {"label": label, "score": _clip(float(probs[index]))}


def _clip(score: float) -> float:
    return round(min(max(score, 0.0), 1.0), 6)


def region_id(task_id: Any, control: str, model_version: str) -> str:
    """Deterministic region id: the same task, control and model give the same id."""
    return hashlib.sha1(f"{task_id}|{control}|{model_version}".encode()).hexdigest()[:10]


def task_prediction(outcomes: list[ControlOutcome], model_version: str) -> dict[str, Any]:
    regions = [outcome.region for outcome in outcomes if outcome.region is not None]
    score = min((outcome.score for outcome in outcomes), default=0.0)
    return {"model_version": model_version, "score": score, "result": regions}


def empty_prediction(model_version: str, reason: str) -> dict[str, Any]:
    """Placeholder for a task that failed: keeps results aligned with tasks (LS needs that).

    It has no `result` key on purpose: Label Studio stores a prediction with `"result": []`
    (and would never ask again), but skips one without `result`, so the task is retried the
    next time predictions are requested."""
    return {"model_version": model_version, "error": reason}
