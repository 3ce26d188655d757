"""The model-vs-human summary of corrections rows (corrections/export.py): totals, per
control, per annotator and per model_version, with acceptance rates and, per control, a
confusion of predicted → final labels and per-label agreement."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]
COMPARED = ("accepted", "changed", "removed")
"""Statuses of rows where the model proposed something and the annotator did not skip."""


@dataclass
class Tally:
    """Rows counted by status; acceptance = accepted / compared, where compared rows are those
    with a prediction that the annotator did not skip (accepted, changed or removed)."""

    rows: int = 0
    annotations: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)

    def add(self, row: Row) -> None:
        self.rows += 1
        self.annotations.add(row["annotation"])
        self.statuses[str(row["status"])] += 1

    def as_dict(self) -> dict[str, Any]:
        compared = sum(self.statuses[status] for status in COMPARED)
        return {"rows": self.rows, "annotations": len(self.annotations),
                "by_status": dict(sorted(self.statuses.items())), "compared": compared,
                "accepted": self.statuses["accepted"],
                "acceptance_rate": _rate(self.statuses["accepted"], compared)}


@dataclass
class ControlTally(Tally):
    """A control's tally, plus over its compared rows: predicted → final label pairs (single
    label) and per-label agreement (all controls; the only view for multi-label ones)."""

    type: str | None = None
    multi_label: bool = False
    pairs: Counter[tuple[Hashable, Hashable]] = field(default_factory=Counter)
    labels: dict[Hashable, Counter[str]] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        super().add(row)
        self.type = self.type or row["type"]
        if row["status"] not in COMPARED:
            return
        predicted, final = _keys(row["predicted"]), _keys(row["final"])
        self.multi_label |= len(predicted) > 1 or len(final) > 1
        self.pairs[(predicted[0] if predicted else None, final[0] if final else None)] += 1
        for label in dict.fromkeys([*predicted, *final]):
            counts = self.labels.setdefault(label, Counter())
            counts.update(predicted=label in predicted, final=label in final,
                          agreed=label in predicted and label in final)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "multi_label": self.multi_label, **super().as_dict(),
                "confusion": None if self.multi_label else self._confusion(),
                "labels": [_agreement(label, counts) for label, counts
                           in sorted(self.labels.items(), key=lambda item: repr(item[0]))]}

    def _confusion(self) -> list[dict[str, Any]]:
        ordered = sorted(self.pairs.items(), key=lambda item: (-item[1], repr(item[0])))
        return [{"predicted": _label(pair[0]), "final": _label(pair[1]), "count": count}
                for pair, count in ordered]


def summary(rows: Iterable[Row]) -> dict[str, Any]:
    """Model vs human over `rows` (see README): totals, per control, per annotator, per
    model_version. JSON-serialisable; rates are rounded to 4 places, null when undefined."""
    total = Tally()
    controls: dict[str, ControlTally] = {}
    annotators: dict[Any, Tally] = {}
    versions: dict[Any, Tally] = {}
    for row in rows:
        total.add(row)
        annotators.setdefault(row["annotator"], Tally()).add(row)
        versions.setdefault(row["model_version"], Tally()).add(row)
        if row["control"] is not None:
            controls.setdefault(row["control"], ControlTally()).add(row)
    return {**total.as_dict(),
            "controls": {name: tally.as_dict() for name, tally in sorted(controls.items())},
            "annotators": _by(annotators, "annotator"),
            "model_versions": _by(versions, "model_version")}


def _by(tallies: dict[Any, Tally], name: str) -> list[dict[str, Any]]:
    """Busiest first."""
    ordered = sorted(tallies.items(), key=lambda item: (-item[1].rows, str(item[0])))
    return [{name: key, **tally.as_dict()} for key, tally in ordered]


def _keys(labels: list[Any] | None) -> list[Hashable]:
    """Labels as hashable keys (taxonomy paths as tuples), without duplicates."""
    keys = (tuple(label) if isinstance(label, list) else label for label in labels or [])
    return list(dict.fromkeys(keys))


def _label(key: Hashable) -> Any:
    return list(key) if isinstance(key, tuple) else key


def _agreement(label: Hashable, counts: Counter[str]) -> dict[str, Any]:
    return {"label": _label(label), "predicted": counts["predicted"], "final": counts["final"],
            "agreed": counts["agreed"], "precision": _rate(counts["agreed"], counts["predicted"]),
            "recall": _rate(counts["agreed"], counts["final"])}


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
