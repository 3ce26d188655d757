"""Log entries → correction records, and applying an entry to the store.

A correction record is the current state of one annotation compared with what was predicted:
per control, `final` labels, `predicted` labels (if any) and a status —
`accepted` (unchanged), `changed`, `added` (nothing was predicted), `removed` (the annotator
cleared a predicted control) or `skipped` (the annotation was cancelled).

`apply(store, entry)` is the one way an entry reaches the store (the journal, its spool replay
and the dead-letter replay), and `apply_predictions(store, entries)` the same for a run of
`prediction` entries in one store transaction (the journal, for what one /predict proposed):
the store makes each write atomic and idempotent, this module decides what the record holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from ..store import Record, Store
from ..store.entry import Entry

Labels = list[Any]  # choice values (str) or taxonomy paths (list[str])


def apply(store: Store, entry: Entry) -> bool:
    """Apply one log entry; False if its key was applied before (idempotent)."""
    if entry.kind == "prediction":
        return store.put_prediction(entry)
    if entry.kind == "deletion":
        return store.commit_deletion(entry, entry.data["annotations"])
    record = build_correction(entry, store.prediction(entry.project, entry.data["task"]))
    return store.commit_annotation(entry, record, timestamp(entry.data["updated_at"]))


def apply_predictions(store: Store, entries: Sequence[Entry]) -> list[bool]:
    """Apply `prediction` entries, in order, in one store transaction."""
    assert all(entry.kind == "prediction" for entry in entries)
    return store.put_predictions(entries)


def runs(entries: Sequence[Entry]) -> Iterator[Sequence[Entry]]:
    """`entries` in order, cut into runs: consecutive `prediction` entries together (one store
    transaction for them all), any other entry alone (its own atomic commit)."""
    start = 0
    while start < len(entries):
        end = start + 1
        if entries[start].kind == "prediction":
            while end < len(entries) and entries[end].kind == "prediction":
                end += 1
        yield entries[start:end]
        start = end


def build_correction(entry: Entry, prediction: dict[str, Any] | None) -> dict[str, Any]:
    """The current record of an annotation, compared with what was predicted for its task."""
    data = entry.data
    predicted = _predicted_controls(data["prediction_snapshot"], prediction)
    snapshot_version = data["prediction_snapshot"].get("model_version")
    final = {region["from_name"]: (region_labels(region), region.get("type"))
             for region in data["result"] if isinstance(region, dict) and "from_name" in region}
    controls = {}
    for name in dict.fromkeys([*predicted, *final]):
        labels, kind = final.get(name, ([], None))
        shown = predicted.get(name)
        guess = None if shown is not None and shown.get("abstained") else shown
        if guess is None and not labels and name not in final:
            continue  # the model abstained and the annotator left it empty: nothing happened
        image_ref = data["images"].get(name) or (shown or {}).get("image_ref")
        same_image = (shown or {}).get("image_ref") == image_ref
        controls[name] = {
            "final": labels,
            "predicted": guess["labels"] if guess else None,
            "status": _status(data["was_cancelled"], guess, labels),
            "type": kind or (guess or {}).get("type"),
            "predicted_score": (guess or {}).get("score"),
            "top_k": (guess or {}).get("top_k", []),
            "image_ref": image_ref,
            # the key of the image as it was predicted: only if the task still shows it
            "embedding_key": (shown or {}).get("embedding_key") if same_image else None,
        }
    return {
        "project": entry.project, "task": data["task"], "annotation": data["annotation"],
        "annotator": data["annotator"], "ground_truth": data["ground_truth"],
        "was_cancelled": data["was_cancelled"], "lead_time": data["lead_time"],
        "created_at": data["created_at"], "updated_at": data["updated_at"],
        "received_at": entry.received_at,
        "model_version": _version(snapshot_version if data["prediction_snapshot"]["result"]
                                  else None, prediction),
        "status": _overall(data["was_cancelled"], controls), "controls": controls,
        "deleted_at": None,
    }


def _predicted_controls(snapshot: dict[str, Any],
                        prediction: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """What the annotator was shown: Label Studio's snapshot of the prediction when it kept one
    (a later re-prediction may differ), else our log of the latest proposal. Our log still
    supplies the image reference and embedding key."""
    controls = {name: dict(control)
                for name, control in (prediction or {}).get("controls", {}).items()}
    for region in snapshot.get("result", []):
        if isinstance(region, dict) and "from_name" in region:
            shown = controls.setdefault(region["from_name"], {})
            shown.update(labels=region_labels(region), score=region.get("score"),
                         top_k=region.get("top_k", []), type=region.get("type"), abstained=False)
    return controls


def _version(snapshot_version: Any, prediction: dict[str, Any] | None) -> str | None:
    version = snapshot_version or (prediction or {}).get("model_version")
    return str(version) if version else None


def _status(cancelled: bool, guess: dict[str, Any] | None, final: Labels) -> str:
    if cancelled:
        return "skipped"
    if guess is None:
        return "added"
    if not final:
        return "removed"
    return "accepted" if _same(guess["labels"], final) else "changed"


def _same(a: Labels, b: Labels) -> bool:
    def canon(labels: Labels) -> set[str]:
        return {json.dumps(label, ensure_ascii=False) for label in labels}
    return canon(a) == canon(b)


def _overall(cancelled: bool, controls: dict[str, dict[str, Any]]) -> str:
    statuses = {control["status"] for control in controls.values()}
    if cancelled:
        return "skipped"
    if not statuses or statuses == {"added"}:
        return "added"
    return "accepted" if statuses == {"accepted"} else "changed"


def timestamp(value: Any) -> float:
    """Label Studio's ISO timestamps as seconds since the epoch (0.0 when absent)."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def updated_ts(record: Record) -> float:
    """When a correction record was last saved: Label Studio's `updated_at`, else when the
    backend received it (epoch seconds)."""
    return timestamp(record.get("updated_at")) or float(record.get("received_at") or 0.0)


def region_labels(region: dict[str, Any]) -> Labels:
    """The labels of one result region: choice values, or taxonomy paths."""
    value = region.get("value")
    if not isinstance(value, dict):
        return []
    kind = region.get("type")
    labels = value.get("taxonomy") if kind == "taxonomy" else value.get("choices")
    return list(labels) if isinstance(labels, list) else []
