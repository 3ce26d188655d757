"""Graceful stop: SIGTERM (what `docker stop` sends) in the middle of a /predict batch lets the
batch finish and answer, the process exits 0, and corrections spooled while Redis was down
stay on disk and reach Redis once it is back. The journal's stop makes one last replay."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx

from backend.config import load_settings
from backend.corrections.entries import entries_from_webhook
from backend.corrections.journal import Journal
from backend.store import open_store
from backend.store.redis import RedisStore

from .support.backend_process import BackendProcess
from .support.http_server import LoopbackServer, Route
from .support.redis_server import RedisServer, free_port
from .support.waiting import eventually
from .support.webhooks import annotation_event, choice_result
from .web.test_app import CONFIG, jpeg

IMAGES = 6
IMAGE_DELAY_S = 2.0
"""Each image takes this long to arrive: SIGTERM lands while the batch waits for them."""


def annotations_in(url: str) -> list[str]:
    store = RedisStore(url)
    try:
        return [event["annotation"] for event in store.events()]
    finally:
        store.close()


def test_journal_stop_replays_the_spool_once_the_store_is_back(tmp_path: Path):
    redis = RedisServer(tmp_path / "redis", port=free_port())
    store = RedisStore(redis.url, timeout_s=0.2)
    journal = Journal(store, tmp_path / "spool", retry_s=3600)  # no replay but the last one
    journal.start()
    journal.write(entries_from_webhook(annotation_event(1, 11, choice_result("Cat"))))
    assert journal.pending == 1  # Redis is not running yet: spooled
    with redis:
        journal.stop()
        assert journal.pending == 0
        assert annotations_in(redis.url) == ["1"]
    store.close()


def test_sigterm_finishes_the_batch_exits_0_and_keeps_spooled_corrections(
        tmp_path: Path, tiny_configs: dict[str, Path], loopback: LoopbackServer):
    redis_port = free_port()  # Redis is down for this process's whole life
    env = {"MODEL_CONFIG": str(tiny_configs["clip"]), "MODEL_PRETRAINED": "none",
           "MODEL_DIR": str(tmp_path / "state"), "LOG_FORMAT": "json",
           "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "REDIS_TIMEOUT_S": "0.2"}
    urls = [loopback.add(f"/{i}.jpg", Route(jpeg(colour=(30 * i, 90, 200)),
                                            content_type="image/jpeg", delay_s=IMAGE_DELAY_S))
            for i in range(IMAGES)]
    with BackendProcess(env, tmp_path / "backend.log") as backend:
        webhook = httpx.post(backend.url + "/webhook", timeout=30,
                             json=annotation_event(7, 70, choice_result("Dog")))
        assert webhook.status_code == 200 and webhook.json()["recorded"] == 1
        answer: dict[str, httpx.Response] = {}
        predict = threading.Thread(target=_predict, args=(backend.url, urls, answer))
        predict.start()
        assert eventually(lambda: len(loopback.requests) == IMAGES, timeout=30)
        status = backend.stop()
        predict.join(60)
    response = answer["response"]
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == IMAGES and all(result.get("result") for result in results)
    assert status == 0
    lines = _log_lines(tmp_path / "backend.log")
    assert any(line.get("request_id") == "stop-1" and "POST /predict" in line["message"]
               for line in lines)
    assert any(line["message"].endswith("left in the spool for the next start: 1") for line in lines)
    _replayed_when_redis_is_back(env, redis_port, tmp_path)


def _predict(url: str, images: list[str], answer: dict[str, httpx.Response]) -> None:
    tasks = [{"id": i, "data": {"image": image}} for i, image in enumerate(images, start=1)]
    answer["response"] = httpx.post(url + "/predict", timeout=90,
                                    json={"tasks": tasks, "label_config": CONFIG},
                                    headers={"X-Request-ID": "stop-1"})


def _log_lines(path: Path) -> list[dict[str, str]]:
    """The JSON log lines (library warnings printed outside logging are not JSON)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _replayed_when_redis_is_back(env: dict[str, str], port: int, tmp_path: Path) -> None:
    settings = load_settings(REDIS_URL=env["REDIS_URL"], MODEL_DIR=env["MODEL_DIR"])
    with RedisServer(tmp_path / "redis", port=port):
        journal = Journal(open_store(settings), settings.MODEL_DIR / "spool", retry_s=0.1)
        assert journal.pending == 1
        journal.start()
        try:
            assert eventually(lambda: journal.pending == 0, timeout=30)
        finally:
            journal.stop()
        assert annotations_in(env["REDIS_URL"]) == ["7"]
