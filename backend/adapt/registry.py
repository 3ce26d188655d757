"""Adapted heads as stored documents: versioned per project, listed, activated, rolled back.

A head record is JSON: its id (`h1`, `h2`, … per project), when and why it was fitted, the
model it belongs to, and per control the adapter (arrays as base64 float32), the label names,
the fingerprint of the control it was fitted for, and the held-out evidence (`before`,
`zero_shot`, `after`, `candidate`, learning curve, reliability bins, per-label precision and
recall). A head only applies to the exact control it was fitted for: change the labels or the
prompts and that control serves zero-shot until the next fit.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any, NewType

import numpy as np

from ..errors import HeadNotFound
from ..labelstudio.label_config import LabelSpace
from ..store import ZERO_SHOT, Record, Store
from .adapter import Adapter
from .calibration import Platt

HeadId = NewType("HeadId", str)
"""A stored adapted head's id within its project: `h1`, `h2`, …"""
ACTIVE_CACHE_S = 2.0
"""How long a process trusts its copy of a project's active head before asking the store."""


def space_digest(space: LabelSpace) -> str:
    return hashlib.sha256(space.fingerprint().encode()).hexdigest()[:16]


def encode_array(array: np.ndarray[Any, Any] | None) -> dict[str, Any] | None:
    if array is None:
        return None
    data = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(data.shape), "float32": base64.b64encode(data.tobytes()).decode()}


def decode_array(value: dict[str, Any] | None) -> np.ndarray[Any, Any] | None:
    if value is None:
        return None
    data = np.frombuffer(base64.b64decode(value["float32"]), dtype=np.float32)
    return data.reshape(value["shape"]).astype(np.float64)


def adapter_document(adapter: Adapter) -> dict[str, Any]:
    return {
        "method": adapter.method, "params": adapter.params,
        "temperature": adapter.temperature,
        "residual": encode_array(adapter.residual), "bias": encode_array(adapter.bias),
        "platt_a": encode_array(adapter.platt.a if adapter.platt else None),
        "platt_b": encode_array(adapter.platt.b if adapter.platt else None),
        "thresholds": encode_array(adapter.thresholds),
    }


def adapter_from_document(doc: dict[str, Any]) -> Adapter:
    a, b = decode_array(doc.get("platt_a")), decode_array(doc.get("platt_b"))
    return Adapter(doc["method"], decode_array(doc.get("residual")), decode_array(doc.get("bias")),
                   float(doc.get("temperature", 1.0)),
                   Platt(a, b) if a is not None and b is not None else None,
                   decode_array(doc.get("thresholds")), dict(doc.get("params") or {}))


def summary(record: Record, active: str | None) -> Record:
    """A head record without its arrays, for listings."""
    controls = {name: {**{k: v for k, v in control.items() if k != "adapter"},
                       "method": control["adapter"]["method"]}
                for name, control in record.get("controls", {}).items()}
    return {**{k: v for k, v in record.items() if k != "controls"}, "controls": controls,
            "active": record.get("id") == active}


@dataclass(frozen=True)
class ServedHead:
    """What a project serves: a head id (or None for zero-shot) and its adapters by control."""

    id: HeadId | None
    adapters: dict[str, tuple[str, Adapter]]  # control → (space digest, adapter)
    fitted_until: float | None = None  # corrections saved after this were never seen by it

    def adapter_for(self, space: LabelSpace) -> Adapter | None:
        found = self.adapters.get(space.name)
        if found is None or found[0] != space_digest(space):
            return None
        return found[1]


ZERO_SHOT_SERVED = ServedHead(None, {})


class HeadRegistry:
    """Reads and switches a project's active head; caches it briefly per process."""

    def __init__(self, store: Store, model: str) -> None:
        self.store = store
        self.model = model
        self._cache: dict[str, tuple[float, ServedHead]] = {}

    def active(self, project: str | None) -> ServedHead:
        if project is None:
            return ZERO_SHOT_SERVED
        cached = self._cache.get(project)
        if cached and time.monotonic() - cached[0] < ACTIVE_CACHE_S:
            return cached[1]
        served = self._load_active(project)
        self._cache[project] = (time.monotonic(), served)
        return served

    def last_known(self, project: str | None) -> ServedHead:
        """The head last read for a project, however old (when the store is unreachable)."""
        cached = self._cache.get(project or "")
        return cached[1] if cached else ZERO_SHOT_SERVED

    def _load_active(self, project: str) -> ServedHead:
        return self.load(project, self.store.active_head(project))

    def load(self, project: str, head_id: str | None) -> ServedHead:
        """A stored head (whether active or not); zero-shot for None or ZERO_SHOT."""
        if head_id in (None, ZERO_SHOT):
            return ZERO_SHOT_SERVED
        record = next((r for r in self.store.heads(project) if r["id"] == head_id), None)
        if record is None or record.get("model") != self.model:
            return ZERO_SHOT_SERVED  # fitted on another model's embeddings: not applicable
        adapters = {name: (control["space"], adapter_from_document(control["adapter"]))
                    for name, control in record["controls"].items()}
        return ServedHead(HeadId(head_id), adapters, record.get("fitted_until"))

    def publish(self, project: str, record: Record) -> HeadId:
        """Store a new head and make it the project's active one."""
        head_id = HeadId(self.store.put_head(project, record))
        self.store.set_active_head(project, head_id)
        self._cache.pop(project, None)
        return head_id

    def activate(self, project: str, head_id: str) -> None:
        """Roll a project forward or back to a stored head, or to `zero-shot`."""
        if head_id != ZERO_SHOT and head_id not in {r["id"] for r in self.store.heads(project)}:
            raise HeadNotFound(f"project {project} has no head {head_id!r}; "
                               f"GET /heads?project={project} lists them")
        self.store.set_active_head(project, head_id)
        self._cache.pop(project, None)

    def listing(self, project: str) -> list[Record]:
        active = self.store.active_head(project)
        return [summary(record, active) for record in self.store.heads(project)]
