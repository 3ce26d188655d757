"""The review and selection writers (the rows themselves are tested over HTTP in
review/test_review_api.py, on the micro CLIP)."""

from __future__ import annotations

import csv
import json

from backend.formats import FORMULA_STARTS
from backend.review.queues import write

ROW = {"task": "7", "queue": "disagreement", "priority": 0.9, "reason": "=cmd|' /C calc'!A0",
       "predicted": "+Cat", "confidence": 0.5, "margin": 0.1, "annotated": ["-Dog"],
       "image": "@http://127.0.0.1/a.png"}


def test_review_csv_neutralises_text_that_a_spreadsheet_would_run():
    """OWASP's CSV injection: text cells starting with = + - @ get a leading apostrophe; the
    parameters line stays JSON after `# `, and splitting it at its commas (as a spreadsheet
    does) gives no piece that starts a formula."""
    header = {"control": "choice,=HYPERLINK(\"http://evil.example\")", "strategy": "-x,+y,@z"}
    first, *lines = b"".join(write([ROW], header, "csv", "review", "image")).decode().splitlines()
    assert first.startswith("# ") and json.loads(first[2:]) == {"export": "review", **header}
    assert not [piece for piece in first.split(",") if piece.startswith(FORMULA_STARTS)]
    (row,) = csv.DictReader(lines)
    assert (row["reason"], row["predicted"], row["image"]) == (
        "'=cmd|' /C calc'!A0", "'+Cat", "'@http://127.0.0.1/a.png")
    assert row["annotated"] == '["-Dog"]' and row["task"] == "7" and row["priority"] == "0.9"


def test_review_jsonl_keeps_text_as_it_is():
    header_line, row_line = b"".join(write([ROW], {}, "jsonl", "review", "image")).decode().splitlines()
    assert json.loads(row_line) == ROW and json.loads(header_line) == {"header": {"export": "review"}}
