"""The data plane: image references → (embedding key, uint8 pixels), in worker processes.

`DecodePlane` keeps DECODE_PROCESSES decode processes (images/plane_process.py), started with
`spawn`: never `fork` from a process that runs threads and torch. Each fetches, hashes, decodes
and resizes with its own event loop and HTTP client, and writes uint8 pixels into its own
shared-memory arena of fixed slots; the main process copies a slot out when the reply arrives
(one memcpy) and frees it. So pixels never cross a pipe, and the main event loop does no
per-image work but reading a small reply.

- Back-pressure: a job holds a slot from dispatch to reply; jobs beyond the free slots wait in
  the main process, requests' ahead of background work, which may hold at most
  `BACKGROUND_SHARE` of the slots.
- Depth: each process has FETCH_CONCURRENCY slots (at least `MIN_SLOTS`), whatever the number
  of processes: its own fetcher allows that many downloads, and fewer jobs in flight leave a
  process idle while it waits for the network (2 processes sharing 16 slots kept 1.6 of 2
  cores busy). Requests' images in flight are bounded upstream too (predict/embed.py: 4
  encoder batches, 32 on a CPU, 256 on a GPU), so spare slots cost shared memory only.
- Shared memory: the arenas live in /dev/shm, a tmpfs, where one bigger than the free space is
  created all the same (sparse) and the process writing past it dies of SIGBUS. So
  `arenas.plan_arenas` fits them into `SHM_SHARE` of its free space first: fewer slots and a warning
  if need be, or a DecodeError naming the fix if not even MIN_SLOTS fit (Docker gives a
  container 64 MB unless told `--shm-size`).
- Supervision: replies and deaths are read with `loop.add_reader` on each pipe and process
  sentinel (no threads). A process that dies fails only the jobs it held, with a reason, and
  is restarted; `backend_decode_processes`, `backend_decode_process_restarts_total`.
- Per-stage CPU seconds measured in the processes add up in `backend_plane_cpu_seconds_total`.
- `close()`: processes stopped (killed if they do not stop), every arena closed and unlinked.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import errors, metrics
from ..config import Settings
from ..errors import BackendError, DecodeError
from ..labelstudio.client import LabelStudioAccess
from . import plane_process
from .arenas import MIN_SLOTS, SHM_FIX, ArenaPlan, plan_arenas, shm_free_bytes
from .steps import Steps

log = logging.getLogger(__name__)

BACKGROUND_SHARE = 0.5
"""Most of the slots background (pre-label) work may hold: requests always find some."""
RESTART_BACKOFF_S = (0.5, 30.0)
"""Delay before restarting a process that died before it was ready: first, most."""
STOP_WAIT_S = 5.0
"""How long `close` waits for a process to stop before killing it."""
CHILD_SETUP: list[Callable[[], None]] = []
"""Functions (importable by name) each decode process calls first; tests install their
loopback-only network guard here."""

Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Decoded:
    """An image's embedding key (model + SHA-256 of its bytes) and its (S, S, 3) uint8 pixels,
    or why the fetched bytes could not be decoded."""

    key: str
    pixels: Pixels | BaseException


@dataclass
class _Job:
    id: int
    message: tuple[Any, ...]
    """(image reference, task id, Label Studio URL, token): the job as plane_process.Job
    without its id and slot."""
    background: bool
    future: asyncio.Future[Decoded]
    slot: int = -1


@dataclass
class _Process:
    """One decode process, its pipe, and its arena (which outlives restarts)."""

    index: int
    arena: shared_memory.SharedMemory
    slots: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    free: list[int] = field(default_factory=list)
    jobs: dict[int, _Job] = field(default_factory=dict)
    ready: bool = False
    failed_starts: int = 0
    """Deaths in a row before the process said it was ready: restarts back off."""

    def view(self, side: int) -> Pixels:
        return np.ndarray((self.slots, side, side, 3), np.uint8, buffer=self.arena.buf)


class DecodePlane:
    """`await plane.decode(ref, task_id, ls)` → Decoded; the error the in-process path would
    give, for that image alone: raised if the bytes could not be fetched (ImageRefused,
    FetchError), in `Decoded.pixels` if they could not be decoded (DecodeError)."""

    def __init__(self, settings: Settings, *, model: str, steps: Steps, side: int,
                 processes: int, nice: int = 0,
                 shm_free: Callable[[], int | None] = shm_free_bytes) -> None:
        if processes < 1:
            raise ValueError("a decode plane needs at least one process")
        self.settings = settings
        self.model = model
        self.steps = steps
        self.side = side
        self.processes = processes
        self.nice = nice
        self._shm_free = shm_free
        # what the settings ask for; fitted to /dev/shm's free space when the processes start
        self.plan = plan_arenas(settings, processes, side, None)
        self._context = multiprocessing.get_context("spawn")
        self._ids = itertools.count()
        self._waiting: deque[_Job] = deque()
        self._waiting_background: deque[_Job] = deque()
        self._background_running = 0
        self._workers: list[_Process] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_pending = False
        self.restarts = 0
        self.closed = False

    # --- public --------------------------------------------------------------------------------
    async def decode(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None,
                     background: bool = False) -> Decoded:
        if self.closed:
            raise BackendError("the decode plane is shut down")
        self._start()
        loop = asyncio.get_running_loop()
        job_id = next(self._ids)
        job = _Job(job_id, (ref, task_id, ls.url if ls else None, ls.token if ls else None),
                   background, loop.create_future())
        (self._waiting_background if background else self._waiting).append(job)
        self._dispatch_soon()
        return await job.future

    @property
    def slots_per_process(self) -> int:
        return self.plan.slots

    @property
    def background_slots(self) -> int:
        return max(1, int(self.processes * self.slots_per_process * BACKGROUND_SHARE))

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers if w.process is not None and w.process.is_alive())

    def close(self) -> None:
        """Stop the processes and free every shared-memory segment. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._shut_down()

    def _shut_down(self) -> None:
        for worker in self._workers:
            self._stop(worker)
        for worker in self._workers:
            self._fail(worker, BackendError("the decode plane shut down"))
            worker.arena.close()
            worker.arena.unlink()
        self._fail_waiting(BackendError("the decode plane shut down"))
        metrics.DECODE_PROCESSES.set(0)

    # --- processes -----------------------------------------------------------------------------
    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._workers and self._loop is loop:
            return
        if self._workers:  # first used from another event loop, now gone: start afresh
            self._shut_down()
            self._workers = []
        self.plan = self._fit()
        self._loop = loop
        for index in range(self.processes):
            arena = shared_memory.SharedMemory(create=True, size=self.plan.arena_bytes)
            self._workers.append(_Process(index, arena, self.slots_per_process))
        for worker in self._workers:
            self._spawn(worker)

    def _fit(self) -> ArenaPlan:
        """The arenas, fitted to the free shared memory: fewer slots with a warning, or a
        DecodeError if even MIN_SLOTS per process do not fit."""
        plan = plan_arenas(self.settings, self.processes, self.side, self._shm_free())
        if not plan.fits:
            raise DecodeError(f"{plan.shortage()}, even at {MIN_SLOTS} slots per process: "
                              f"{SHM_FIX}, or set DECODE_PROCESSES=0 to decode in-process")
        if plan.reduced:
            log.warning("%s: using %d slots per process instead of %d (fewer images in flight, "
                        "slower /predict); to keep them all, %s", plan.shortage(), plan.slots,
                        plan.wanted, SHM_FIX)
        return plan

    def _spawn(self, worker: _Process) -> None:
        config = plane_process.Config(self.settings, self.model, self.steps, self.side,
                                      worker.slots, worker.arena.name, self.nice,
                                      tuple(CHILD_SETUP))
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=plane_process.main, args=(config, theirs),
                                        name=f"decode-{worker.index}", daemon=True)
        process.start()
        theirs.close()
        worker.process, worker.conn, worker.ready = process, ours, False
        worker.free = list(range(worker.slots))
        assert self._loop is not None
        self._loop.add_reader(ours.fileno(), self._receive, worker)
        self._loop.add_reader(process.sentinel, self._died, worker)
        metrics.DECODE_PROCESSES.set(self.alive)

    def _stop(self, worker: _Process) -> None:
        process, conn = worker.process, worker.conn
        self._forget(worker)
        if process is None or conn is None:
            return
        try:
            conn.send(None)
        except OSError:
            pass
        process.join(STOP_WAIT_S)
        if process.is_alive():
            process.kill()
            process.join()
        process.close()
        conn.close()

    def _forget(self, worker: _Process) -> None:
        """Stop watching the worker's pipe and sentinel."""
        if self._loop is not None and not self._loop.is_closed():
            self._forget_pipe(worker)
            if worker.process is not None:
                self._loop.remove_reader(worker.process.sentinel)

    def _died(self, worker: _Process) -> None:
        process, conn = worker.process, worker.conn
        assert process is not None and conn is not None
        self._drain(worker)  # replies sent before it died still count
        self._forget(worker)
        process.join()
        reason = _death(process.exitcode)
        log.warning("decode process %s (pid %s) %s%s; %d image(s) in flight failed",
                    worker.index, process.pid, reason, "" if worker.ready else " before it was "
                    "ready", len(worker.jobs))
        process.close()
        conn.close()
        worker.process = worker.conn = None
        metrics.DECODE_PROCESSES.set(self.alive)
        if worker.ready:
            self._fail(worker, DecodeError(
                f"the decode process working on this image {reason}. It was restarted and "
                "other images are unaffected; if this image fails again, it crashes the "
                "decoder or needs too much memory: check the file, lower MAX_DECODE_BYTES, or "
                "set DECODE_PROCESSES=0 to decode in-process"))
        else:
            self._start_failed(worker, reason)
        if self.closed:
            return
        self.restarts += 1
        metrics.DECODE_PROCESS_RESTARTS.inc()
        first, most = RESTART_BACKOFF_S
        delay = min(most, first * 2 ** (worker.failed_starts - 1)) if worker.failed_starts else 0
        assert self._loop is not None
        self._loop.call_later(delay, self._respawn, worker)

    def _start_failed(self, worker: _Process, reason: str) -> None:
        """A process died before it was ready: its jobs fail, and while no process is ready,
        the waiting ones too (rather than wait for a restart that may never work)."""
        worker.failed_starts += 1
        error = DecodeError(f"the decode processes cannot start (one {reason}; its error is in "
                            "the log). Set DECODE_PROCESSES=0 to decode in-process meanwhile")
        self._fail(worker, error)
        if not any(w.ready for w in self._workers):
            self._fail_waiting(error)

    def _respawn(self, worker: _Process) -> None:
        if not self.closed and worker.process is None:
            self._spawn(worker)
            self._dispatch()

    def _fail_waiting(self, error: BaseException) -> None:
        for job in (*self._waiting, *self._waiting_background):
            _fail_job(job, error)
        self._waiting.clear()
        self._waiting_background.clear()

    def _fail(self, worker: _Process, error: BaseException) -> None:
        for job in worker.jobs.values():
            self._release(worker, job)
            _fail_job(job, error)
        worker.jobs.clear()

    # --- jobs ----------------------------------------------------------------------------------
    def _dispatch_soon(self) -> None:
        """Dispatch once the callbacks ready now have run: the images a request submits in
        one go reach each process in one message."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        batches: dict[int, list[_Job]] = {}
        while self._waiting or self._waiting_background and self._background_fits():
            worker = max(self._workers, key=lambda w: len(w.free) if w.conn else -1)
            if not worker.free or worker.conn is None:
                break
            queue = self._waiting if self._waiting else self._waiting_background
            job = queue.popleft()
            if job.future.done():  # its request was cancelled
                continue
            self._assign(worker, job)
            batches.setdefault(worker.index, []).append(job)
        for index, jobs in batches.items():
            self._send(self._workers[index], jobs)

    def _background_fits(self) -> bool:
        return self._background_running < self.background_slots

    def _assign(self, worker: _Process, job: _Job) -> None:
        job.slot = worker.free.pop()
        worker.jobs[job.id] = job
        self._background_running += job.background

    @staticmethod
    def _send(worker: _Process, jobs: list[_Job]) -> None:
        assert worker.conn is not None
        try:
            worker.conn.send([(job.id, job.slot, *job.message) for job in jobs])
        except OSError:
            pass  # it died: its sentinel fails the jobs

    def _release(self, worker: _Process, job: _Job) -> None:
        worker.free.append(job.slot)
        self._background_running -= job.background

    def _receive(self, worker: _Process) -> None:
        if not self._drain(worker):
            self._forget_pipe(worker)  # closed: the sentinel will say why
        self._dispatch()

    def _forget_pipe(self, worker: _Process) -> None:
        if self._loop is not None and worker.conn is not None and not worker.conn.closed:
            self._loop.remove_reader(worker.conn.fileno())

    def _drain(self, worker: _Process) -> bool:
        """Handle every reply waiting on the pipe; False once the pipe is closed."""
        conn = worker.conn
        try:
            while conn is not None and not conn.closed and conn.poll():
                for reply in conn.recv():
                    self._reply(worker, reply)
        except (EOFError, OSError):
            return False
        return True

    def _reply(self, worker: _Process, reply: tuple[Any, ...]) -> None:
        if reply[0] == "ready":
            worker.ready, worker.failed_starts = True, 0
            return
        _count_cpu(reply[-1])
        if reply[-2]:
            metrics.IMAGES_FETCHED.inc()
        job = worker.jobs.pop(reply[1], None)
        if job is None:
            return
        if reply[0] == "ok":
            pixels = np.array(worker.view(self.side)[job.slot])
            result: Decoded | BaseException = Decoded(reply[2], pixels)
        elif reply[4] is not None:
            result = Decoded(reply[4], _error(reply[2], reply[3]))
        else:
            result = _error(reply[2], reply[3])
        self._release(worker, job)
        if job.future.done():
            return
        if isinstance(result, Decoded):
            job.future.set_result(result)
        else:
            job.future.set_exception(result)


def _fail_job(job: _Job, error: BaseException) -> None:
    """Fail a job whose request still waits (not done, its event loop still open)."""
    if not job.future.done() and not job.future.get_loop().is_closed():
        job.future.set_exception(error)


def _count_cpu(cpu: dict[str, float]) -> None:
    for stage, seconds in cpu.items():
        metrics.PLANE_CPU_SECONDS.labels(stage).inc(seconds)


def _error(name: str, message: str) -> BaseException:
    """The exception the decode process raised, rebuilt: BackendError subclasses by name, so a
    bad image fails its task with the same message as in-process."""
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return RuntimeError(f"{name}: {message}")


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def plane_processes(settings: Settings, cpus: int | None) -> int:
    """DECODE_PROCESSES, with None meaning one per CPU."""
    if settings.DECODE_PROCESSES is None:
        return max(1, cpus or 1)
    return settings.DECODE_PROCESSES

