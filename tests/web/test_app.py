"""The HTTP API as Label Studio calls it: a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from backend.config import load_settings
from backend.runtime import Backend
from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.http_server import LoopbackServer, Route

RECORDED = Path(__file__).parents[1] / "e2e" / "recorded"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>')


def jpeg(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def backend(tiny_settings):
    with BackendThread(create_app(tiny_settings)) as server:
        server.wait_model()
        yield server


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


def test_health_answers_label_studio_shape(backend):
    for path in ("/", "/health"):
        body = httpx.get(backend.url + path).json()
        assert body["status"] == "UP" and body["model_class"] == "ZeroShotModel"
        assert body["model_state"] == "ready" and body["family"] == "clip"


def test_setup_returns_model_version_for_label_studios_exact_request(backend):
    recorded = json.loads((RECORDED / "setup.json").read_text())
    recorded["schema"] = CONFIG
    recorded["extra_params"] = {"threshold": 0.5}  # the 2.x library crashes on a dict here
    response = post(backend, "/setup", recorded)
    assert response.status_code == 200
    version = response.json()["model_version"]
    assert version.startswith("tiny-test-clip/none:p")
    assert version in httpx.get(backend.url + "/versions").json()["versions"]


def test_setup_rejects_unsupported_configs_with_what_is_supported(backend):
    config = '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>'
    response = post(backend, "/setup", {"project": "1.1", "schema": config})
    assert response.status_code == 422
    assert "Supported: <Choices>" in response.json()["detail"]


def test_predict_keeps_task_order_and_fails_only_bad_tasks(backend, loopback: LoopbackServer, caplog):
    good = loopback.add("/good.jpg", Route(jpeg(), content_type="image/jpeg"))
    bad = {
        2: loopback.add("/missing.jpg", Route(b"", 404)),
        3: loopback.add("/page.jpg", Route(b"<!DOCTYPE html><html></html>", content_type="text/html")),
        4: loopback.add("/truncated.jpg", Route(jpeg(size=(300, 300))[:400])),
        5: loopback.add("/empty.jpg", Route(b"")),
        6: "http://127.0.0.1:9/unreachable.jpg",
    }
    tasks = [{"id": 1, "data": {"image": good}}] + [{"id": i, "data": {"image": url}} for i, url in bad.items()]
    tasks.append({"id": 7, "data": {"image": good}})
    with caplog.at_level(logging.WARNING, logger="backend.predict.pipeline"):
        response = post(backend, "/predict", {"tasks": tasks, "label_config": CONFIG, "project": "1.2"})
    results = response.json()["results"]
    assert response.status_code == 200 and len(results) == len(tasks)
    assert results[0]["result"] and results[-1]["result"]
    assert results[0]["result"][0]["value"]["choices"][0] in ("red", "green", "blue")
    assert 0.0 <= results[0]["score"] <= 1.0
    expected = {2: "HTTP 404", 3: "an HTML page", 4: "corrupt or truncated JPEG", 5: "empty (0 bytes)",
                6: "could not connect"}
    for index, (task_id, reason) in enumerate(expected.items(), start=1):
        assert "result" not in results[index]
        assert reason in results[index]["error"]
        assert any(f"task {task_id}: " in r.message and reason in r.message for r in caplog.records)


def test_predict_reuses_text_embeddings_and_a_shared_image_is_fetched_once(backend, loopback):
    url = loopback.add("/a.jpg", Route(jpeg()))
    model: Backend = backend.app.state.backend
    body = {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": CONFIG}
    post(backend, "/predict", body)
    encoded = model.heads.texts.encoded
    assert encoded == 3 * 7  # 3 labels × 7 templates ("simple")
    body["tasks"].append({"id": 2, "data": {"image": url}})
    results = post(backend, "/predict", body).json()["results"]
    assert model.heads.texts.encoded == encoded  # repeated config: no text encoded
    assert results[0]["result"][0]["score"] == results[1]["result"][0]["score"]
    assert len(loopback.requests) == 1  # not one per task; then known by its URL (test_rescoring)


def test_setup_warms_up_the_prompts(backend):
    model: Backend = backend.app.state.backend
    config = CONFIG.replace("blue", "purple")
    post(backend, "/setup", {"project": "1.1", "schema": config})
    for _ in range(200):
        if model.heads.texts.encoded >= 21:
            break
        threading.Event().wait(0.05)
    assert model.heads.texts.encoded == 21


def test_model_runs_on_the_inference_thread_not_the_event_loop(backend, loopback):
    model: Backend = backend.app.state.backend
    seen: set[str] = set()
    original = model.encoder.encode_images

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        seen.add(threading.current_thread().name)
        return original(pixels)

    model.encoder.encode_images = spy
    urls = [loopback.add(f"/{i}.jpg", Route(jpeg((i * 20, 0, 0)))) for i in range(5)]
    post(backend, "/predict", {"tasks": [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)],
                               "label_config": CONFIG})
    assert seen == {"inference"}


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDED.glob("webhook_*.json")))
def test_every_recorded_label_studio_webhook_is_accepted(backend, name):
    response = post(backend, "/webhook", json.loads((RECORDED / name).read_text()))
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b'{"action": 5}', b"", b'"text"'])
def test_malformed_webhooks_get_400_not_500(backend, payload):
    response = httpx.post(backend.url + "/webhook", content=payload,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize(
    "body",
    [{}, {"tasks": "nope"}, {"tasks": [1, 2]}, {"tasks": [], "label_config": 5},
     {"tasks": [{"id": 1, "data": {"image": 42}}], "label_config": CONFIG},
     {"tasks": [{"id": 1}], "label_config": "<View/>"},
     {"tasks": [{"id": 1, "data": {}}]}],
)
def test_malformed_predict_requests_get_4xx_not_500(backend, body):
    response = post(backend, "/predict", body)
    assert response.status_code in (200, 422)
    if response.status_code == 200:  # well-formed request, bad task: an aligned placeholder
        assert len(response.json()["results"]) == len(body["tasks"])


def test_metrics_move_after_predict_and_webhook(backend, loopback):
    def sample(name: str) -> float:
        text = httpx.get(backend.url + "/metrics").text
        return sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples if s.name == name)

    before = (sample("backend_images_encoded_total"), sample("backend_webhook_events_total"))
    post(backend, "/predict", {"tasks": [{"id": 1, "data": {"image": loopback.add("/m.jpg", Route(jpeg()))}}],
                               "label_config": CONFIG})
    post(backend, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert sample("backend_images_encoded_total") == before[0] + 1
    assert sample("backend_webhook_events_total") == before[1] + 1
    assert sample("backend_http_requests_total") > 0


def test_dead_letters_are_exported_with_their_reason(backend):
    assert httpx.get(backend.url + "/export/dead-letters").text == ""
    backend.app.state.backend.journal.dead_letters.add(b'{"kind": "annotation"}\n', "KeyError: 'key'")
    response = httpx.get(backend.url + "/export/dead-letters")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    [letter] = [json.loads(line) for line in response.text.splitlines()]
    assert letter["entry"] == {"kind": "annotation"} and letter["reason"] == "KeyError: 'key'"


def test_basic_auth_guards_every_route(tiny_configs, tmp_path):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pw-123")
    with BackendThread(create_app(settings)) as server:
        assert httpx.get(server.url + "/health").status_code == 401
        assert httpx.get(server.url + "/health", auth=("ls", "wrong")).status_code == 401
        assert httpx.post(server.url + "/webhook", json={"action": "X"}).status_code == 401
        assert httpx.get(server.url + "/health", auth=("ls", "pw-123")).status_code == 200


def test_model_that_fails_to_load_keeps_health_up_and_setup_says_why(tiny_configs, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED=str(broken))
    with BackendThread(create_app(settings)) as server:
        health = server.wait_model()
        assert health["status"] == "UP" and health["model_state"] == "failed"
        assert "broken" in health["model_error"]
        setup = post(server, "/setup", {"project": "1.1", "schema": CONFIG})
        assert setup.status_code == 503 and "Check that the checkpoint matches" in setup.json()["detail"]
        predict = post(server, "/predict", {"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG})
        assert predict.status_code == 503


def test_ready_answers_200_once_the_model_is_loaded(backend):
    response = httpx.get(backend.url + "/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "READY", "model_state": "ready", "model_error": None}


def test_ready_is_503_while_the_model_loads_and_after_it_failed(tiny_settings, tiny_configs, tmp_path):
    async def ready_while_loading() -> httpx.Response:
        # no lifespan under ASGITransport: the model is never started, it stays "loading"
        transport = httpx.ASGITransport(app=create_app(tiny_settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/ready")

    loading = asyncio.run(ready_while_loading())
    assert loading.status_code == 503 and loading.json()["model_state"] == "loading"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED=str(broken),
                             MODEL_DIR=tmp_path / "failed")
    with BackendThread(create_app(settings)) as server:
        assert server.wait_model()["model_state"] == "failed"
        failed = httpx.get(server.url + "/ready")
        assert failed.status_code == 503 and failed.json()["status"] == "NOT_READY"
        assert "broken" in failed.json()["model_error"]
        assert httpx.get(server.url + "/health").json()["status"] == "UP"  # still live


def test_webhook_secret_lets_label_studios_webhook_in_without_basic_auth(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pw-123", WEBHOOK_SECRET="s3cr3t")
    event = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    with BackendThread(create_app(settings)) as server:
        hook = server.url + "/webhook"
        assert httpx.post(hook, json=event).status_code == 401
        assert httpx.post(hook, json=event, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
        assert httpx.post(hook, json=event, headers={"X-Webhook-Secret": "s3cr3t"}).status_code == 200
        assert httpx.post(hook, json=event, auth=("ls", "pw-123")).status_code == 200
        other = httpx.get(server.url + "/health", headers={"X-Webhook-Secret": "s3cr3t"})
        assert other.status_code == 401  # the secret opens /webhook only
        assert "s3cr3t" not in other.text and "pw-123" not in other.text


def test_webhook_secret_alone_guards_only_the_webhook(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             WEBHOOK_SECRET="s3cr3t")
    with BackendThread(create_app(settings)) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        denied = httpx.post(server.url + "/webhook", json={"action": "X"})
        assert denied.status_code == 401 and "X-Webhook-Secret" in denied.json()["detail"]


def test_tokens_and_passwords_never_reach_logs_or_error_messages(tiny_configs, caplog):
    token = "0123456789abcdef-super-secret-token"
    with LoopbackServer() as label_studio:
        label_studio.add("/data/upload/1/a.png", Route(b"denied", 401))
        settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                                 LABEL_STUDIO_URL=label_studio.base, LABEL_STUDIO_API_KEY=token)
        with BackendThread(create_app(settings)) as server, caplog.at_level(logging.DEBUG):
            server.wait_model()
            response = post(server, "/predict", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                                 "label_config": CONFIG, "project": "1.1"})
            reason = response.json()["results"][0]["error"]
            assert "HTTP 401" in reason and "LABEL_STUDIO_API_KEY" in reason
        assert label_studio.requests[0].headers["Authorization"] == f"Token {token}"
    assert token not in reason and token not in caplog.text


def predict_one(server, project: str, image: str) -> dict:
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG, "project": project}
    return post(server, "/predict", body).json()["results"][0]


def test_a_setup_host_is_trusted_for_its_own_project_and_origin_only(tiny_configs, tmp_path):
    """No LABEL_STUDIO_URL: each project reaches the Label Studio its /setup named, with that
    /setup's token. Another project's /setup host, and other ports of the host, stay refused."""
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             MODEL_DIR=tmp_path / "model-dir", IMAGE_URL_ALLOWLIST="",
                             SYNC_MODEL_VERSION=False)
    with (LoopbackServer("127.0.0.4") as label_studio, LoopbackServer("127.0.0.4") as same_host,
          LoopbackServer("127.0.0.3") as attacker, BackendThread(create_app(settings)) as server):
        server.wait_model()
        label_studio.add("/data/upload/1/a.jpg", Route(jpeg(), require_header=("Authorization", "Token t1")))
        same_host.add("/a.jpg", Route(jpeg()))
        attacker.add("/data/upload/2/b.jpg", Route(jpeg()))
        setup = {"schema": CONFIG, "hostname": label_studio.base, "access_token": "t1", "project": "1.1"}
        assert post(server, "/setup", setup).status_code == 200
        assert post(server, "/setup", {**setup, "project": "2.1", "hostname": attacker.base,
                                       "access_token": "t2"}).status_code == 200
        assert "result" in predict_one(server, "1.1", "/data/upload/1/a.jpg")
        for project, image in [("1.1", attacker.url("/data/upload/2/b.jpg")),  # project 2's host
                               ("1.1", same_host.url("/a.jpg")),                # another port
                               ("2.1", label_studio.url("/data/upload/1/a.jpg"))]:
            assert "loopback: refused" in predict_one(server, project, image)["error"], (project, image)
        assert "result" in predict_one(server, "2.1", "/data/upload/2/b.jpg")  # its own host
    assert [r.headers.get("Authorization") for r in label_studio.requests] == ["Token t1"]
    assert [r.headers.get("Authorization") for r in attacker.requests] == ["Token t2"]
    assert same_host.requests == []


def test_a_setup_token_is_not_sent_to_a_different_configured_url(tiny_configs, tmp_path):
    """LABEL_STUDIO_URL set, no key: a /setup token goes to LABEL_STUDIO_URL only when that
    /setup named the same origin."""
    with LoopbackServer() as label_studio:
        label_studio.add("/data/upload/1/a.jpg", Route(jpeg()))
        label_studio.add("/data/upload/1/b.jpg", Route(jpeg((0, 0, 200))))
        settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                                 MODEL_DIR=tmp_path / "model-dir", LABEL_STUDIO_URL=label_studio.base,
                                 SYNC_MODEL_VERSION=False)
        with BackendThread(create_app(settings)) as server:
            server.wait_model()
            setup = {"schema": CONFIG, "project": "1.1", "hostname": "http://attacker.example:8080",
                     "access_token": "from-elsewhere"}
            post(server, "/setup", setup)
            assert "result" in predict_one(server, "1.1", "/data/upload/1/a.jpg")
            post(server, "/setup", {**setup, "hostname": label_studio.base, "access_token": "t1"})
            assert "result" in predict_one(server, "1.1", "/data/upload/1/b.jpg")
    assert [r.headers.get("Authorization") for r in label_studio.requests] == [None, "Token t1"]
