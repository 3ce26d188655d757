"""The embed phase's store traffic: a /predict of N images writes the store a fixed number of
times whatever N (up to one group of DECODED_PER_BATCH encoder batches), and reads it once by
reference and once per encoder batch of decoded images (so decoding and encoding overlap), on
either store. Counted on the real store through the real app; images from a real HTTP
server."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from backend.config import Settings
from backend.predict.embed import DECODED_PER_BATCH, Slots
from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.counting_store import count_calls
from ..support.http_server import LoopbackServer, Route

BATCH = 8
GROUP = DECODED_PER_BATCH * BATCH
"""Images per group: each group is one store write."""
WRITES = ("put_embeddings", "put_image_refs", "put_predictions")
NUMBERS = itertools.count()
"""Image numbers: every image a test serves is new, across backends."""
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="blue"/></Choices></View>')
OTHER_CONFIG = CONFIG.replace('<Choice value="blue"/>', '<Choice value="blue"/><Choice value="grey"/>')


def png(number: int) -> bytes:
    """A distinct image per number (distinct bytes, distinct embedding key)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (number % 256, number // 256, 128)).save(buffer, "PNG")
    return buffer.getvalue()


class Counted:
    """The backend on a loopback port, its store's calls counted per /predict."""

    def __init__(self, backend: BackendThread, images: LoopbackServer) -> None:
        self.backend, self.images = backend, images
        self.calls = count_calls(backend.app.state.backend.store)

    def new_images(self, count: int) -> list[str]:
        numbers = [next(NUMBERS) for _ in range(count)]
        return [self.images.add(f"/{n}.png", Route(png(n), content_type="image/png"))
                for n in numbers]

    def predict(self, urls: list[str], config: str = CONFIG) -> Counter[str]:
        """The store calls one /predict of these images made (each task predicted), less the
        project's active head: read at most once a request, when its cache of ACTIVE_CACHE_S
        (a clock, not the request) says so."""
        results = self.results(urls, config)
        assert all(result["result"] for result in results)
        assert self.calls["active_head"] <= 1
        return Counter({name: n for name, n in self.calls.items() if name != "active_head"})

    def results(self, urls: list[str], config: str = CONFIG) -> list[dict[str, Any]]:
        self.calls.clear()
        tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls, start=1)]
        response = httpx.post(self.backend.url + "/predict", timeout=120,
                              json={"tasks": tasks, "label_config": config, "project": "1.1"})
        assert response.status_code == 200, response.text
        return list(response.json()["results"])


@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tiny_settings: Settings) -> Settings:
    update: dict[str, Any] = {"BATCH_SIZE": BATCH}
    if request.param == "redis":
        update["REDIS_URL"] = request.getfixturevalue("redis_url")
    return tiny_settings.model_copy(update=update)


@contextmanager
def counted(settings: Settings, loopback: LoopbackServer, **update: Any) -> Iterator[Counted]:
    with BackendThread(create_app(settings.model_copy(update=update))) as backend:
        backend.wait_model()
        yield Counted(backend, loopback)


@pytest.fixture
def server(settings: Settings, loopback: LoopbackServer) -> Iterator[Counted]:
    with counted(settings, loopback) as served:
        yield served


@pytest.fixture
def server_without_ref_cache(settings: Settings, loopback: LoopbackServer) -> Iterator[Counted]:
    with counted(settings, loopback, IMAGE_REF_TTL_S=0) as served:
        yield served


def lookups() -> dict[str, float]:
    return {result: REGISTRY.get_sample_value("backend_embedding_cache_lookups_total",
                                              {"result": result}) or 0.0
            for result in ("hit", "miss")}


def writes(calls: Counter[str]) -> dict[str, int]:
    return {name: calls[name] for name in WRITES}


def test_new_images_cost_the_same_store_writes_for_4_and_24(server):
    few, many = server.predict(server.new_images(4)), server.predict(server.new_images(24))
    assert writes(few) == writes(many) == {"put_embeddings": 1, "put_image_refs": 0,
                                           "put_predictions": 1}  # phase 5 and the journal
    assert few["embeddings_for_refs"] == many["embeddings_for_refs"] == 1  # phase 1
    assert (few["embeddings"], many["embeddings"]) == (1, 3)  # phase 3: per encoder batch
    assert not {"get_embedding", "put_embedding", "put_image_ref", "put_prediction"} & set(few)


def test_images_known_by_reference_cost_the_same_store_calls_for_4_and_24(server):
    few, many = server.new_images(4), server.new_images(24)
    server.predict(few), server.predict(many)
    assert server.predict(few, OTHER_CONFIG) == server.predict(many, OTHER_CONFIG)
    assert server.calls["embeddings_for_refs"] == 1 and server.calls["embeddings"] == 0


def test_images_known_by_content_cost_the_same_store_calls_for_4_and_24(
        server_without_ref_cache):
    server = server_without_ref_cache  # every image is downloaded and hashed again
    few, many = server.new_images(4), server.new_images(24)
    server.predict(few), server.predict(many)
    again_few, again_many = server.predict(few, OTHER_CONFIG), server.predict(many, OTHER_CONFIG)
    assert writes(again_few) == writes(again_many) == {"put_embeddings": 0, "put_image_refs": 1,
                                                       "put_predictions": 1}
    assert (again_few["embeddings"], again_many["embeddings"]) == (1, 3)


def test_a_request_larger_than_a_group_writes_once_per_group(server):
    calls = server.predict(server.new_images(GROUP + 1))
    assert calls["embeddings"] == DECODED_PER_BATCH + 1 and calls["put_embeddings"] == 2
    assert calls["embeddings_for_refs"] == 1 and calls["put_predictions"] == 1


def test_stored_bytes_that_no_longer_decode_are_still_scored_and_a_new_one_fails_alone(
        server_without_ref_cache):
    """Every fetched image is decoded before the store is read; one whose bytes have a stored
    embedding is scored from it even if decoding it now fails (MAX_IMAGE_PIXELS lowered), as
    before; a new image that fails to decode fails only its task, counted as a miss."""
    server = server_without_ref_cache
    known = server.new_images(1)
    server.predict(known)
    embedder = server.backend.app.state.backend.embedder
    embedder.settings = embedder.settings.model_copy(update={"MAX_IMAGE_PIXELS": 100})

    async def restart_plane() -> None:  # decode processes take their settings when they start
        if embedder._plane is not None:
            embedder._plane.close()
            embedder._plane = None

    server.backend.call(restart_plane())
    before = lookups()
    scored, failed = server.results([*known, *server.new_images(1)])
    after = lookups()
    assert scored["result"] and "result" not in failed and "DecodeError" in failed["error"]
    assert {result: after[result] - before[result] for result in after} == {"hit": 1, "miss": 1}


def test_groups_take_their_slots_in_turn_so_none_waits_on_another():
    """Three groups that each finish only once they hold all their slots, 7 slots wanted of 3:
    taken one by one they would each hold one and wait for ever; in turn, all finish."""
    slots, order = Slots(3), []

    async def group(name: str, size: int) -> None:
        held = slots.group()
        async with held.taking:
            for _ in range(size):
                await held.take()
                order.append(name)
                await asyncio.sleep(0)  # let the other groups try to take
        held.release_all()

    async def all_groups() -> None:
        await asyncio.wait_for(asyncio.gather(group("a", 2), group("b", 2), group("c", 3)), 30)

    asyncio.run(all_groups())
    assert order == ["a", "a", "b", "b", "c", "c", "c"]
