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
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..config import Settings
from ..store.jobs import JobLedger, open_ledger
from .executors import rq_queue
from .predictor import LoadedPredictor, Task
from .work import Job, JobSpec, new_owner, work_item

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_WAIT_S = 900.0
CANCEL_WAIT_S = 30.0
"""How long an interrupted call waits for its coroutine to finish being cancelled."""
PUBSUB_STOP_S = 10.0
"""At most this long for RQ's pub/sub thread to end when the worker stops (it ends as soon as
its connection answers; this only bounds a Redis that stopped answering)."""


class RqRuntime:
    """The model and its event loop, kept for the RQ worker process's whole life."""

    def __init__(self, settings: Settings, build: Callable[[Settings], LoadedPredictor]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="worker-loop",
                                        daemon=True)
        self._thread.start()
        self.model = build(settings)
        self.ledger: JobLedger = open_ledger(self.model.store)
        self.owner = new_owner()
        self.call(self._start())

    async def _start(self) -> None:
        self.model.start()
        await self.model.wait_ready(MODEL_WAIT_S)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the worker's loop and wait for its result.

        RQ interrupts the waiting thread, not the loop: its job timeout (SIGALRM) and a cold
        shutdown (a second SIGTERM: SystemExit) raise here. The coroutine is then cancelled
        and waited for, so an item releases its claims at once: it no longer runs beside the
        next item, nor finds the decode processes shut down under it while the worker closes
        (which recorded its tasks as failed)."""
        ended = threading.Event()

        async def started() -> asyncio.Task[T]:
            task = asyncio.ensure_future(coroutine)
            task.add_done_callback(lambda _: ended.set())
            return task

        handle = asyncio.run_coroutine_threadsafe(started(), self.loop)
        try:
            ended.wait()
        except BaseException:
            task = handle.result(CANCEL_WAIT_S)
            self.loop.call_soon_threadsafe(task.cancel)
            if not ended.wait(CANCEL_WAIT_S):
                log.warning("an interrupted call did not end within %.0f s of its cancellation",
                            CANCEL_WAIT_S)
            raise
        return handle.result().result()

    def close(self) -> None:
        self.call(self.model.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


_RUNTIME: RqRuntime | None = None


def run_item(spec: dict[str, Any], tasks: list[Task]) -> dict[str, int]:
    """The RQ job: one work item, in a worker process that holds the model."""
    if _RUNTIME is None:
        raise RuntimeError("pre-label items need the model: run them with `python -m backend "
                           "worker`, not a plain `rq worker`")
    runtime = _RUNTIME
    job = Job(runtime.ledger, JobSpec(**spec), runtime.owner)
    return runtime.call(work_item(runtime.model, job, tasks))


def serve(settings: Settings, build: Callable[[Settings], LoadedPredictor], *,
          burst: bool = False) -> int:
    """Load the model (`build`: the composition root), then work items until stopped (or,
    with `burst`, the queue is empty)."""
    global _RUNTIME
    queue = rq_queue(settings)
    runtime = _RUNTIME = RqRuntime(settings, build)
    log.info("pre-label worker %s ready on queue %s (model %s)", runtime.owner, queue.name,
             runtime.model.model_label)
    try:
        worker = rq_worker(queue)
        worker.work(burst=burst, logging_level=logging.getLevelName(log.getEffectiveLevel()))
    finally:
        _RUNTIME = None
        runtime.close()
    return 0


def rq_worker(queue: Any) -> Any:
    """RQ's SimpleWorker for `queue` (items are worked in this process, which holds the model),
    whose stop does not wait on its pub/sub thread.

    That thread (RQ's remote commands: `rq.command.send_shutdown_command`…) reads with a 60 s
    timeout and checks between reads whether to stop. RQ unsubscribes first and asks it to stop
    after: when the unsubscribe reply was read in between, the thread waits out its whole
    timeout, and so did the worker's exit (redis-py >= 8 joins the thread in `stop()`): a
    SIGTERM'd idle worker took up to a minute to exit, past `docker stop`'s 10 s. Here the
    thread is told to stop first, then woken by the unsubscribe reply (or, waiting to be
    subscribed, by its event), and joined."""
    from redis.exceptions import RedisError
    from rq.worker import SimpleWorker

    class Worker(SimpleWorker):
        def unsubscribe(self) -> None:
            thread: Any = self.pubsub_thread
            pubsub: Any = self.pubsub
            if thread is None or pubsub is None:
                return
            self.log.info("Worker %s: unsubscribing from channel %s", self.name,
                          self.pubsub_channel_name)
            if "timeout" in inspect.signature(thread.stop).parameters:
                thread.stop(timeout=0)  # redis-py >= 8: clears its flag, then joins
            else:
                thread.stop()  # clears its flag
            pubsub.subscribed_event.set()  # a thread waiting to be subscribed reads now
            try:
                pubsub.unsubscribe()  # the reply wakes a thread waiting for a message
            except RedisError as exc:  # it reads the same error, and stops
                self.log.warning("Worker %s: unsubscribing failed: %s", self.name, exc)
            thread.join(PUBSUB_STOP_S)
            pubsub.close()

    return Worker([queue], connection=queue.connection, serializer=queue.serializer)
