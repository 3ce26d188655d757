"""The same contract, on the embedded SQLite store and on a real Redis."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from backend.corrections.entries import entries_from_webhook, prediction_entry
from backend.corrections.records import apply
from backend.errors import StoreUnavailable
from backend.store import BULK_READ, embedding_key, ref_key
from backend.store.redis import RedisStore
from backend.store.sqlite import SqliteStore

from ..support.webhooks import annotation_event, choice_result, deleted


def make(kind: str, request: pytest.FixtureRequest, tmp_path) -> SqliteStore | RedisStore:
    if kind == "sqlite":
        return SqliteStore(tmp_path / "store.sqlite3")
    return RedisStore(request.getfixturevalue("redis_url"), prefix="test")


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[SqliteStore | RedisStore]:
    opened = make(request.param, request, tmp_path)
    yield opened
    opened.close()


def entry(event: dict):
    (only,) = entries_from_webhook(event)
    return only


def created(annotation: int, task: int, *labels: str, **kw):
    return entry(annotation_event(annotation, task, choice_result(*labels), **kw))


def test_annotation_is_logged_and_recorded_once(store):
    first = created(1, 7, "Dog")
    assert apply(store, first) is True
    assert apply(store, first) is False  # the same webhook again
    assert apply(store, created(1, 7, "Dog")) is False  # re-delivered: a new arrival, same key
    (event,) = store.events()
    assert event["annotation"] == "1" and event["action"] == "ANNOTATION_CREATED"
    (record,) = store.corrections()
    assert record["status"] == "added" and record["deleted_at"] is None


def test_prediction_is_what_corrections_are_compared_with(store):
    prediction = {"model_version": "m:p1", "score": 0.9, "result": [
        {"from_name": "choice", "to_name": "image", "type": "choices",
         "value": {"choices": ["Dog"]}, "score": 0.9, "top_k": []}]}
    apply(store, prediction_entry("4", 7, prediction, {}))
    assert store.prediction("4", "7")["model_version"] == "m:p1"
    apply(store, created(1, 7, "Cat"))
    (record,) = store.corrections("4")
    assert record["status"] == "changed" and record["controls"]["choice"]["predicted"] == ["Dog"]


def test_update_replaces_the_record_and_history_stays_in_the_log(store):
    apply(store, created(1, 7, "Dog", updated_at="2026-11-28T10:00:00Z"))
    apply(store, entry(annotation_event(1, 7, choice_result("Cat"), action="ANNOTATION_UPDATED",
                                       updated_at="2026-11-28T10:05:00Z")))
    stale = entry(annotation_event(1, 7, choice_result("Bird"), action="ANNOTATION_UPDATED",
                                   updated_at="2026-11-28T10:01:00Z"))
    apply(store, stale)  # arrives last, but is older: logged, not current
    assert [e["result"][0]["value"]["choices"] for e in store.events()] == [["Dog"], ["Cat"], ["Bird"]]
    (record,) = store.corrections()
    assert record["controls"]["choice"]["final"] == ["Cat"]


def test_deletion_marks_records_and_is_idempotent(store):
    apply(store, created(1, 7, "Dog"))
    apply(store, created(2, 8, "Cat"))
    assert apply(store, entry(deleted(1, 99))) is True  # 99: never seen, ignored
    assert apply(store, entry(deleted(1, 99))) is False
    apply(store, entry(annotation_event(1, 7, choice_result("Cat"), action="ANNOTATION_UPDATED",
                                       updated_at="2027-01-01T00:00:00Z")))
    records = {r["annotation"]: r for r in store.corrections()}
    assert records["1"]["deleted_at"] is not None and records["2"]["deleted_at"] is None
    assert records["1"]["controls"]["choice"]["final"] == ["Dog"]  # deleted stays deleted
    assert [e["kind"] for e in store.events()] == ["annotation", "annotation", "deletion", "annotation"]


def test_projects_are_separate_and_order_is_kept(store):
    for i in range(60):
        apply(store, created(i, i, "Dog", project_id=1 + i % 2))
    assert [e["annotation"] for e in store.events()] == [str(i) for i in range(60)]
    assert {r["project"] for r in store.corrections("2")} == {"2"}
    assert len(list(store.corrections("2"))) == 30 and len(list(store.corrections())) == 60


def test_large_reads_go_on_from_another_thread(store):
    """A streamed HTTP export reads its first rows on one worker thread and its later batches
    on others: every row must still arrive (the SQLite reader was bound to its first thread)."""
    count = BULK_READ + 100
    for i in range(count):
        apply(store, created(i, i, "Dog"))
    for read in (store.events, store.corrections):
        rows = read()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(next, rows).result()
        assert len([first, *rows]) == count


def test_embeddings_by_content_and_by_reference(store):
    vector = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    key = embedding_key("ViT-B-32/x", b"image bytes")
    assert store.get_embedding(key) is None
    store.put_embedding(key, vector, image_ref="/data/upload/1/a.png")
    np.testing.assert_allclose(store.get_embedding(key), vector, rtol=1e-3, atol=1e-3)  # float16
    assert store.embedding_key_for("ViT-B-32/x", "/data/upload/1/a.png") == key
    assert store.embedding_key_for("other-model", "/data/upload/1/a.png") is None


def test_fresh_image_refs_are_looked_up_in_bulk_with_their_embeddings(store):
    vectors = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    before = time.time()
    keys = [embedding_key("m", bytes([i])) for i in range(3)]
    store.put_embedding(keys[0], vectors[0], "/a.png")
    store.put_embedding(keys[1], vectors[1], "/b.png")
    store.put_image_ref(keys[2], "/c.png")  # mapped, but its embedding was never stored
    store.put_embedding(embedding_key("other", b"d"), vectors[2], "/d.png")
    found = store.embeddings_for_refs("m", ["/a.png", "/b.png", "/c.png", "/d.png", "/e.png"],
                                      before)
    assert {ref: key for ref, (key, _) in found.items()} == {"/a.png": keys[0], "/b.png": keys[1]}
    np.testing.assert_allclose(found["/b.png"][1], vectors[1], rtol=1e-3, atol=1e-3)
    assert store.embeddings_for_refs("m", ["/a.png"], time.time() + 1) == {}  # not fresh
    assert store.embeddings_for_refs("m", [], before) == {}


def test_fetching_again_refreshes_when_a_ref_was_verified(store):
    key = embedding_key("m", b"a")
    store.put_embedding(key, np.ones(4, np.float32), "/a.png")
    later = time.time()
    assert store.embeddings_for_refs("m", ["/a.png"], later) == {}
    store.put_image_ref(key, "/a.png")
    assert store.embeddings_for_refs("m", ["/a.png"], later)["/a.png"][0] == key
    changed = embedding_key("m", b"a, edited")  # new bytes behind the same reference
    store.put_embedding(changed, np.zeros(4, np.float32), "/a.png")
    assert store.embeddings_for_refs("m", ["/a.png"], later)["/a.png"][0] == changed


def test_many_refs_are_looked_up_in_chunks(store):
    refs = [f"/img/{i}.png" for i in range(1_200)]
    for i, ref in enumerate(refs[::2]):
        store.put_embedding(embedding_key("m", str(i).encode()), np.full(4, i, np.float32), ref)
    found = store.embeddings_for_refs("m", refs, 0.0)
    assert sorted(found) == sorted(refs[::2])


def test_sqlite_store_of_an_older_version_treats_its_image_refs_as_unverified(tmp_path):
    path = tmp_path / "store.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE images (ref TEXT PRIMARY KEY, embedding_key TEXT NOT NULL);"
                      "CREATE TABLE embeddings (key TEXT PRIMARY KEY, data BLOB NOT NULL);")
    old.close()
    store = SqliteStore(path)
    key = embedding_key("m", b"a")
    store.put_embedding(key, np.ones(4, np.float32))
    store._db.execute("INSERT INTO images (ref, embedding_key) VALUES (?, ?)",
                      (ref_key("m", "/a.png"), key))
    assert store.embedding_key_for("m", "/a.png") == key
    assert store.embeddings_for_refs("m", ["/a.png"], 1.0) == {}
    store.put_image_ref(key, "/a.png")
    assert store.embeddings_for_refs("m", ["/a.png"], 1.0)["/a.png"][0] == key
    store.close()


def test_data_survives_reopening(request, tmp_path):
    for kind in ("sqlite", "redis"):
        first = make(kind, request, tmp_path)
        apply(first, created(1, 7, "Dog"))
        first.close()
        again = make(kind, request, tmp_path)
        assert len(list(again.events())) == 1 and len(list(again.corrections())) == 1
        again.close()


def test_redis_keys_all_carry_the_prefix(redis_url):
    store = RedisStore(redis_url, prefix="myteam")
    apply(store, created(1, 7, "Dog"))
    store.put_embedding(embedding_key("m", b"x"), np.zeros(4, np.float32), "/x.png")
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
    assert keys and all(k.startswith("myteam:") for k in keys)


def test_unreachable_redis_raises_store_unavailable():
    store = RedisStore("redis://127.0.0.1:9/0", timeout_s=0.2)
    with pytest.raises(StoreUnavailable, match="Redis at 127.0.0.1:9 is unreachable"):
        apply(store, created(1, 7, "Dog"))
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_heads_are_numbered_per_project_listed_in_order_and_activated(store):
    project = f"heads-{np.random.default_rng().integers(1 << 30)}"
    assert store.heads(project) == [] and store.active_head(project) is None
    first = store.put_head(project, {"note": "first"})
    second = store.put_head(project, {"note": "second"})
    assert (first, second) == ("h1", "h2")
    assert [h["note"] for h in store.heads(project)] == ["first", "second"]
    assert [h["id"] for h in store.heads(project)] == ["h1", "h2"]
    assert store.put_head(project + "-other", {}) == "h1"
    store.set_active_head(project, "h1")
    assert store.active_head(project) == "h1"
    store.set_active_head(project, "zero-shot")
    assert store.active_head(project) == "zero-shot"


def test_a_projects_latest_predictions_are_listed(store):
    project = f"listed-{np.random.default_rng().integers(1 << 30)}"
    for task, version in ((3, "m:p1"), (5, "m:p1"), (3, "m:p2")):
        apply(store, prediction_entry(project, task, {"model_version": version, "score": 0.5,
                                                     "result": []}, {}))
    listed = {p["task"]: p["model_version"] for p in store.predictions(project)}
    assert listed == {"3": "m:p2", "5": "m:p1"}
    assert list(store.predictions(project + "-none")) == []


# --- batched reads and writes: one transaction (SQLite) or one pipeline (Redis) each -------------
def _vectors(count: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 8)).astype(np.float32)


def test_embeddings_are_read_in_one_call_and_missing_ones_left_out(store):
    vectors = _vectors(3)
    keys = [embedding_key("batch", bytes([i])) for i in range(4)]
    for key, vector in zip(keys, vectors):
        store.put_embedding(key, vector)
    found = store.embeddings([*keys, keys[0]])  # the 4th was never stored; a key twice
    assert sorted(found) == sorted(keys[:3])
    for key, vector in zip(keys, vectors):
        np.testing.assert_array_equal(found[key], store.get_embedding(key))
        np.testing.assert_allclose(found[key], vector, rtol=1e-3, atol=1e-3)
    assert store.embeddings([]) == {}
    assert store.get_embedding(keys[3]) is None


def test_many_embeddings_are_read_across_chunks(store):
    keys = [embedding_key("chunks", str(i).encode()) for i in range(BULK_READ + 20)]
    store.put_embeddings([(key, np.full(4, i, np.float32), None) for i, key in enumerate(keys)])
    found = store.embeddings(keys)
    assert len(found) == len(keys) and found[keys[-1]][0] == len(keys) - 1


def test_put_embeddings_equals_put_embedding_one_by_one(request, tmp_path, store):
    vectors = _vectors(3, seed=3)
    items = [(embedding_key("one", b"a"), vectors[0], "/a.png"),
             (embedding_key("one", b"b"), vectors[1], None),  # a data: URI: no reference
             (embedding_key("one", b"c"), vectors[2], "/c.png")]
    before = time.time()
    store.put_embeddings(items)
    store.put_embeddings([])
    single = (RedisStore(request.getfixturevalue("redis_url"), prefix="single")
              if isinstance(store, RedisStore) else SqliteStore(tmp_path / "single.sqlite3"))
    for key, vector, ref in items:
        single.put_embedding(key, vector, ref)
    for batched_or_single in (store, single):
        assert {key: v.tolist() for key, v in batched_or_single.embeddings(
            [key for key, _, _ in items]).items()} == {
            key: single.get_embedding(key).tolist() for key, _, _ in items}
        found = batched_or_single.embeddings_for_refs("one", ["/a.png", "/b.png", "/c.png"],
                                                      before)
        assert {ref: key for ref, (key, _) in found.items()} == {"/a.png": items[0][0],
                                                                 "/c.png": items[2][0]}
    single.close()


def test_put_image_refs_marks_each_reference_seen_now(store):
    keys = [embedding_key("refs", bytes([i])) for i in range(3)]
    store.put_embeddings([(key, np.ones(4, np.float32), None) for key in keys])
    later = time.time()
    store.put_image_refs([(keys[0], "/x.png"), (keys[1], "/y.png")])
    store.put_image_refs([])
    store.put_image_ref(keys[2], "/z.png")
    found = store.embeddings_for_refs("refs", ["/x.png", "/y.png", "/z.png"], later)
    assert {ref: key for ref, (key, _) in found.items()} == {
        "/x.png": keys[0], "/y.png": keys[1], "/z.png": keys[2]}
    assert store.embedding_key_for("refs", "/y.png") == keys[1]


def test_put_predictions_equals_put_prediction_and_is_idempotent(store):
    project = f"batch-{np.random.default_rng().integers(1 << 30)}"
    entries = [prediction_entry(project, task, {"model_version": version, "score": 0.5,
                                                "result": []}, {})
               for task, version in ((3, "m:p1"), (5, "m:p1"), (3, "m:p2"))]
    assert store.put_predictions(entries) == [store.put_prediction(e) for e in entries]
    assert store.put_predictions(entries) == [True, True, True]  # again: same outcome
    assert store.put_predictions([]) == []
    listed = {p["task"]: p["model_version"] for p in store.predictions(project)}
    assert listed == {"3": "m:p2", "5": "m:p1"}  # the later entry for a task wins
    assert store.prediction(project, "3") == {"project": project, **entries[2].data}
