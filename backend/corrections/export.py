"""The corrections dataset: one flat row per annotation and control, as JSONL, CSV or Parquet
(optionally with each image's embedding), and the model-vs-human summary of those rows.

Rows are built from the store's current correction records (`Store.corrections`), in the
store's order. Columns, in this order (`COLUMNS`):

    project task annotation annotator control type status predicted final predicted_score
    top_k image_ref embedding_key model_version ground_truth was_cancelled lead_time
    created_at updated_at received_at deleted_at

`status` is the control's (accepted, changed, added, removed, skipped). An annotation with no
control at all (e.g. a skip with an empty result) still gives one row, with `control` null and
the annotation's status. Labels are choice values (str) or taxonomy paths (list of str); in
Parquet every label is a path (a choice is a one-element path), so both share one column type.
With embeddings: `has_embedding`, plus `embedding` (Parquet) or `embedding_row` (the row of the
companion `.npy`, float32, shape (rows, dim), NaN rows where missing; JSONL and CSV).

Over HTTP, JSONL and CSV are streamed (`streamed`): they end with a trailer record saying the
export is complete and how many rows it holds, or, if it fails part-way, that it is not and
why, and the transfer is broken off. CSV cells are neutralised against formula injection
(`spreadsheet_safe`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from math import isfinite
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BackendError, ExportError
from ..labelstudio.client import project_key
from ..store import Store, Vector, model_embedding_key
from .records import updated_ts

log = logging.getLogger(__name__)

Row = dict[str, Any]
Matrix = npt.NDArray[np.float32]
Since = datetime | str | float | int | None

FORMATS = ("jsonl", "csv", "parquet")
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8",
               "parquet": "application/vnd.apache.parquet"}
COLUMNS = ("project", "task", "annotation", "annotator", "control", "type", "status",
           "predicted", "final", "predicted_score", "top_k", "image_ref", "embedding_key",
           "model_version", "ground_truth", "was_cancelled", "lead_time", "created_at",
           "updated_at", "received_at", "deleted_at")
RECORD_FIELDS = ("project", "task", "annotation", "model_version", "ground_truth",
                 "was_cancelled", "lead_time", "created_at", "updated_at", "received_at",
                 "deleted_at")
TRAILER = "_export"
"""Key of a streamed export's last record: `{"_export": {"complete": true, "rows": N}}` (in CSV,
the same JSON on a last line that starts with `# `); `complete: false` and `error` on failure."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may read as the start of a formula (OWASP, CSV injection)."""
CHANGED = frozenset({"changed", "added", "removed"})
COMPARED = ("accepted", "changed", "removed")
"""Statuses of rows where the model proposed something and the annotator did not skip."""


@dataclass
class ExportStats:
    """What an export wrote: rows, distinct annotations, rows with an embedding, files
    (none for a stream)."""

    rows: int = 0
    annotations: int = 0
    embeddings: int = 0
    files: list[str] = field(default_factory=list)

    def count(self, rows: Iterable[Row]) -> Iterator[Row]:
        seen: set[str] = set()
        for row in rows:
            self.rows += 1
            seen.add(row["annotation"])
            self.annotations = len(seen)
            yield row


# --- rows ----------------------------------------------------------------------------------
def parse_since(value: Since) -> float | None:
    """`since` as epoch seconds: a datetime (naive = UTC), epoch seconds (number or numeric
    string) or an ISO 8601 string (`2026-11-28`, `2026-11-28T12:00:00Z`, naive = UTC)."""
    if value is None or value == "":
        return None
    parsed = _parse_text(value) if isinstance(value, str) else value
    if isinstance(parsed, datetime):
        return _utc(parsed).timestamp()
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and isfinite(parsed):
        return float(parsed)
    raise ExportError(f"since={value!r} is neither epoch seconds nor an ISO 8601 date/time "
                      "(e.g. 2026-11-28 or 2026-11-28T12:00:00Z)")


