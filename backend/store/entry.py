"""`Entry`: one line of the corrections log, as the store logs it and the spool keeps it.

Small and JSON-safe, with an idempotency `key` so a webhook delivered twice (or replayed from
the spool after an ambiguous failure) is applied once. Three kinds:

- `prediction`: what `/predict` proposed for a task, per control;
- `annotation`: one annotation as created or updated (bulk creates are split per annotation);
- `deletion`: annotation ids Label Studio deleted (`ANNOTATIONS_DELETED` carries ids only).

How events become entries, and entries correction records: corrections/entries.py and
corrections/records.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["prediction", "annotation", "deletion"]


@dataclass(frozen=True)
class Entry:
    kind: Kind
    key: str
    project: str
    data: dict[str, Any]
    received_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        return cls(**json.loads(text))
