"""RQ workers (backend/jobs/rq.py) with the data plane: an item that RQ interrupts in the worker
(its job timeout, a cold shutdown) is cancelled on the worker's event loop, so its tasks are free
again at once and not recorded as failed; closing the worker stops the decode processes and
frees their shared memory; a stopping worker does not wait on RQ's pub/sub thread."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import signal
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image
from redis.client import PubSub
from rq.timeouts import JobTimeoutException

from backend.config import load_settings
from backend.jobs import rq
from backend.jobs.executors import rq_queue
from backend.jobs.work import JobSpec
from backend.runtime import Backend

from ..support.http_server import Recorded, Route
from ..support.waiting import eventually

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="a"/><Choice value="b"/></Choices></View>')
SAFETY_S = 120.0
"""Only against a hung test: every wait here ends on an event long before."""


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def mapped_shared_memory() -> set[Path]:
    """The multiprocessing shared-memory segments this process has mapped."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {Path(line.split()[-1]) for line in lines if "/dev/shm/psm_" in line}


def decode_processes() -> list[multiprocessing.process.BaseProcess]:
    return [child for child in multiprocessing.active_children()
            if child.name.startswith("decode-")]


async def items_on_the_loop() -> list[str]:
    return [task.get_name() for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__name__", "") == "work_item"]


@pytest.mark.parametrize("interruption", [JobTimeoutException, SystemExit],
                         ids=["job-timeout", "cold-shutdown"])
def test_an_item_interrupted_in_the_worker_is_cancelled_and_its_tasks_released(
        interruption, tiny_configs, redis_url, loopback, tmp_path, monkeypatch):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             MODEL_DIR=tmp_path / "model-dir", REDIS_URL=redis_url,
                             DECODE_PROCESSES=1)
    requested, answer = threading.Event(), threading.Event()

    def held(record: Recorded) -> Route:  # the decode process's download waits here
        requested.set()
        answer.wait(SAFETY_S)
        return Route(jpeg(), content_type="image/jpeg")

    url = loopback.add("/held.jpg", held)
    spec = JobSpec(id="3-rq", project="3", model_version="v", label_config=CONFIG,
                   head="zero-shot")
    main = threading.get_ident()

    def interrupt(signum: int, frame: object) -> None:  # as RQ's SIGALRM or SIGTERM handler
        raise interruption("interrupted by the test")

    def interrupt_once_downloading() -> None:
        if requested.wait(SAFETY_S):
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    runtime = rq.RqRuntime(settings, Backend)
    monkeypatch.setattr(rq, "_RUNTIME", runtime)
    try:
        threading.Thread(target=interrupt_once_downloading, daemon=True).start()
        with pytest.raises(interruption):
            rq.run_item(asdict(spec), [{"id": 7, "data": {"image": url}}])
        signal.signal(signal.SIGUSR1, previous)

        assert runtime.ledger.holders(spec.id, ["7"]) == {}  # another worker may take it now
        assert runtime.ledger.done(spec.id) == set()
        assert runtime.ledger.failures(spec.id) == {}
        assert runtime.call(items_on_the_loop()) == []  # not running beside the next item
        pids, segments = [child.pid for child in decode_processes()], mapped_shared_memory()
        assert len(pids) == 1 and segments  # the item went through the data plane
    finally:
        signal.signal(signal.SIGUSR1, previous)
        answer.set()
        runtime.close()
    assert decode_processes() == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # stopped and reaped
    assert not any(segment.exists() for segment in segments)


@pytest.fixture
def reader_without_timeout(monkeypatch):
    """RQ's pub/sub thread waits for a message with no timeout (RQ gives it 60 s, and a stopping
    worker waited them out): a stop that relied on that timeout would hang here."""
    original = PubSub.run_in_thread

    def run_in_thread(self, sleep_time=0.0, **kwargs):  # type: ignore[no-untyped-def]
        return original(self, sleep_time=None, **kwargs)

    monkeypatch.setattr(PubSub, "run_in_thread", run_in_thread)


@pytest.mark.parametrize("reader", ["reading", "unsubscribed-first"])
def test_a_stopping_worker_does_not_wait_on_rqs_pubsub_thread(reader, redis_url,
                                                               reader_without_timeout):
    worker = rq.rq_worker(rq_queue(load_settings(REDIS_URL=redis_url)))
    worker.subscribe()
    thread = worker.pubsub_thread
    if reader == "unsubscribed-first":  # RQ's order: the reply read before the thread is told
        worker.pubsub.unsubscribe()    # to stop, it waited to be subscribed again
        assert eventually(lambda: not worker.pubsub.subscribed)
    worker.unsubscribe()  # as the worker's teardown calls it
    assert not thread.is_alive()
    assert worker.pubsub.connection is None  # closed
