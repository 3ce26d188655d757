"""Who works a job's items, chosen by name (PRELABEL_EXECUTOR, or per job), the way rq resolves
its serializer: `resolve_executor("local" | "rq")`.

- `local`: this process, PRELABEL_PARALLEL items at a time (the CLI, or the server in the
  background); the planner waits for them.
- `rq`: items go on the RQ queue `{STORE_PREFIX}-prelabel` in the shared Redis, for RQ workers
  on any machine (jobs/rq.py); the planner does not wait. Items are JSON, not pickles:
  whoever can write to Redis still cannot make a worker run code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal, Protocol

from ..config import Settings
from ..errors import ConfigError
from .predictor import Predictor, Task
from .work import Job, work_item

log = logging.getLogger(__name__)

ExecutorName = Literal["local", "rq"]
ITEM_TIMEOUT_S = 900
"""RQ stops an item after this long (a stuck download cannot hold a worker forever)."""
RUN_ITEM = "backend.jobs.rq.run_item"
"""The function an RQ worker runs for each item, by name."""


class Executor(Protocol):
    async def submit(self, tasks: list[Task]) -> None:
        """Hand over one work item (waits while the executor is full)."""
        ...

    async def join(self) -> None:
        """After the last item: wait for the items this process works (none for RQ)."""
        ...


class LocalExecutor:
    """Items worked here by PRELABEL_PARALLEL coroutines; a failed item stops the job, and the
    queue keeps draining."""

    def __init__(self, predictor: Predictor, job: Job) -> None:
        self._predictor = predictor
        self._job = job
        parallel = predictor.settings.PRELABEL_PARALLEL
        self._items: asyncio.Queue[list[Task] | None] = asyncio.Queue(parallel)
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(parallel)]

    async def submit(self, tasks: list[Task]) -> None:
        await self._items.put(tasks)

    async def join(self) -> None:
        for _ in self._workers:
            await self._items.put(None)
        await asyncio.gather(*self._workers)

    async def _work(self) -> None:
        while (tasks := await self._items.get()) is not None:
            try:
                await work_item(self._predictor, self._job, tasks)
            except Exception as exc:  # noqa: BLE001 - stop the job, keep draining the queue
                log.exception("pre-label job %s: a batch failed", self._job.spec.id)
                with contextlib.suppress(Exception):
                    await self._job.update(error=f"{type(exc).__name__}: {exc}")


class RqExecutor:
    """Items put on the RQ queue, for `python -m backend worker` processes."""

    def __init__(self, predictor: Predictor, job: Job) -> None:
        self._queue = rq_queue(predictor.settings)
        self._job = job

    async def submit(self, tasks: list[Task]) -> None:
        await asyncio.to_thread(self._enqueue, tasks)

    async def join(self) -> None:
        return None

    def _enqueue(self, tasks: list[Task]) -> None:
        spec = self._job.spec
        self._queue.enqueue(RUN_ITEM, asdict(spec), tasks, job_timeout=ITEM_TIMEOUT_S,
                            result_ttl=3600, failure_ttl=7 * 86400,
                            description=f"pre-label job {spec.id}: {len(tasks)} tasks")


EXECUTORS: dict[str, Callable[[Predictor, Job], Executor]] = {
    "local": LocalExecutor, "rq": RqExecutor}


def resolve_executor(name: str) -> Callable[[Predictor, Job], Executor]:
    """The executor named `name`, to build for one job."""
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ConfigError(f"unknown pre-label executor {name!r}: use one of "
                          f"{', '.join(EXECUTORS)} (PRELABEL_EXECUTOR)") from None


def queue_name(settings: Settings) -> str:
    return f"{settings.STORE_PREFIX}-prelabel"


def rq_queue(settings: Settings) -> Any:
    """The RQ queue of pre-label items in the shared Redis."""
    if not settings.REDIS_URL:
        raise ConfigError("pre-label workers share jobs through Redis: set REDIS_URL (the same "
                          "on the backend and every worker), or use the local executor")
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = Redis.from_url(settings.REDIS_URL, socket_timeout=30)
    return Queue(queue_name(settings), connection=connection, serializer=JSONSerializer)
