"""Label Studio events and /predict results → entries of the corrections log.

An `Entry` (store/entry.py) is the unit the store logs and the spool keeps: small, JSON-safe,
with an idempotency `key` so a webhook delivered twice (or replayed from the spool after an
ambiguous failure) is applied once. Three kinds:

- `prediction`: what `/predict` proposed for a task, per control;
- `annotation`: one annotation as created or updated (bulk creates are split per annotation);
- `deletion`: annotation ids Label Studio deleted (`ANNOTATIONS_DELETED` carries ids only).

`check_entry` refuses, before anything is recorded, an entry the store could not apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from ..errors import InvalidEvent, LabelConfigError
from ..labelstudio.client import project_key
from ..labelstudio.label_config import parse_label_config
from ..store.entry import Entry
from .records import build_correction, region_labels

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETION_ACTION = "ANNOTATIONS_DELETED"
_MALFORMED = (TypeError, KeyError, ValueError, AttributeError, RecursionError)
"""What reading or applying a malformed event raises."""
_AS_LABEL_STUDIO_DOES = ("fix what sends it: Label Studio sends each annotation's `result` as a "
                         "list of regions, each naming its control in `from_name`")


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- webhook → entries ---------------------------------------------------------------------
def entries_from_webhook(event: dict[str, Any]) -> list[Entry]:
    """Entries of the corrections log in a Label Studio webhook (none for other events).
    Raises InvalidEvent, before anything is recorded, if one of them could not be applied."""
    try:
        entries = _entries(event)
    except _MALFORMED as exc:
        raise InvalidEvent(f"the event cannot be read ({type(exc).__name__}: {exc}); "
                           f"{_AS_LABEL_STUDIO_DOES}") from None
    for entry in entries:
        check_entry(entry)
    return entries


def _entries(event: dict[str, Any]) -> list[Entry]:
    action = event.get("action")
    project = project_key(event.get("project"))
    if project is None:
        return []
    if action == DELETION_ACTION:
        return _deletion(event, project)
    if action not in ANNOTATION_ACTIONS:
        return []
    annotations = _as_list(event.get("annotation"))
    tasks = {t.get("id"): t for t in _as_list(event.get("task")) if isinstance(t, dict)}
    images = _image_fields(event.get("project"))
    return [_annotation(action, project, a, tasks.get(a.get("task")), images)
            for a in annotations if isinstance(a, dict) and a.get("id") is not None]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value is not None else []


def _image_fields(project: Any) -> dict[str, str]:
    """Control name → task data field of its image, from the project's label config."""
    config = project.get("label_config") if isinstance(project, dict) else None
    if not isinstance(config, str):
        return {}
    try:
        return {space.name: space.data_key for space in parse_label_config(config).spaces}
    except LabelConfigError:
        return {}


def _annotation(action: str, project: str, annotation: dict[str, Any],
                task: dict[str, Any] | None, images: dict[str, str]) -> Entry:
    data = task.get("data") if isinstance(task, dict) else None
    refs = {name: data.get(key) for name, key in images.items()} if isinstance(data, dict) else {}
    snapshot = annotation.get("prediction")
    snapshot = snapshot if isinstance(snapshot, dict) else {}
    fields: dict[str, Any] = {
        "action": action,
        "annotation": str(annotation["id"]),
        "task": str(annotation.get("task") or (task or {}).get("id") or ""),
        "annotator": annotation.get("completed_by"),
        "was_cancelled": bool(annotation.get("was_cancelled")),
        "ground_truth": bool(annotation.get("ground_truth")),
        "lead_time": annotation.get("lead_time"),
        "created_at": annotation.get("created_at"),
        "updated_at": annotation.get("updated_at"),
        "result": annotation.get("result") if isinstance(annotation.get("result"), list) else [],
        "prediction_snapshot": {"result": snapshot.get("result") or [],
                                "model_version": snapshot.get("model_version")},
        "images": {name: ref for name, ref in refs.items() if isinstance(ref, str)},
    }
    key = _digest(fields["annotation"], fields["updated_at"], fields["was_cancelled"],
                  fields["result"], fields["ground_truth"])
    return Entry("annotation", key, project, fields)


def _deletion(event: dict[str, Any], project: str) -> list[Entry]:
    ids = sorted({str(a["id"]) for a in _as_list(event.get("annotations"))
                  if isinstance(a, dict) and a.get("id") is not None})
    if not ids:
        return []
    return [Entry("deletion", _digest("deleted", ids), project, {"annotations": ids})]


def check_entry(entry: Entry) -> None:
    """Raise InvalidEvent unless the store can apply `entry`: it is checked with the very code
    that applies it, so an acknowledged entry never fails later (in the spool's replay)."""
    what = f"annotation {entry.data.get('annotation')}" if entry.kind == "annotation" else \
        f"the {entry.kind} entry"
    try:
        if entry.kind == "annotation":
            _check_regions(entry.data["result"], "result")
            _check_regions(entry.data["prediction_snapshot"]["result"], "prediction.result")
            build_correction(entry, None)
        entry.to_json()
    except InvalidEvent as exc:
        raise InvalidEvent(f"{what}: {exc}") from None
    except _MALFORMED as exc:
        raise InvalidEvent(f"{what} cannot be recorded ({type(exc).__name__}: {exc}); "
                           f"{_AS_LABEL_STUDIO_DOES}") from None


def _check_regions(regions: Any, where: str) -> None:
    if not isinstance(regions, list):
        raise InvalidEvent(f"{where} is a {type(regions).__name__}, expected a list of regions")
    for number, region in enumerate(regions):
        name = region.get("from_name") if isinstance(region, dict) else None
        if name is not None and not isinstance(name, str):
            raise InvalidEvent(f"{where}[{number}].from_name is a {type(name).__name__}, "
                               "expected the name of a control in the label config (a string)")


# --- /predict → entries --------------------------------------------------------------------
def prediction_entry(project: str, task_id: Any, prediction: dict[str, Any],
                     images: dict[str, dict[str, Any]]) -> Entry:
    """What was proposed for one task. `images`: control → {image_ref, embedding_key,
    uncertainty}."""
    controls: dict[str, Any] = {}
    for region in prediction.get("result", []):
        name = region["from_name"]
        controls[name] = {"labels": region_labels(region), "score": region.get("score"),
                          "top_k": region.get("top_k", []), "type": region.get("type"),
                          **images.get(name, {})}
    for name, image in images.items():  # the model abstained: keep the image and how unsure
        controls.setdefault(name, {"labels": [], "score": None, "top_k": [], "type": None,
                                   "abstained": True, **image})
    data = {"task": str(task_id), "model_version": prediction.get("model_version"),
            "score": prediction.get("score"), "controls": controls,
            "predicted_at": time.time()}
    return Entry("prediction", _digest("prediction", project, task_id, data), project, data)
