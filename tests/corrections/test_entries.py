"""Webhook payloads → log entries → correction records."""

from __future__ import annotations

import pytest

from backend.corrections.entries import entries_from_webhook, prediction_entry
from backend.corrections.records import build_correction
from backend.errors import InvalidEvent
from backend.store.entry import Entry

from ..support.webhooks import (
    annotation_event,
    bulk_created,
    choice_result,
    deleted,
    recorded,
)

TAXONOMY = ('<View><Image name="image" value="$image"/><Taxonomy name="tax" toName="image">'
            '<Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice></Taxonomy></View>')


def predicted(labels: list[str], score: float = 0.8) -> dict:
    result = {"model_version": "m:p1", "score": score, "result": [
        {"from_name": "choice", "to_name": "image", "type": "choices",
         "value": {"choices": labels}, "score": score,
         "top_k": [{"label": labels[0], "score": score}]}]}
    entry = prediction_entry("4", 7, result, {"choice": {"image_ref": "/data/upload/4/7.png",
                                                         "embedding_key": "m|abc"}})
    return {"project": "4", **entry.data}


def record_for(event: dict, prediction: dict | None = None) -> dict:
    (entry,) = entries_from_webhook(event)
    return build_correction(entry, prediction)


def test_recorded_label_studio_annotation_becomes_one_entry():
    (entry,) = entries_from_webhook(recorded("webhook_annotation_created"))
    assert entry.kind == "annotation" and entry.project == "4"
    assert entry.data["annotation"] == "2" and entry.data["task"] == "4"
    assert entry.data["annotator"] == 1 and entry.data["images"] == {"choice": "/data/upload/4/bb3c6358-green.png"}
    assert Entry.from_json(entry.to_json()) == entry


def test_other_events_are_not_corrections():
    for name in ("webhook_start_training", "webhook_project_updated", "webhook_tasks_created",
                 "webhook_tasks_deleted"):
        assert entries_from_webhook(recorded(name)) == []
    assert entries_from_webhook({"action": "ANNOTATION_CREATED"}) == []  # no project


def test_accepted_changed_added_removed_and_skipped():
    accepted = record_for(annotation_event(1, 7, choice_result("Dog")), predicted(["Dog"]))
    assert accepted["status"] == "accepted"
    control = accepted["controls"]["choice"]
    assert control == {"final": ["Dog"], "predicted": ["Dog"], "status": "accepted", "type": "choices",
                       "predicted_score": 0.8, "top_k": [{"label": "Dog", "score": 0.8}],
                       "image_ref": "/data/upload/4/7.png", "embedding_key": "m|abc"}
    assert accepted["model_version"] == "m:p1"
    changed = record_for(annotation_event(2, 7, choice_result("Cat")), predicted(["Dog"]))
    assert changed["status"] == "changed" and changed["controls"]["choice"]["predicted"] == ["Dog"]
    added = record_for(annotation_event(3, 8, choice_result("Cat")))
    assert added["status"] == "added" and added["controls"]["choice"]["predicted"] is None
    assert added["controls"]["choice"]["image_ref"] == "/data/upload/4/8.png"  # never predicted
    removed = record_for(annotation_event(4, 7, []), predicted(["Dog"]))
    assert removed["controls"]["choice"]["status"] == "removed"
    skipped = record_for(annotation_event(5, 7, [], was_cancelled=True), predicted(["Dog"]))
    assert skipped["status"] == "skipped" and skipped["controls"]["choice"]["status"] == "skipped"


def test_label_studio_prediction_snapshot_counts_when_we_have_no_record():
    event = annotation_event(6, 9, choice_result("Cat"))
    event["annotation"]["prediction"] = {"model_version": "imported", "result": choice_result("Cat")}
    record = record_for(event)
    assert record["status"] == "accepted" and record["model_version"] == "imported"


def test_flags_times_and_annotator_are_kept():
    event = annotation_event(7, 7, choice_result("Dog"), ground_truth=True, lead_time=3.5,
                             completed_by=12)
    record = record_for(event)
    assert record["ground_truth"] and record["lead_time"] == 3.5 and record["annotator"] == 12
    assert record["updated_at"] == "2026-11-28T12:07:54.065836Z" and record["received_at"] > 0


