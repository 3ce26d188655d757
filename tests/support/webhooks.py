"""Label Studio webhook payloads, built from the ones a real Label Studio 1.23.2 sent
(tests/e2e/recorded/), with the ids, labels and flags a test needs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).resolve().parents[1] / "e2e" / "recorded"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
          '<Choice value="Cat"/><Choice value="Dog"/></Choices></View>')


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def project(project_id: int = 4, label_config: str = CONFIG) -> dict[str, Any]:
    body = recorded("webhook_annotation_created")["project"]
    return {**body, "id": project_id, "label_config": label_config}


def choice_result(*labels: str, control: str = "choice") -> list[dict[str, Any]]:
    return [{"from_name": control, "to_name": "image", "type": "choices",
             "value": {"choices": list(labels)}}]


def annotation_event(annotation_id: int, task_id: int, result: list[dict[str, Any]], *,
                     action: str = "ANNOTATION_CREATED", project_id: int = 4,
                     updated_at: str = "2026-11-28T12:07:54.065836Z", image: str | None = None,
                     label_config: str = CONFIG, **fields: Any) -> dict[str, Any]:
    """An ANNOTATION_CREATED / ANNOTATION_UPDATED payload as Label Studio sends it."""
    body = copy.deepcopy(recorded("webhook_annotation_created"))
    body["action"] = action
    body["project"] = project(project_id, label_config)
    annotation = body["annotation"]
    annotation.update(id=annotation_id, task=task_id, project=project_id, result=result,
                      updated_at=updated_at, **fields)
    body["task"].update(id=task_id, project=project_id,
                        data={"image": image or f"/data/upload/{project_id}/{task_id}.png"})
    return body


def bulk_created(events: list[dict[str, Any]]) -> dict[str, Any]:
    """ANNOTATIONS_CREATED: lists of annotations and tasks (e.g. 'create from predictions')."""
    return {"action": "ANNOTATIONS_CREATED", "project": events[0]["project"],
            "annotation": [e["annotation"] for e in events], "task": [e["task"] for e in events]}


def deleted(*annotation_ids: int, project_id: int = 4) -> dict[str, Any]:
    """ANNOTATIONS_DELETED: ids only, no task."""
    body = recorded("webhook_annotations_deleted")
    return {**body, "project": project(project_id),
            "annotations": [{"id": annotation_id} for annotation_id in annotation_ids]}
