"""Predict, then the webhooks Label Studio sends for what annotators do — through the real HTTP
API, on both stores — and what the corrections log holds afterwards."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from backend.runtime import Backend
from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.http_server import LoopbackServer, Route
from ..support.waiting import eventually
from ..support.webhooks import CONFIG, annotation_event, bulk_created, choice_result, deleted


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(params=["sqlite", "redis"])
def served(request, tiny_settings):
    settings = tiny_settings
    if request.param == "redis":
        settings = settings.model_copy(update={"REDIS_URL": request.getfixturevalue("redis_url")})
    with BackendThread(create_app(settings)) as backend, LoopbackServer() as images:
        backend.wait_model()
        yield backend, images


def webhook(backend, body) -> dict:
    response = httpx.post(backend.url + "/webhook", json=body, timeout=10)
    assert response.status_code == 200
    return response.json()


def test_annotator_actions_become_correction_records(served):
    backend, images = served
    model: Backend = backend.app.state.backend
    urls = {task: images.add(f"/{task}.png", Route(png((40 * task, 90, 200)), content_type="image/png"))
            for task in range(1, 7)}
    tasks = [{"id": task, "data": {"image": urls[task]}} for task in (1, 2, 3)]
    results = httpx.post(backend.url + "/predict", timeout=60, json={
        "tasks": tasks, "label_config": CONFIG, "project": "4.1764300000"}).json()["results"]
    guess = {task["id"]: r["result"][0]["value"]["choices"][0] for task, r in zip(tasks, results)}
    other = {task: "Cat" if label == "Dog" else "Dog" for task, label in guess.items()}

    def event(annotation, task, *labels, **kw):
        return annotation_event(annotation, task, choice_result(*labels), image=urls[task], **kw)

    assert webhook(backend, event(11, 1, guess[1]))["recorded"] == 1            # accepted
    webhook(backend, event(12, 2, other[2], updated_at="2026-11-28T10:00:00Z"))  # changed…
    webhook(backend, event(12, 2, guess[2], action="ANNOTATION_UPDATED",
                           updated_at="2026-11-28T10:02:00Z"))                   # …then accepted
    webhook(backend, event(13, 3, other[3]))
    webhook(backend, event(13, 3, other[3]))                                     # delivered twice
    webhook(backend, deleted(13))                                                # then deleted
    webhook(backend, event(14, 4, was_cancelled=True))                           # skipped
    webhook(backend, bulk_created([event(15, 5, "Cat"), event(16, 6, "Dog")]))   # never predicted

    store = model.store
    records = {r["annotation"]: r for r in store.corrections("4")}
    assert {a: r["status"] for a, r in records.items()} == {
        "11": "accepted", "12": "accepted", "13": "changed", "14": "skipped", "15": "added", "16": "added"}
    assert records["13"]["deleted_at"] is not None
    assert sum(r["deleted_at"] is None for r in records.values()) == 5
    first = records["11"]["controls"]["choice"]
    assert first["predicted_score"] == results[0]["score"] and first["top_k"] == results[0]["result"][0]["top_k"]
    assert first["image_ref"] == urls[1] and first["embedding_key"].startswith(model.embedding_model + "|")
    assert records["11"]["model_version"] == results[0]["model_version"]
    log = [(e["kind"], e.get("annotation")) for e in store.events()]
    assert log == [("annotation", "11"), ("annotation", "12"), ("annotation", "12"), ("annotation", "13"),
                   ("deletion", None), ("annotation", "14"), ("annotation", "15"), ("annotation", "16")]
    # the never-predicted tasks' images are embedded in the background
    assert eventually(lambda: all(store.embedding_key_for(model.embedding_model, urls[t]) for t in (5, 6)))


def test_predictions_reuse_cached_embeddings(served):
    backend, images = served
    model: Backend = backend.app.state.backend
    url = images.add("/same.png", Route(png((10, 200, 10))))
    body = {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": CONFIG, "project": "4.1"}
    first = httpx.post(backend.url + "/predict", json=body, timeout=60).json()
    encoded = model.inference.items
    second = httpx.post(backend.url + "/predict", json=body, timeout=60).json()
    assert model.inference.items == encoded  # same bytes, same model: no image encoded
    assert first["results"][0]["score"] == pytest.approx(second["results"][0]["score"], abs=1e-3)


def test_unreachable_redis_never_loses_a_correction_or_a_prediction(tiny_settings, tmp_path):
    settings = tiny_settings.model_copy(update={"REDIS_URL": "redis://127.0.0.1:9/0",
                                                "REDIS_TIMEOUT_S": 0.2})
    with BackendThread(create_app(settings)) as backend, LoopbackServer() as images:
        backend.wait_model()
        model: Backend = backend.app.state.backend
        url = images.add("/a.png", Route(png((200, 10, 10))))
        results = httpx.post(backend.url + "/predict", timeout=60, json={
            "tasks": [{"id": 1, "data": {"image": url}}], "label_config": CONFIG,
            "project": "4.1"}).json()["results"]
        assert results[0]["result"]  # served, the embedding cache simply missed
        assert webhook(backend, annotation_event(1, 1, choice_result("Cat")))["recorded"] == 1
        assert model.journal.pending == 2  # the prediction and the correction, on local disk
        assert model.journal.path.read_text().count("\n") == 2
