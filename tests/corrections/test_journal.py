"""The journal's batches: what one /predict proposed reaches the store in one transaction;
annotations and deletions keep their own atomic commit; a store outage spools exactly what it
spooled before (everything from the first entry not applied, in order)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.corrections.dead_letters import DeadLetters
from backend.corrections.entries import entries_from_webhook, prediction_entry
from backend.corrections.journal import Journal
from backend.errors import StoreUnavailable
from backend.store.entry import Entry
from backend.store.sqlite import SqliteStore

from ..support.counting_store import count_calls
from ..support.waiting import eventually
from ..support.webhooks import annotation_event, choice_result

PROJECT = "4"  # the project of the webhooks in tests/support/webhooks.py


def proposed(*tasks: int) -> list[Entry]:
    return [prediction_entry(PROJECT, task, {"model_version": "m:p1", "score": 0.9, "result": [
        {"from_name": "choice", "to_name": "image", "type": "choices",
         "value": {"choices": ["Dog"]}, "score": 0.9, "top_k": []}]}, {}) for task in tasks]


def annotated(annotation: int, task: int) -> Entry:
    (entry,) = entries_from_webhook(annotation_event(annotation, task, choice_result("Cat")))
    return entry


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "store.sqlite3")
    yield opened
    opened.close()


@pytest.fixture
def journal(store: SqliteStore, tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(store, tmp_path / "spool", retry_s=0.05)
    yield opened
    opened.stop()


def test_consecutive_predictions_are_one_transaction_annotations_their_own(store, journal):
    calls = count_calls(store)
    journal.write([*proposed(1, 2, 3), annotated(10, 1), *proposed(4, 5)])
    assert calls == {"put_predictions": 2, "prediction": 1, "commit_annotation": 1}
    assert sorted(p["task"] for p in store.predictions(PROJECT)) == ["1", "2", "3", "4", "5"]
    (record,) = store.corrections(PROJECT)
    assert record["status"] == "changed"  # compared with the prediction written before it
    assert record["controls"]["choice"]["predicted"] == ["Dog"]


def test_a_prediction_that_can_never_be_applied_is_set_aside_alone(store, journal, tmp_path):
    good = proposed(1, 2, 3)
    bad = Entry("prediction", "bad", PROJECT, {"controls": {}})  # no task
    journal.write([good[0], bad, *good[1:]])
    assert journal.pending == 0
    assert sorted(p["task"] for p in store.predictions(PROJECT)) == ["1", "2", "3"]
    (letter,) = DeadLetters(tmp_path / "spool").read()
    assert letter["entry"]["key"] == "bad" and letter["reason"].startswith("KeyError")


def test_an_outage_spools_from_the_first_entry_not_applied_in_order(store, journal, tmp_path):
    """The store goes down after the first run of predictions: the annotation and every entry
    after it are spooled, in order, and replayed once the store is back."""
    real = store.commit_annotation

    def down(*_: object) -> bool:
        raise StoreUnavailable("down for the test")

    store.commit_annotation = down  # type: ignore[method-assign]
    written = [*proposed(1, 2), annotated(10, 1), *proposed(3, 4), annotated(11, 3)]
    journal.write(written)
    assert journal.pending == 4
    spooled = (tmp_path / "spool" / "spool-0.jsonl").read_text().splitlines()
    assert [Entry.from_json(line).key for line in spooled] == [e.key for e in written[2:]]
    assert sorted(p["task"] for p in store.predictions(PROJECT)) == ["1", "2"]
    journal.write(proposed(5))  # behind the spooled ones, never before them
    assert journal.pending == 5

    store.commit_annotation = real  # type: ignore[method-assign]
    journal.start()
    assert eventually(lambda: journal.pending == 0)
    assert sorted(p["task"] for p in store.predictions(PROJECT)) == ["1", "2", "3", "4", "5"]
    assert [e["annotation"] for e in store.events()] == ["10", "11"]


def test_an_outage_during_a_batch_of_predictions_spools_the_whole_batch(store, journal,
                                                                         tmp_path):
    def down(*_: object) -> list[bool]:
        raise StoreUnavailable("down for the test")

    real = store.put_predictions
    store.put_predictions = down  # type: ignore[method-assign]
    journal.write([annotated(10, 1), *proposed(1, 2, 3)])
    assert journal.pending == 3 and [e["annotation"] for e in store.events()] == ["10"]
    store.put_predictions = real  # type: ignore[method-assign]
    journal.start()
    assert eventually(lambda: journal.pending == 0)
    assert sorted(p["task"] for p in store.predictions(PROJECT)) == ["1", "2", "3"]
