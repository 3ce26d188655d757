"""The review and selection writers (the rows themselves are tested over HTTP in
review/test_review_api.py, on the micro CLIP), and `project_view` on a real store: the tasks
with cached embeddings, their annotations, and the store round trips it costs."""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pytest

from backend.adapt.fit import normalise_rows
from backend.errors import ReviewError
from backend.formats import FORMULA_STARTS
from backend.labelstudio.label_config import parse_label_config
from backend.review.queues import project_view, write
from backend.store import Entry, Store

from ..support.counting_store import count_calls

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


MODEL = "m"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
SPACE = parse_label_config(CONFIG).spaces[0]


def predicted(store: Store, tasks: dict[int, str | None]) -> None:
    """A prediction per task, with that embedding key (None: none) for control c."""
    store.put_predictions([Entry("prediction", f"p{task}", "7", {"task": str(task), "controls": {
        "c": {"embedding_key": key, "image_ref": f"http://images/{task}.png"}}})
        for task, key in tasks.items()])


def annotated(store: Store, task: int, final: list[Any]) -> None:
    record = {"task": str(task), "annotation": f"a{task}", "received_at": 1.0,
              "controls": {"c": {"final": final}}}
    store.commit_annotation(Entry("annotation", f"e{task}", "7", {}), record, 1.0)


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


@pytest.mark.parametrize("count", [1, 10, 60])
def test_project_view_reads_the_embeddings_in_one_call(store: Store, count: int) -> None:
    predicted(store, {task: f"{MODEL}|{task}" for task in range(count)})
    store.put_embeddings([(f"{MODEL}|{task}", vector(task), None) for task in range(count)])
    for task in range(0, count, 3):
        annotated(store, task, ["dog"])
    calls = count_calls(store)
    view = project_view(store, "7", SPACE, MODEL)
    assert calls == {"predictions": 1, "embeddings": 1, "corrections": 1}
    assert len(view.tasks) == count and sorted(view.annotated) == sorted(
        view.tasks.index(str(task)) for task in range(0, count, 3))


def test_project_view_keeps_the_tasks_whose_embedding_is_stored(store: Store) -> None:
    predicted(store, {1: f"{MODEL}|1", 2: f"{MODEL}|2", 3: None, 4: "old|4", 5: "old|5",
                      6: f"{MODEL}|1"})
    store.put_embeddings([(f"{MODEL}|1", vector(1), None),
                          (f"{MODEL}|new4", vector(4), "http://images/4.png")])
    annotated(store, 6, ["cat"])
    annotated(store, 2, ["dog"])  # a task without an embedding: not in the view
    annotated(store, 4, ["bird"])  # a label the config no longer has
    view = project_view(store, "7", SPACE, MODEL)
    assert view.tasks == ["1", "4", "6"]
    assert view.refs == [f"http://images/{task}.png" for task in (1, 4, 6)]
    expected = [store.get_embedding(key) for key in (f"{MODEL}|1", f"{MODEL}|new4", f"{MODEL}|1")]
    assert np.array_equal(view.vectors, normalise_rows(np.stack(expected).astype(np.float64)))
    assert list(view.annotated) == [2] and view.annotated[2].tolist() == [1.0, 0.0]


def test_project_view_without_stored_embeddings_says_so(store: Store) -> None:
    predicted(store, {1: f"{MODEL}|1", 2: None})
    calls = count_calls(store)
    with pytest.raises(ReviewError, match="no predicted tasks with cached embeddings"):
        project_view(store, "7", SPACE, MODEL)
    assert calls == {"predictions": 1, "embeddings": 1, "embedding_key_for": 1}
