"""File formats of every export: JSONL, CSV and Label Studio's task import, as bytes.

What the rows hold is decided by their exporter (corrections/export.py, review/queues.py, the
dead letters); this module only writes them:

- JSONL: one JSON object a line (`jsonl_chunks`).
- CSV: a header, then one line per row; null is an empty cell, other non-strings are JSON;
  text cells are neutralised against formula injection (`spreadsheet_safe`). Metadata goes on
  a comment line that starts with `# ` (`comment_line`).
- Label Studio: one JSON array of tasks to import (`labelstudio_chunks`).
- Streamed over HTTP (`streamed`): JSONL or CSV, then a trailer record saying the export is
  complete and how many rows it holds, or, if it fails part-way, that it is not and why.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from .errors import BackendError

log = logging.getLogger(__name__)

Row = dict[str, Any]

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8",
               "parquet": "application/vnd.apache.parquet", "labelstudio": "application/json"}
EXTENSIONS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "labelstudio": "json"}
TRAILER = "_export"
"""Key of a streamed export's last record: `{"_export": {"complete": true, "rows": N}}` (in CSV,
the same JSON on a last line that starts with `# `); `complete: false` and `error` on failure."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may read as the start of a formula (OWASP, CSV injection)."""


# --- JSONL and Label Studio ----------------------------------------------------------------
def jsonl_chunks(rows: Iterable[Row]) -> Iterator[bytes]:
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode()


def write_jsonl(rows: Iterable[Row], fp: IO[bytes]) -> None:
    fp.writelines(jsonl_chunks(rows))


def labelstudio_chunks(tasks: list[Row]) -> Iterator[bytes]:
    """Tasks to import into Label Studio (Data Manager → Import): one JSON array."""
    yield json.dumps(tasks, ensure_ascii=False).encode()


# --- CSV -----------------------------------------------------------------------------------
def csv_chunks(rows: Iterable[Row], columns: Sequence[str]) -> Iterator[bytes]:
    """CSV with a header; null is an empty cell, other non-strings are JSON (lists, true)."""
    yield _csv_line(columns)
    for row in rows:
        yield _csv_line([_cell(row.get(column)) for column in columns])


def write_csv(rows: Iterable[Row], fp: IO[bytes], columns: Sequence[str]) -> None:
    fp.writelines(csv_chunks(rows, columns))


def columns_of(rows: Iterable[Row]) -> list[str]:
    """Every key of `rows`, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


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


# --- streamed over HTTP --------------------------------------------------------------------
def streamed(rows: Iterable[Row], fmt: str, columns: Sequence[str],
             trailer: bool = True) -> Iterator[bytes]:
    """An HTTP export's body: `rows` as JSONL or CSV (`columns`), then (with `trailer`) the
    trailer record with the number of rows. If the export fails part-way, the trailer says so
    (with or without `trailer`) and the error is raised again, so that the server breaks off
    the transfer: the client sees an incomplete body, never a clean end."""
    written = -1 if fmt == "csv" else 0  # the CSV header is not a row
    try:
        for chunk in csv_chunks(rows, columns) if fmt == "csv" else jsonl_chunks(rows):
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
