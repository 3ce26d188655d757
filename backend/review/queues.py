"""A project's predicted tasks → what a human should look at next.

- **Selection** (for labelling): rank unlabelled tasks by a strategy of selection.py over their
  cached image embeddings and the current head's probabilities.
- **Review queues** (for checking):
  - `label_error`: annotated tasks whose annotated label scores low while another scores high,
    judged by held-out probabilities (each task scored by a head fitted without it);
  - `disagreement`: annotated tasks where the current head's top label is not the annotator's;
  - `abstained`: unannotated tasks whose confidence is below the threshold that reaches the
    target precision on annotated tasks (those a human must check before accepting).
Rows carry the task id, scores and a reason; writers give JSONL or CSV (with the parameters in a
header line) and a Label Studio import (tasks with the scores as data fields to sort by).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..adapt.adapter import score
from ..adapt.examples import (
    cached_embeddings,
    embedding_key_of,
    label_index,
    target_row,
    unusable,
)
from ..adapt.fit import MIN_EXAMPLES, Examples, adapt, normalise_rows
from ..errors import ReviewError
from ..formats import columns_of, comment_line, csv_chunks, jsonl_chunks, labelstudio_chunks
from ..labelstudio.label_config import LabelSpace
from ..store import Record, Store
from ..zeroshot.scoring import ZeroShotHead
from ..zeroshot.uncertainty import measures
from .selection import likely_label_errors, select

Array = npt.NDArray[np.float64]
Row = dict[str, Any]
FORMATS = ("jsonl", "csv", "labelstudio")
MIN_FOR_PRECISION_THRESHOLD = 20


@dataclass(frozen=True)
class ProjectView:
    """The predicted tasks of one control: ids, images, embeddings and annotations."""

    space: LabelSpace
    tasks: list[str]
    refs: list[str]
    vectors: Array  # (N, D)
    annotated: dict[int, Array]  # position → (L,) 0/1 labels of the task's latest annotation

    def names(self, row: Array) -> list[str]:
        return [self.space.labels[i].path[-1] for i in np.flatnonzero(row)]


def project_view(store: Store, project: str, space: LabelSpace, model: str) -> ProjectView:
    """The embeddings are read in one `store.embeddings` call, not one per predicted task."""
    known: list[tuple[Record, dict[str, Any], str]] = []  # (record, its control, key)
    for record in store.predictions(project):
        control = record.get("controls", {}).get(space.name) or {}
        key = embedding_key_of(store, control, model)
        if key:
            known.append((record, control, key))
    stored = cached_embeddings(store, [key for *_, key in known])
    tasks, refs, vectors = [], [], []
    for record, control, key in known:
        vector = stored.get(key)
        if vector is not None:
            tasks.append(str(record["task"]))
            refs.append(str(control.get("image_ref") or ""))
            vectors.append(vector)
    if not vectors:
        raise ReviewError(f"project {project} has no predicted tasks with cached embeddings for "
                          f"control {space.name!r}: run Retrieve predictions first")
    position = {task: i for i, task in enumerate(tasks)}
    annotated: dict[int, Array] = {}
    index = label_index(space)
    for record in store.corrections(project):
        control = record.get("controls", {}).get(space.name)
        where = position.get(str(record["task"]))
        if where is None or unusable(record, control) is not None:
            continue
        assert control is not None
        row = target_row(space, control["final"], index)
        if row is not None:
            annotated[where] = row
    stacked = normalise_rows(np.stack(vectors).astype(np.float64))
    return ProjectView(space, tasks, refs, stacked, annotated)


# --- selection ---------------------------------------------------------------------------------
def selection(view: ProjectView, probs: Array, strategy: str, budget: int, seed: int = 0,
              uncertainty: str = "margin", random_fraction: float = 0.1
              ) -> tuple[list[Row], dict[str, Any]]:
    labelled = np.array(sorted(view.annotated), dtype=np.int64)
    try:
        pick = select(strategy, budget, view.vectors, probs, labelled=labelled, seed=seed,
                      uncertainty=uncertainty, random_fraction=random_fraction)
    except ValueError as exc:
        raise ReviewError(str(exc)) from None
    measured = measures(probs, view.space.multiple)
    count = len(pick.index)
    rows = [_row(view, probs, measured, int(i), rank=rank + 1, priority=count - rank,
                 reason=reason) for rank, (i, reason) in enumerate(zip(pick.index, pick.reasons))]
    return rows, {**pick.params, "control": view.space.name, "candidates": len(view.tasks)}


# --- review queues -----------------------------------------------------------------------------
def review(view: ProjectView, probs: Array, head: ZeroShotHead, target_precision: float = 0.95
           ) -> tuple[list[Row], dict[str, Any]]:
    if view.space.multiple:
        raise ReviewError("review queues support single-choice controls so far; "
                          f"{view.space.name!r} allows several labels")
    measured = measures(probs, False)
    confidence = probs.max(axis=1)
    annotated = np.array(sorted(view.annotated), dtype=np.int64)
    truth = np.array([int(view.annotated[i].argmax()) for i in annotated], dtype=np.int64)
    rows: list[Row] = []
    held_out = _held_out_probabilities(view, head, annotated, truth)
    errors = likely_label_errors(held_out, truth) if len(annotated) else np.zeros(0)
    for i, suspicion in sorted(zip(annotated, errors), key=lambda pair: -pair[1]):
        if suspicion > 0:
            rows.append(_row(view, probs, measured, int(i), queue="label_error",
                             priority=float(suspicion), reason="another label scores higher than "
                             "the annotated one under a head that never saw this annotation"))
    disagree = [int(i) for i, t in zip(annotated, truth) if probs[i].argmax() != t]
    for i in sorted(disagree, key=lambda i: -confidence[i]):
        rows.append(_row(view, probs, measured, i, queue="disagreement",
                         priority=float(confidence[i]), reason="the model's top label differs "
                         "from the annotator's"))
    threshold = _threshold_for_precision(confidence[annotated], probs[annotated].argmax(axis=1)
                                         == truth, target_precision)
    cut = threshold if threshold is not None else view.space.threshold
    unlabelled = [i for i in range(len(view.tasks)) if i not in view.annotated]
    if cut is not None:
        for i in sorted((i for i in unlabelled if confidence[i] < cut),
                        key=lambda i: confidence[i]):
            rows.append(_row(view, probs, measured, i, queue="abstained",
                             priority=float(1 - confidence[i]),
                             reason=f"confidence below {cut:.3f}"))
    params = {"control": view.space.name, "target_precision": target_precision,
              "confidence_threshold": cut, "annotated": len(annotated),
              "threshold_from": "annotations" if threshold is not None else
              "model_score_threshold" if cut is not None else
              f"none (needs {MIN_FOR_PRECISION_THRESHOLD} annotations)"}
    return rows, params


def _held_out_probabilities(view: ProjectView, head: ZeroShotHead, annotated: npt.NDArray[np.int64],
                            truth: npt.NDArray[np.int64]) -> Array:
    """Probabilities of the annotated items from heads fitted without them (zero-shot when
    there are too few to fit anything)."""
    if len(annotated) < MIN_EXAMPLES:
        return score(head, view.vectors[annotated]).probs
    examples = Examples(view.vectors[annotated], np.eye(len(view.space.labels))[truth],
                        np.zeros(len(annotated)))
    fit = adapt(head, examples, multiple=False)
    assert fit.held_out_probs is not None
    return fit.held_out_probs


def _threshold_for_precision(confidence: Array, correct: npt.NDArray[np.bool_],
                             target: float) -> float | None:
    """The lowest confidence above which annotated predictions are right often enough."""
    if len(confidence) < MIN_FOR_PRECISION_THRESHOLD:
        return None
    order = np.argsort(-confidence, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    reaching = np.flatnonzero(precision >= target)
    if len(reaching) == 0:
        return 1.0  # never precise enough: everything needs a human
    return float(confidence[order][reaching[-1]])


def _row(view: ProjectView, probs: Array, measured: dict[str, Array], i: int,
         **fields: Any) -> Row:
    top = int(probs[i].argmax())
    return {"task": view.tasks[i], **fields,
            "predicted": view.space.labels[top].path[-1],
            "confidence": round(float(probs[i, top]), 6),
            **{name: round(float(values[i]), 6) for name, values in measured.items()},
            "annotated": view.names(view.annotated[i]) if i in view.annotated else None,
            "image": view.refs[i]}


# --- writers -----------------------------------------------------------------------------------
def write(rows: list[Row], params: dict[str, Any], fmt: str, kind: str,
          data_key: str) -> Iterator[bytes]:
    """The rows as `fmt`; the header (strategy and parameters) goes first in JSONL and CSV."""
    if fmt not in FORMATS:
        raise ReviewError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    header = {"export": kind, **params}
    if fmt == "jsonl":
        return jsonl_chunks([{"header": header}, *rows])
    if fmt == "csv":
        table = csv_chunks(rows, columns_of(rows)) if rows else iter(())
        return itertools.chain([f"{comment_line(header)}\n".encode()], table)
    return labelstudio_chunks(_label_studio_tasks(rows, header, data_key))


def _label_studio_tasks(rows: list[Row], header: dict[str, Any], data_key: str) -> list[Record]:
    """Tasks to import into Label Studio: the image plus `al_*` fields the Data Manager can
    show, filter and sort by; `al_source_task` names the task they were computed for."""
    tasks = []
    for row in rows:
        data = {data_key: row["image"], "al_source_task": int(row["task"]) if
                str(row["task"]).isdigit() else row["task"],
                "al_priority": row["priority"],
                "al_reason": row.get("reason"), "al_queue": row.get("queue", header["export"]),
                "al_predicted": row["predicted"], "al_confidence": row["confidence"],
                "al_strategy": json.dumps(header, sort_keys=True)}
        if "rank" in row:
            data["al_rank"] = row["rank"]
        tasks.append({"data": data})
    return tasks


