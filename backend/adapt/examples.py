"""The corrections log → training examples for one control: usable corrections, their labels as
0/1 rows and their cached image embeddings (the images are never fetched or encoded again).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..corrections.records import updated_ts
from ..labelstudio.label_config import LabelSpace
from ..store import Record, Store, model_embedding_key
from .fit import Examples, normalise_rows


def collect_examples(store: Store, records: list[Record], space: LabelSpace,
                     model: str) -> tuple[Examples | None, dict[str, int]]:
    """The control's usable corrections (of a project's correction `records`) with their
    cached image embeddings, and counts of what was left out and why."""
    vectors: list[np.ndarray[Any, Any]] = []
    targets, updated = [], []
    skipped: dict[str, int] = {}
    for record in records:
        control = record.get("controls", {}).get(space.name)
        why = unusable(record, control)
        if why is None:
            assert control is not None
            row = target_row(space, control["final"])
            found = cached_embedding(store, control, model) if row is not None else None
            why = ("label not in the config" if row is None else
                   "several labels on a single-choice control" if row.sum() > 1
                   and not space.multiple else "no cached embedding" if found is None else None)
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        assert found is not None and row is not None
        vectors.append(found)
        targets.append(row)
        updated.append(updated_ts(record))
    if not vectors:
        return None, skipped
    stacked = normalise_rows(np.stack(vectors).astype(np.float64))
    return Examples(stacked, np.stack(targets), np.asarray(updated, dtype=np.float64)), skipped


def unusable(record: Record, control: dict[str, Any] | None) -> str | None:
    """Why a correction record teaches nothing about a control, or None if it does."""
    if record.get("deleted_at"):
        return "deleted"
    if record.get("was_cancelled"):
        return "skipped by the annotator"
    if control is None or not control.get("final"):
        return "control left empty"
    return None


def target_row(space: LabelSpace, final: list[Any]) -> np.ndarray[Any, Any] | None:
    """The annotator's labels (choice values or taxonomy paths) as an (L,) 0/1 row; None if
    one of them is not a label of the control (the config changed since)."""
    index = {_label_key(label.path, space): i for i, label in enumerate(space.labels)}
    wanted = [index.get(_label_key(label, space)) for label in final]
    if None in wanted:
        return None
    row = np.zeros(len(space.labels))
    row[[i for i in wanted if i is not None]] = 1.0
    return row


def _label_key(label: Any, space: LabelSpace) -> str:
    path = label if isinstance(label, (list, tuple)) else [label]
    return json.dumps(list(path) if space.kind == "taxonomy" else [path[-1]], ensure_ascii=False)


def cached_embedding(store: Store, control: dict[str, Any],
                     model: str) -> np.ndarray[Any, Any] | None:
    """The embedding by `model` of a logged control's image, if the store has it."""
    key = model_embedding_key(store, control.get("embedding_key"), control.get("image_ref"),
                              model)
    return store.get_embedding(key) if key else None
