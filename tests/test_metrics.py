"""`/metrics` as Prometheus scrapes it: parsed with prometheus_client's own parser after a
/predict and a webhook, every counter of that round trip has moved."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from backend.errors import StoreUnavailable
from backend.metrics import WEBHOOK_ACTIONS
from backend.store.redis import RedisStore
from backend.web.app import create_app

from .support.backend_server import BackendThread
from .support.http_server import Route
from .support.redis_server import free_port
from .support.webhooks import annotation_event, choice_result
from .web.test_app import CONFIG, jpeg

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(found for (sample, sample_labels), found in samples.items()
               if sample == name and set(labels.items()) <= sample_labels)


@pytest.fixture
def backend(tiny_settings):
    with BackendThread(create_app(tiny_settings)) as server:
        server.wait_model()
        yield server


def test_a_predict_and_webhook_round_trip_moves_the_counters(backend, loopback):
    images = [loopback.add(f"/{i}.jpg", Route(jpeg(colour=(40 * i, 200, 30)),
                                              content_type="image/jpeg")) for i in range(3)]
    before = scrape(backend.url)
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(images, start=1)]
    body = {"tasks": tasks, "label_config": CONFIG, "project": "5.1"}
    assert httpx.post(backend.url + "/predict", json=body, timeout=60).status_code == 200
    event = annotation_event(1, 1, choice_result("red", control="label"), project_id=5,
                             image=images[0])
    assert httpx.post(backend.url + "/webhook", json=event, timeout=30).status_code == 200
    after = scrape(backend.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("backend_http_requests_total", route="/predict", status="200") == 1
    assert moved("backend_http_requests_total", route="/webhook", status="200") == 1
    assert moved("backend_http_request_duration_seconds_count", route="/predict") == 1
    assert moved("backend_predict_tasks_total", outcome="ok") == 3
    assert moved("backend_images_encoded_total") == 3
    assert moved("backend_embedding_cache_lookups_total", result="miss") == 3
    assert moved("backend_text_cache_lookups_total") > 0
    assert moved("backend_inference_batch_size_count") >= 1
    assert moved("backend_inference_batch_size_sum") == 3
    assert moved("backend_corrections_logged_total") == 1
    assert moved("backend_webhook_events_total", action="ANNOTATION_CREATED") == 1
    assert value(after, "backend_model_ready") == 1
    assert ("backend_model_load_seconds", frozenset()) in after


def test_store_errors_are_counted():
    def errors() -> float:
        return REGISTRY.get_sample_value("backend_store_errors_total", {"store": "redis"}) or 0.0

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nothing listens
    before = errors()
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.close()
    assert errors() == before + 1


def test_junk_webhook_actions_share_one_series_and_the_spool_replay_is_visible(backend):
    before = scrape(backend.url)
    for number in range(30):
        body = {"action": f"JUNK_ACTION_{number}", "project": {"id": 5}}
        assert httpx.post(backend.url + "/webhook", json=body, timeout=30).status_code == 200
    after = scrape(backend.url)
    actions = {dict(labels)["action"] for name, labels in after
               if name == "backend_webhook_events_total"}
    assert actions <= WEBHOOK_ACTIONS | {"other"}
    assert value(after, "backend_webhook_events_total", action="other") - value(
        before, "backend_webhook_events_total", action="other") == 30
    assert value(after, "backend_spool_replay_alive") == 1
    assert value(after, "backend_spooled_entries") == 0
    assert ("backend_spool_replay_restarts_total", frozenset()) in after
    assert ("backend_spool_dead_letters_total", frozenset()) in after
