"""The corrections log → training examples for one control: usable corrections, their labels as
0/1 rows and their cached image embeddings (the images are never fetched or encoded again).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..corrections.records import updated_ts
from ..labelstudio.label_config import LabelSpace
from ..store import Record, Store, Vector, model_embedding_key
from .fit import Examples, normalise_rows


def collect_examples(store: Store, records: list[Record], space: LabelSpace,
                     model: str) -> tuple[Examples | None, dict[str, int]]:
    """The control's usable corrections (of a project's correction `records`) with their
    cached image embeddings, and counts of what was left out and why. The embeddings are read
    in one `store.embeddings` call, not one round trip per record."""
    index = label_index(space)
    judged: list[tuple[Record, str | None, np.ndarray[Any, Any] | None, str | None]] = []
    for record in records:
        control = record.get("controls", {}).get(space.name)
        why = unusable(record, control)
        row = key = None
        if why is None:
            assert control is not None
            row = target_row(space, control["final"], index)
            why = ("label not in the config" if row is None else
                   "several labels on a single-choice control" if row.sum() > 1
                   and not space.multiple else None)
            if why is None:
                key = embedding_key_of(store, control, model)
        judged.append((record, why, row, key))
    stored = cached_embeddings(store, [key for *_, key in judged if key])
    vectors: list[np.ndarray[Any, Any]] = []
    targets, updated = [], []
    skipped: dict[str, int] = {}
    for record, why, row, key in judged:
        found = stored.get(key) if key else None
        if why is None and found is None:
            why = "no cached embedding"
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


def label_index(space: LabelSpace) -> dict[str, int]:
    """Each label's position in the control, by the key `target_row` looks labels up with:
    built once per control, not once per record."""
    return {_label_key(label.path, space): i for i, label in enumerate(space.labels)}


def target_row(space: LabelSpace, final: list[Any],
               index: dict[str, int] | None = None) -> np.ndarray[Any, Any] | None:
    """The annotator's labels (choice values or taxonomy paths) as an (L,) 0/1 row; None if
    one of them is not a label of the control (the config changed since). `index`: the
    control's `label_index`, when the caller has it."""
    if index is None:
        index = label_index(space)
    wanted = [index.get(_label_key(label, space)) for label in final]
    if None in wanted:
        return None
    row = np.zeros(len(space.labels))
    row[[i for i in wanted if i is not None]] = 1.0
    return row


def _label_key(label: Any, space: LabelSpace) -> str:
    path = label if isinstance(label, (list, tuple)) else [label]
    return json.dumps(list(path) if space.kind == "taxonomy" else [path[-1]], ensure_ascii=False)


def embedding_key_of(store: Store, control: dict[str, Any], model: str) -> str | None:
    """The key of the embedding by `model` of a logged control's image, if one is known."""
    return model_embedding_key(store, control.get("embedding_key"), control.get("image_ref"),
                               model)


def cached_embeddings(store: Store, keys: list[str]) -> dict[str, Vector]:
    """The stored embeddings of these keys (those not stored left out): one `store.embeddings`
    call for them all, none when there are no keys."""
    return store.embeddings(keys) if keys else {}
