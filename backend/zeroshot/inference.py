"""The inference thread: the only thread that touches the model.

Requests never run the model on the event loop. They submit work here and await a future:
- `encode(fn, item)`: one image tensor; items from concurrent requests that use the same `fn`
  are merged into one batch of at most `max_batch`, waiting at most `wait_s` for it to fill;
- `call(fn, *args)`: anything else (loading the model, encoding prompts), run between batches.

Work is taken in priority order, then in order of arrival: Label Studio's requests
(`FOREGROUND`) go ahead of background pre-label jobs (`BACKGROUND`), which wait at most for the
batch already running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .. import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
FOREGROUND, BACKGROUND = 0, 1
_LAST = 2  # the stop marker: after all queued work

BatchFn = Callable[[torch.Tensor], torch.Tensor]

BACKGROUND_NICE = 10
"""Niceness added to the threads that saturate the CPUs (model, decoding): the event loop keeps
answering /health and webhooks within milliseconds while they run."""


def lower_priority(nice: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's CPU priority, and that of the threads it starts from now on
    (such as PyTorch's OpenMP pool): on Linux, niceness is per thread and inherited."""
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox may forbid it: run at normal priority
        log.debug("could not lower thread priority: %s", exc)


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)
    batchable: bool = False
    waiter: asyncio.Future[Any] | None = None
    """A batch item's future, on its caller's event loop: a batch wakes each loop once, where
    a concurrent Future per item would wake it once per item."""

    def claim(self) -> bool:
        """False if the caller gave up before the work started (it is skipped)."""
        if self.waiter is not None:
            return not self.waiter.cancelled()
        return self.future.set_running_or_notify_cancel()


_Entry = tuple[int, int, "_Job | None"]  # (priority, arrival, job); None stops the thread


class InferenceThread:
    """A single daemon thread that drains a queue of model work."""

    def __init__(self, max_batch: int, wait_s: float, name: str = "inference",
                 nice: int = BACKGROUND_NICE) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.nice = nice
        self._queue: queue.PriorityQueue[_Entry] = queue.PriorityQueue()
        self._held: deque[_Entry] = deque()
        self._arrivals = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work already queued, then end the thread."""
        self._put(_LAST, None)
        self._thread.join(timeout)

    def _put(self, priority: int, job: _Job | None) -> None:
        self._queue.put((priority, next(self._arrivals), job))

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        job = _Job(fn, args)
        self._put(FOREGROUND, job)
        return job.future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def encode(self, fn: BatchFn, item: torch.Tensor,
                     priority: int = FOREGROUND) -> torch.Tensor:
        """Run `fn` on `item` (one sample, no batch dim) inside a shared batch; return its row."""
        waiter: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._put(priority, _Job(fn, (item,), batchable=True, waiter=waiter))
        return await waiter

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def _next(self, timeout: float | None = None) -> _Entry:
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        lower_priority(self.nice)  # before the model's first op starts PyTorch's thread pool
        while True:
            _, _, job = self._next()
            if job is None:
                return
            if job.batchable:
                self._run_batch(self._gather(job))
            else:
                self._run_call(job)

    def _gather(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                entry = self._next(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            job = entry[2]
            # `!=`, not `is not`: each `encoder.encode_images` access is a new bound method
            if job is None or not job.batchable or job.fn != first.fn:
                self._held.appendleft(entry)
                break
            batch.append(job)
        return batch

    def _run_batch(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.claim()]
        if not live:
            return
        try:
            out = live[0].fn(torch.stack([job.args[0] for job in live]))
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            log.exception("inference batch of %d failed", len(live))
            _deliver_all([(job, None, exc) for job in live])
            return
        self.batches += 1
        self.items += len(live)
        metrics.INFERENCE_BATCH_SIZE.observe(len(live))
        _deliver_all([(job, row, None) for row, job in zip(out, live)])

    @staticmethod
    def _run_call(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as exc:  # noqa: BLE001
            job.future.set_exception(exc)


_Outcome = tuple[_Job, Any, "BaseException | None"]


def _deliver_all(outcomes: list[_Outcome]) -> None:
    """Hand each batch item its row (or the batch's error): one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        waiter = outcome[0].waiter
        if waiter is None:
            _settle(outcome[0].future, outcome[1], outcome[2])
        else:
            by_loop.setdefault(waiter.get_loop(), []).append(outcome)
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_waiters, mine)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


def _settle_waiters(outcomes: list[_Outcome]) -> None:
    for job, value, error in outcomes:
        if job.waiter is not None and not job.waiter.done():
            if error is None:
                job.waiter.set_result(value)
            else:
                job.waiter.set_exception(error)


def _settle(future: Future[Any], value: Any, error: BaseException | None) -> None:
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
