"""The corrections dataset: one flat row per annotation and control, as JSONL, CSV or Parquet
(optionally with each image's embedding). Its model-vs-human summary: corrections/summary.py.

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

JSONL and CSV are written by formats.py: over HTTP they are streamed with a trailer record
(`formats.streamed`), and CSV cells are neutralised against formula injection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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

from ..errors import ExportError
from ..formats import write_csv, write_jsonl
from ..labelstudio.client import project_key
from ..store import Store, Vector, model_embedding_key
from .records import updated_ts

Row = dict[str, Any]
Matrix = npt.NDArray[np.float32]
Since = datetime | str | float | int | None

FORMATS = ("jsonl", "csv", "parquet")
COLUMNS = ("project", "task", "annotation", "annotator", "control", "type", "status",
           "predicted", "final", "predicted_score", "top_k", "image_ref", "embedding_key",
           "model_version", "ground_truth", "was_cancelled", "lead_time", "created_at",
           "updated_at", "received_at", "deleted_at")
RECORD_FIELDS = ("project", "task", "annotation", "model_version", "ground_truth",
                 "was_cancelled", "lead_time", "created_at", "updated_at", "received_at",
                 "deleted_at")
CHANGED = frozenset({"changed", "added", "removed"})


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
    "|" (`Backend.embedding_model`). A row's vector: its `embedding_key` if it is that
    model's (any key without a `model_label`), else the one the store has for the row's image."""
    keys = [model_embedding_key(store, row["embedding_key"], row["image_ref"], model_label)
            for row in rows]
    vectors = store.embeddings([key for key in keys if key is not None])  # one round trip
    found = [vectors.get(key) if key is not None else None for key in keys]
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


# --- Parquet -------------------------------------------------------------------------------
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