def test_taxonomy_paths_compare_as_paths():
    result = [{"from_name": "tax", "to_name": "image", "type": "taxonomy",
               "value": {"taxonomy": [["Animal", "Cat"]]}}]
    guess = {"controls": {"tax": {"labels": [["Animal", "Cat"]], "type": "taxonomy"}},
             "model_version": "m"}
    record = record_for(annotation_event(8, 7, result, label_config=TAXONOMY), guess)
    assert record["controls"]["tax"]["final"] == [["Animal", "Cat"]]
    assert record["controls"]["tax"]["status"] == "accepted"


def test_bulk_create_splits_and_deletion_keeps_ids_only():
    events = [annotation_event(i, 20 + i, choice_result("Cat")) for i in (1, 2, 3)]
    entries = entries_from_webhook(bulk_created(events))
    assert [e.data["annotation"] for e in entries] == ["1", "2", "3"]
    assert [e.data["task"] for e in entries] == ["21", "22", "23"]
    (deletion,) = entries_from_webhook(deleted(3, 1))
    assert deletion.kind == "deletion" and deletion.data == {"annotations": ["1", "3"]}


def test_idempotency_keys_identify_deliveries_not_arrivals():
    event = annotation_event(1, 7, choice_result("Dog"))
    first, again = entries_from_webhook(event)[0], entries_from_webhook(event)[0]
    assert first.key == again.key and first.received_at <= again.received_at
    update = annotation_event(1, 7, choice_result("Cat"), action="ANNOTATION_UPDATED",
                              updated_at="2026-11-28T12:09:00Z")
    assert entries_from_webhook(update)[0].key != first.key
    assert entries_from_webhook(deleted(1))[0].key == entries_from_webhook(deleted(1))[0].key


def test_what_the_annotator_saw_wins_and_a_changed_image_drops_the_embedding():
    event = annotation_event(9, 7, choice_result("Cat"), image="/data/upload/4/replaced.png")
    event["annotation"]["prediction"] = {"model_version": "m:p0", "result": choice_result("Cat")}
    record = record_for(event, predicted(["Dog"]))  # our log: re-predicted later as Dog
    control = record["controls"]["choice"]
    assert control["predicted"] == ["Cat"] and control["status"] == "accepted"
    assert record["model_version"] == "m:p0"
    assert control["image_ref"] == "/data/upload/4/replaced.png" and control["embedding_key"] is None


def test_unknown_model_version_is_none_not_a_string():
    guess = {"controls": {"choice": {"labels": ["Dog"], "type": "choices"}}, "model_version": None}
    assert record_for(annotation_event(10, 7, choice_result("Dog")), guess)["model_version"] is None


def test_an_abstention_is_logged_with_its_image_and_counts_as_nothing_proposed():
    entry = prediction_entry("4", 7, {"model_version": "m:p1", "score": 0.2, "result": []},
                             {"choice": {"image_ref": "/data/upload/4/7.png", "embedding_key": "m|abc",
                                         "uncertainty": {"margin": 0.01}}})
    control = entry.data["controls"]["choice"]
    assert control["abstained"] and control["labels"] == [] and control["uncertainty"] == {"margin": 0.01}
    labelled = record_for(annotation_event(1, 7, choice_result("Dog")), {"project": "4", **entry.data})
    assert labelled["controls"]["choice"]["status"] == "added"
    assert labelled["controls"]["choice"]["predicted"] is None
    assert labelled["controls"]["choice"]["embedding_key"] == "m|abc"  # learnable from
    empty = record_for(annotation_event(2, 7, []), {"project": "4", **entry.data})
    assert empty["controls"] == {}  # abstained and left empty: nothing happened


def test_a_region_whose_from_name_is_not_a_string_is_refused_before_anything_is_recorded():
    good = annotation_event(1, 7, choice_result("Cat"))
    bad = annotation_event(2, 8, [{"from_name": ["choice"], "type": "choices",
                                   "value": {"choices": ["Dog"]}}])
    with pytest.raises(InvalidEvent, match=r"annotation 2: result\[0\]\.from_name is a list"):
        entries_from_webhook(bulk_created([good, bad]))


def test_an_event_that_cannot_be_read_is_refused_with_what_to_fix():
    event = annotation_event(1, 7, choice_result("Cat"))
    event["annotation"]["task"] = [7]  # an id that is a list
    with pytest.raises(InvalidEvent, match="fix what sends it"):
        entries_from_webhook(event)