def _parse_text(text: str) -> float | datetime | str:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return text


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def correction_rows(store: Store, *, project: Any = None, since: Since = None,
                    only_changed: bool = False, include_deleted: bool = False) -> Iterator[Row]:
    """The dataset's rows. `since` keeps annotations updated at or after it (Label Studio's
    `updated_at`; when absent, when the backend received it); `only_changed` keeps rows whose
    control was changed, added or removed; deleted annotations only with `include_deleted`."""
    cutoff = parse_since(since)
    for record in store.corrections(project_key(project)):
        if not include_deleted and record.get("deleted_at") is not None:
            continue
        if cutoff is not None and updated_ts(record) < cutoff:
            continue
        for row in record_rows(record):
            if not only_changed or row["status"] in CHANGED:
                yield row


def record_rows(record: Row) -> Iterator[Row]:
    """One row per control of a correction record (one row with no control if it has none)."""
    base = {name: record.get(name) for name in RECORD_FIELDS}
    base["annotator"] = _annotator(record.get("annotator"))
    controls: dict[str, Any] = record.get("controls") or {}
    if not controls:
        yield _ordered({**base, "control": None, "status": record.get("status"), "final": [],
                        "top_k": []})
    for name, control in controls.items():
        yield _ordered({**base, "control": name, "type": control.get("type"),
                        "status": control.get("status"), "predicted": control.get("predicted"),
                        "final": control.get("final") or [], "top_k": control.get("top_k") or [],
                        "predicted_score": control.get("predicted_score"),
                        "image_ref": control.get("image_ref"),
                        "embedding_key": control.get("embedding_key")})


def _ordered(row: Row) -> Row:
    return {column: row.get(column) for column in COLUMNS}


def _annotator(value: Any) -> int | None:
    """Label Studio's `completed_by`: a user id (an object with `id` in some payloads)."""
    value = value.get("id") if isinstance(value, dict) else value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


# --- embeddings ----------------------------------------------------------------------------
def attach_embeddings(rows: Sequence[Row], store: Store, model_label: str | None) -> Matrix:
    """Set each row's `has_embedding`; return the (rows, dim) float32 matrix, NaN rows where
    missing. `model_label` is the embedding model's identity, the part of embedding keys before
    "|" (`ZeroShotModel.embedding_model`). A row's vector: its `embedding_key` if it is that
    model's (any key without a `model_label`), else the one the store has for the row's image."""
    vectors: dict[str, Vector | None] = {}
    found = []
    for row in rows:
        key = model_embedding_key(store, row["embedding_key"], row["image_ref"], model_label)
        if key is not None and key not in vectors:
            vectors[key] = store.get_embedding(key)
        found.append(vectors.get(key) if key is not None else None)
    matrix = np.full((len(rows), _dimension(found)), np.nan, dtype=np.float32)
    for index, (row, vector) in enumerate(zip(rows, found)):
        row["has_embedding"] = vector is not None
        if vector is not None:
            matrix[index] = vector
    return matrix


def _dimension(vectors: Sequence[Vector | None]) -> int:
    sizes = {len(vector) for vector in vectors if vector is not None}
    if len(sizes) > 1:
        raise ExportError(f"embeddings of different sizes {sorted(sizes)} (several models); "
                          "pass the model label to export one model's embeddings")
    return sizes.pop() if sizes else 0


# --- writers -------------------------------------------------------------------------------
def jsonl_chunks(rows: Iterable[Row]) -> Iterator[bytes]:
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode()


def csv_chunks(rows: Iterable[Row], columns: Sequence[str] = COLUMNS) -> Iterator[bytes]:
    """CSV with a header; null is an empty cell, other non-strings are JSON (lists, true)."""
    yield _csv_line(columns)
    for row in rows:
        yield _csv_line([_cell(row.get(column)) for column in columns])


