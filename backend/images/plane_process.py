"""One decode process of the data plane (images/plane.py starts it with `spawn`).

It runs its own event loop and its own `ImageFetcher` (the same address guard, size caps and
Label Studio token rules as the main process), and for each job: fetch → SHA-256 embedding key
→ `decode_image` → the model's PIL steps → uint8 pixels written into the job's slot of the
shared-memory arena the main process created. Jobs come as lists (the main process sends
all it can place in one message); replies go back as lists of small tuples, those of the jobs
that finished in one turn of the event loop together (fewer wake-ups on both sides; sending
each before the next image decodes cost the CPU proxy 0.63 → 0.51–0.59 of the limit):

    ("ready",)
    ("ok", job, key, (height, width), downloaded, cpu)     cpu: {stage: CPU seconds}
    ("error", job, error class name, message, key or None, downloaded, cpu)

`key` in an error: the bytes were fetched and hashed, and could not be decoded (the main
process may still find their embedding stored).
`downloaded`: the bytes came over the network or from local files (not a data: URI), for
the main process's `backend_images_fetched_total` (this process's metrics are its own).

Imports stay light (Pillow, NumPy, aiohttp, httpx): no torch, no model, so a process starts quickly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import Settings
from ..errors import BackendError
from ..labelstudio.client import LabelStudioAccess
from ..lru import LRU
from ..store.base import embedding_key
from .decode import decode_image
from .fetch import ImageFetcher, is_data_uri
from .steps import Steps, apply_steps

Job = tuple[int, int, str, "int | None", "str | None", "str | None"]
"""(job id, slot, image reference, task id, Label Studio URL, Label Studio token)"""
LABEL_STUDIO_ACCESSES = 64
"""Label Studio (url, token) pairs remembered per process: a PAT's access token is reused."""


@dataclass(frozen=True)
class Config:
    """What a decode process needs, pickled to it at start."""

    settings: Settings
    model: str
    """The embedding model's identity: part of each embedding key."""
    steps: Steps
    side: int
    slots: int
    arena: str
    """Name of the shared-memory arena: `slots` × side × side × 3 bytes."""
    nice: int
    setup: tuple[Callable[[], None], ...] = ()
    """Called first in the process (tests install their network guard here)."""


def main(config: Config, conn: Connection) -> None:
    """The process's entry point: serve jobs from `conn` until told to stop or it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for setup in config.setup:
        setup()
    if config.nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                   + config.nice))
        except OSError:
            pass  # a sandbox may forbid it: run at normal priority
    arena = shared_memory.SharedMemory(name=config.arena)
    try:
        asyncio.run(Worker(config, conn, arena).serve())
    finally:
        arena.close()
        conn.close()


class Worker:
    def __init__(self, config: Config, conn: Connection,
                 arena: shared_memory.SharedMemory) -> None:
        self.config = config
        self.settings = config.settings
        self.conn = conn
        shape = (config.slots, config.side, config.side, 3)
        self.pixels: npt.NDArray[np.uint8] = np.ndarray(shape, np.uint8, buffer=arena.buf)
        self.accesses: LRU[tuple[str, str | None], LabelStudioAccess] = LRU(
            LABEL_STUDIO_ACCESSES)
        self.tasks: set[asyncio.Task[None]] = set()
        self.outbox: list[tuple[Any, ...]] = []
        self.clock = time.thread_time()

    async def serve(self) -> None:
        self.fetcher = ImageFetcher(self.settings)
        self.stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._receive)
        self.conn.send([("ready",)])
        try:
            await self.stopped.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.fetcher.aclose()

    def _receive(self) -> None:
        try:
            jobs: list[Job] | None = self.conn.recv()
        except (EOFError, OSError):  # the main process is gone
            jobs = None
        if jobs is None:
            self.stopped.set()
            return
        for job in jobs:
            task = asyncio.ensure_future(self._run(job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, job: Job) -> None:
        job_id, slot, ref, task_id, ls_url, ls_token = job
        cpu: dict[str, float] = {}
        fetched, key = None, None
        try:
            fetched = await self.fetcher.fetch(ref, task_id=task_id,
                                               ls=self._access(ls_url, ls_token))
            data, content_type = fetched.data, fetched.content_type
            key = _timed(cpu, "hash", embedding_key, self.config.model, data)
            image = _timed(cpu, "decode", decode_image, data,
                           max_pixels=self.settings.MAX_IMAGE_PIXELS,
                           draft_size=self.config.side, content_type=content_type,
                           max_bytes=self.settings.MAX_DECODE_BYTES,
                           formats=self.settings.image_formats)
            shape = _timed(cpu, "preprocess", self._write, slot, image)
            reply: tuple[Any, ...] = ("ok", job_id, key, shape)
        except BackendError as exc:
            reply = ("error", job_id, type(exc).__name__, str(exc), key)
        except Exception as exc:  # noqa: BLE001 - a bug in one image's path fails that image
            reply = ("error", job_id, type(exc).__name__, f"{exc} (in a decode process)", key)
        downloaded = fetched is not None and not is_data_uri(ref)
        self._send((*reply, downloaded, self._fetch_cpu(cpu)))

    def _write(self, slot: int, image: Any) -> tuple[int, int]:
        image = apply_steps(image, self.config.steps)
        array = np.asarray(image)
        if array.shape != self.pixels.shape[1:]:
            raise ValueError(f"preprocessing made a {array.shape} image, not "
                             f"{self.pixels.shape[1:]}")
        self.pixels[slot] = array
        return int(array.shape[0]), int(array.shape[1])

    def _fetch_cpu(self, cpu: dict[str, float]) -> dict[str, float]:
        """The loop's CPU time since the last reply that the timed stages did not take:
        downloading (and running this loop) for all the jobs in flight. Between two replies
        only the replying job's stages run: they are synchronous, right before its reply."""
        now = time.thread_time()
        cpu["fetch"] = max(0.0, now - self.clock - sum(cpu.values()))
        self.clock = now
        return cpu

    def _send(self, reply: tuple[Any, ...]) -> None:
        self.outbox.append(reply)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        replies, self.outbox = self.outbox, []
        try:
            self.conn.send(replies)
        except OSError:  # the main process is gone
            self.stopped.set()

    def _access(self, url: str | None, token: str | None) -> LabelStudioAccess | None:
        if url is None:
            return None
        access = self.accesses.get((url, token))
        if access is None:
            access = LabelStudioAccess(url, token)
            self.accesses.put((url, token), access)
        return access


def _timed(cpu: dict[str, float], stage: str, fn: Callable[..., Any], *args: Any,
           **kwargs: Any) -> Any:
    start = time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        cpu[stage] = time.thread_time() - start

