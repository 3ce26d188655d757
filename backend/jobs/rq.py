"""RQ workers for pre-label jobs: `python -m backend worker` on any machine that reaches Redis.

Each worker process loads the model once, then works items (a job's spec and up to
PRELABEL_ITEM_TASKS tasks) from the RQ queue `{STORE_PREFIX}-prelabel` in the shared Redis.
Done tasks, failures and claims go to the job ledger in the same Redis, so any number of
workers share one job and each task is worked once. Items are JSON, not pickles: whoever can
write to Redis still cannot make a worker run code.

    python -m backend worker            # until SIGTERM/SIGINT (the item in hand is finished)
    python -m backend worker --burst    # until the queue is empty
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any, TypeVar

from ..config import Settings
from ..errors import ConfigError
from ..store.jobs import JobLedger, open_ledger
from .prelabel import JobSpec, Task, new_owner, work_item

log = logging.getLogger(__name__)
T = TypeVar("T")

ITEM_TIMEOUT_S = 900
"""RQ stops an item after this long (a stuck download cannot hold a worker forever)."""
MODEL_WAIT_S = 900.0


def queue_name(settings: Settings) -> str:
    return f"{settings.STORE_PREFIX}-prelabel"


def _queue(settings: Settings) -> Any:
    if not settings.REDIS_URL:
        raise ConfigError("pre-label workers share jobs through Redis: set REDIS_URL (the same "
                          "on the backend and every worker), or use the local executor")
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = Redis.from_url(settings.REDIS_URL, socket_timeout=30)
    return Queue(queue_name(settings), connection=connection, serializer=JSONSerializer)


def enqueuer(settings: Settings) -> Callable[[JobSpec, list[Task]], None]:
    """A function that puts one work item on the queue."""
    queue = _queue(settings)

    def enqueue(spec: JobSpec, tasks: list[Task]) -> None:
        queue.enqueue("backend.worker.run_item", asdict(spec), tasks,
                      job_timeout=ITEM_TIMEOUT_S, result_ttl=3600, failure_ttl=7 * 86400,
                      description=f"pre-label job {spec.id}: {len(tasks)} tasks")

    return enqueue


class WorkerRuntime:
    """The model and its event loop, kept for the worker process's whole life."""

    def __init__(self, settings: Settings) -> None:
        from ..runtime import Backend

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="worker-loop",
                                        daemon=True)
        self._thread.start()
        self.model = Backend(settings)
        self.ledger: JobLedger = open_ledger(self.model.store)
        self.owner = new_owner()
        self.call(self._start())

    async def _start(self) -> None:
        self.model.start()
        await self.model.wait_ready(MODEL_WAIT_S)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.call(self.model.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


_RUNTIME: WorkerRuntime | None = None


def run_item(spec: dict[str, Any], tasks: list[Task]) -> dict[str, int]:
    """The RQ job: one work item, in a worker process that holds the model."""
    if _RUNTIME is None:
        raise RuntimeError("pre-label items need the model: run them with `python -m backend "
                           "worker`, not a plain `rq worker`")
    runtime = _RUNTIME
    return runtime.call(work_item(runtime.model, runtime.ledger, JobSpec(**spec), tasks,
                                  runtime.owner))


def serve(settings: Settings, *, burst: bool = False) -> int:
    """Load the model, then work items until stopped (or, with `burst`, the queue is empty)."""
    global _RUNTIME
    from rq.worker import SimpleWorker

    queue = _queue(settings)
    runtime = _RUNTIME = WorkerRuntime(settings)
    log.info("pre-label worker %s ready on queue %s (model %s)", runtime.owner, queue.name,
             runtime.model.model_label)
    try:
        worker = SimpleWorker([queue], connection=queue.connection,
                              serializer=queue.serializer)
        worker.work(burst=burst, logging_level=logging.getLevelName(log.getEffectiveLevel()))
    finally:
        _RUNTIME = None
        runtime.close()
    return 0