def _csv_line(cells: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue().encode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return spreadsheet_safe(value)
    return json.dumps(value, ensure_ascii=False)


def spreadsheet_safe(text: str) -> str:
    """A text cell as OWASP advises against CSV injection: one starting with = + - @, tab or
    carriage return gets a leading apostrophe, so a spreadsheet shows it instead of running
    it. (Numbers, lists and the like are written as JSON and left alone.)"""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def comment_line(value: Any) -> str:
    """`# ` and `value` as JSON, for a CSV's comment line. A spreadsheet splits the line at its
    commas: a comma inside a string is escaped (as JSON allows) where the next character could
    start a formula, so no piece does; between JSON values a comma is followed by a space."""
    text = json.dumps(value, ensure_ascii=False)
    for start in "=+-@":
        text = text.replace(f",{start}", f"\\u002c{start}")
    return f"# {text}"


def write_jsonl(rows: Iterable[Row], fp: IO[bytes]) -> None:
    fp.writelines(jsonl_chunks(rows))


def write_csv(rows: Iterable[Row], fp: IO[bytes], columns: Sequence[str] = COLUMNS) -> None:
    fp.writelines(csv_chunks(rows, columns))


def streamed(rows: Iterable[Row], fmt: str, trailer: bool = True) -> Iterator[bytes]:
    """An HTTP export's body: `rows` as JSONL or CSV, then (with `trailer`) the trailer record
    with the number of rows. If the export fails part-way, the trailer says so (with or without
    `trailer`) and the error is raised again, so that the server breaks off the transfer: the
    client sees an incomplete body, never a clean end."""
    written = -1 if fmt == "csv" else 0  # the CSV header is not a row
    try:
        for chunk in csv_chunks(rows) if fmt == "csv" else jsonl_chunks(rows):
            yield chunk
            written += 1
    except Exception as exc:
        written = max(written, 0)
        log.warning("export interrupted after %d rows, transfer broken off: %s", written, exc)
        yield trailer_line(fmt, written, _failure(exc))
        raise
    if trailer:
        yield trailer_line(fmt, written)


def trailer_line(fmt: str, rows: int, error: str | None = None) -> bytes:
    """The trailer: a JSONL record, or a CSV comment line."""
    state: Row = {"complete": error is None, "rows": rows}
    if error is not None:
        state["error"] = error
    if fmt == "csv":
        return f"{comment_line({TRAILER: state})}\r\n".encode()
    return (json.dumps({TRAILER: state}, ensure_ascii=False) + "\n").encode()


def _failure(exc: Exception) -> str:
    reason = (str(exc) if isinstance(exc, BackendError)
              else f"internal error ({type(exc).__name__}), see the backend's log")
    return f"{reason}; this export is incomplete: fix that and export again"


PATH = pa.list_(pa.string())
SCHEMA = pa.schema([
    ("project", pa.string()), ("task", pa.string()), ("annotation", pa.string()),
    ("annotator", pa.int64()), ("control", pa.string()), ("type", pa.string()),
    ("status", pa.string()), ("predicted", pa.list_(PATH)), ("final", pa.list_(PATH)),
    ("predicted_score", pa.float64()),
    ("top_k", pa.list_(pa.struct([("label", PATH), ("score", pa.float64())]))),
    ("image_ref", pa.string()), ("embedding_key", pa.string()), ("model_version", pa.string()),
    ("ground_truth", pa.bool_()), ("was_cancelled", pa.bool_()), ("lead_time", pa.float64()),
    ("created_at", pa.string()), ("updated_at", pa.string()), ("received_at", pa.float64()),
    ("deleted_at", pa.float64()),
])


def parquet_table(rows: Sequence[Row], embeddings: Matrix | None = None) -> pa.Table:
    """Rows as an Arrow table; `embeddings` adds `has_embedding` and `embedding` (a
    fixed-size list of float32, null where a row's vector is missing: an all-NaN row)."""
    table = pa.Table.from_pylist([_arrow_row(row) for row in rows], schema=SCHEMA)
    if embeddings is None:
        return table
    missing = _missing(embeddings)
    table = table.append_column("has_embedding", pa.array(~missing))
    return table.append_column("embedding", _vectors(embeddings, missing))


def write_parquet(rows: Sequence[Row], path_or_fp: str | Path | IO[bytes],
                  embeddings: Matrix | None = None) -> None:
    pq.write_table(parquet_table(rows, embeddings), path_or_fp)


def _arrow_row(row: Row) -> Row:
    top_k = [alt for alt in row.get("top_k") or [] if isinstance(alt, dict)]
    return {**{name: row.get(name) for name in SCHEMA.names},
            "predicted": _paths(row.get("predicted")), "final": _paths(row.get("final")),
            "top_k": [{"label": _path(alt.get("label")), "score": alt.get("score")}
                      for alt in top_k]}


def _paths(labels: list[Any] | None) -> list[list[str]] | None:
    return None if labels is None else [_path(label) for label in labels]


def _path(label: Any) -> list[str]:
    return [str(part) for part in label] if isinstance(label, list) else [str(label)]


def _missing(matrix: Matrix) -> npt.NDArray[np.bool_]:
    if not matrix.shape[1]:
        return np.ones(len(matrix), dtype=bool)
    return np.asarray(np.isnan(matrix).all(axis=1))


def _vectors(matrix: Matrix, missing: npt.NDArray[np.bool_]) -> pa.Array:
    """Fixed-size lists when any vector was found (else untyped-size lists, all null)."""
    if not matrix.shape[1]:
        return pa.nulls(len(matrix), pa.list_(pa.float32()))
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1],
                                             mask=pa.array(missing))


