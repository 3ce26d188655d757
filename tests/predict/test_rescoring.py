"""Re-scoring known images: within IMAGE_REF_TTL_S of its last download, an image reference
whose embedding is stored is neither downloaded nor encoded again, on either store. Images are
served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from backend.config import Settings
from backend.store import embedding_key
from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.http_server import LoopbackServer, Route
from ..support.redis_server import free_port

COLOURS = ("red", "green", "blue")
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          + "".join(f'<Choice value="{c}"/>' for c in COLOURS) + "</Choices></View>")
NEW_LABEL = CONFIG.replace('<Choice value="blue"/>', '<Choice value="blue"/><Choice value="grey"/>')


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, "PNG")
    return buffer.getvalue()


def counters() -> dict[str, float]:
    names = ("backend_images_fetched_total", "backend_images_encoded_total")
    return {name.split("_")[2]: REGISTRY.get_sample_value(name) or 0.0 for name in names}


class Served:
    """The backend on a loopback port, and a /predict that reports what it cost."""

    def __init__(self, backend: BackendThread, images: LoopbackServer) -> None:
        self.backend, self.images = backend, images

    def predict(self, urls: list[str], config: str = CONFIG) -> tuple[list[Any], dict[str, float]]:
        """Results, and the images downloaded and encoded meanwhile."""
        before, requests = counters(), len(self.images.requests)
        tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls, start=1)]
        response = httpx.post(self.backend.url + "/predict", timeout=60,
                              json={"tasks": tasks, "label_config": config, "project": "1.1"})
        assert response.status_code == 200, response.text
        cost = {name: after - before[name] for name, after in counters().items()}
        assert cost["fetched"] == len(self.images.requests) - requests
        return response.json()["results"], cost


@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tiny_settings: Settings) -> Settings:
    if request.param == "redis":
        # The embedding cache is skipped when a Redis call times out (it is an optimisation):
        # the default 0.5 s can pass on a busy machine, and these tests count cache hits.
        return tiny_settings.model_copy(update={"REDIS_URL": request.getfixturevalue("redis_url"),
                                                "REDIS_TIMEOUT_S": 5.0})
    return tiny_settings


@contextmanager
def serve(settings: Settings, loopback: LoopbackServer, **update: Any) -> Iterator[Served]:
    with BackendThread(create_app(settings.model_copy(update=update))) as backend:
        backend.wait_model()
        yield Served(backend, loopback)


@pytest.fixture
def served(settings: Settings, loopback: LoopbackServer) -> Iterator[Served]:
    with serve(settings, loopback) as server:
        yield server


def images(loopback: LoopbackServer, count: int = 4) -> list[str]:
    return [loopback.add(f"/{i}.png", Route(png((60 * i, 90, 200 - 40 * i)), content_type="image/png"))
            for i in range(count)]


def top(results: list[Any]) -> list[tuple[str, float]]:
    """Each task's top choice and score, to 2 decimals (stored embeddings are float16)."""
    return [(r["result"][0]["value"]["choices"][0], round(r["score"], 2)) for r in results]


def test_rescoring_after_a_label_change_downloads_and_encodes_nothing(served, loopback):
    urls = images(loopback)
    first, cost = served.predict(urls)
    assert cost == {"fetched": 4, "encoded": 4}
    again, cost = served.predict(urls + urls[:1], NEW_LABEL)  # a new label, a repeated image
    assert cost == {"fetched": 0, "encoded": 0}
    assert len(again) == 5 and all(r["result"] for r in again)
    same, cost = served.predict(urls)
    assert cost == {"fetched": 0, "encoded": 0} and top(same) == top(first)


class Clock:
    """The backend's clock, moved forward by the test instead of slept through."""

    def __init__(self) -> None:
        self.shift = 0.0

    def time(self) -> float:
        return time.time() + self.shift

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_an_image_replaced_behind_its_url_is_seen_only_after_the_ttl(settings, loopback,
                                                                     monkeypatch):
    clock = Clock()
    for module in ("backend.predict.embed", "backend.store.sqlite", "backend.store.redis"):
        monkeypatch.setattr(f"{module}.time", clock)
    urls = images(loopback, 2)
    with serve(settings, loopback, IMAGE_REF_TTL_S=60) as served:
        first, cost = served.predict(urls)
        replaced = png((250, 250, 250))
        loopback.add("/0.png", Route(replaced, content_type="image/png"))
        stale, cost = served.predict(urls)  # within the TTL: the old image's embedding
        assert cost == {"fetched": 0, "encoded": 0} and top(stale) == top(first)
        clock.shift = 61.0
        fresh, cost = served.predict(urls)
        assert cost == {"fetched": 2, "encoded": 1}  # the unchanged one is only hashed
        assert top(fresh)[1] == top(first)[1]
        model = served.backend.app.state.backend
        assert model.store.embedding_key_for(model.embedding_model, urls[0]) == embedding_key(
            model.embedding_model, replaced)
        _, cost = served.predict(urls)  # each download counts as a new check
        assert cost == {"fetched": 0, "encoded": 0}


def test_ttl_zero_downloads_every_time_but_encodes_once(settings, loopback):
    urls = images(loopback)
    with serve(settings, loopback, IMAGE_REF_TTL_S=0) as served:
        assert served.predict(urls)[1] == {"fetched": 4, "encoded": 4}
        assert served.predict(urls, NEW_LABEL)[1] == {"fetched": 4, "encoded": 0}


def test_data_uris_are_hashed_not_looked_up(served):
    import base64

    uri = "data:image/png;base64," + base64.b64encode(png((10, 200, 10))).decode()
    assert served.predict([uri])[1] == {"fetched": 0, "encoded": 1}
    results, cost = served.predict([uri], NEW_LABEL)
    assert cost == {"fetched": 0, "encoded": 0} and results[0]["result"]


def test_predictions_carry_on_when_the_store_is_down(tiny_settings, loopback):
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    urls = images(loopback, 2)
    with serve(tiny_settings, loopback, REDIS_URL=down, REDIS_TIMEOUT_S=0.2) as served:
        for _ in range(2):
            results, cost = served.predict(urls)
            assert cost == {"fetched": 2, "encoded": 2} and all(r["result"] for r in results)