# --- one entry point -----------------------------------------------------------------------
def export_corrections(store: Store, out: Path | BinaryIO, fmt: str = "jsonl", *,
                       project: Any = None, since: Since = None, only_changed: bool = False,
                       include_deleted: bool = False, embeddings: bool = False,
                       model_label: str | None = None) -> ExportStats:
    """Write the dataset to `out` (a path, or a binary stream). With `embeddings`, Parquet
    gets an `embedding` column; JSONL/CSV get `embedding_row` and a companion
    `<stem>.embeddings.npy` next to `out`, which must then be a path."""
    check_format(fmt)
    if isinstance(out, Path) and not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: the directory {out.parent} does not exist")
    companion = _companion(out) if embeddings and fmt != "parquet" else None
    stats = ExportStats()
    rows, matrix = _prepared(stats.count(correction_rows(
        store, project=project, since=since, only_changed=only_changed,
        include_deleted=include_deleted)), fmt, embeddings, store, model_label)
    with _opened(out) as fp:
        _write(fmt, rows, fp, matrix)
    if isinstance(out, Path):
        stats.files.append(str(out))
    if companion is not None and matrix is not None:
        np.save(companion, matrix)
        stats.files.append(str(companion))
    stats.embeddings = 0 if matrix is None else int((~_missing(matrix)).sum())
    return stats


def _prepared(rows: Iterator[Row], fmt: str, embeddings: bool, store: Store,
              model_label: str | None) -> tuple[Iterable[Row], Matrix | None]:
    """Rows stream through JSONL/CSV; Parquet and embeddings need them all first."""
    if not embeddings:
        return (list(rows) if fmt == "parquet" else rows), None
    listed = list(rows)
    return listed, attach_embeddings(listed, store, model_label)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


def _companion(out: Path | BinaryIO) -> Path:
    if not isinstance(out, Path):
        raise ExportError("embeddings with JSONL or CSV need an output file (the .npy of "
                          "embeddings is written next to it); or export Parquet")
    return out.with_name(f"{out.stem}.embeddings.npy")


@contextmanager
def _opened(out: Path | BinaryIO) -> Iterator[IO[bytes]]:
    """A stream as it is; a path through `<name>.part`, renamed once complete."""
    if not isinstance(out, Path):
        yield out
        return
    part = out.with_name(f"{out.name}.part")
    try:
        with part.open("wb") as fp:
            yield fp
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)


def _write(fmt: str, rows: Iterable[Row], fp: IO[bytes], matrix: Matrix | None) -> None:
    if fmt == "parquet":
        write_parquet(list(rows), fp, matrix)
        return
    columns: tuple[str, ...] = COLUMNS
    if matrix is not None:
        rows = ({**row, "embedding_row": index} for index, row in enumerate(rows))
        columns = (*COLUMNS, "has_embedding", "embedding_row")
    if fmt == "csv":
        write_csv(rows, fp, columns)
    else:
        write_jsonl(rows, fp)


# --- summary -------------------------------------------------------------------------------
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
