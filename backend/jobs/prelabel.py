"""Whole-project pre-labeling, outside Label Studio's request timeouts.

    plan   Label Studio's task pages → tasks without a prediction for the model_version → items
    item   claim the tasks → predict (the /predict pipeline) → import the predictions into
           Label Studio in one call → record done or failed in the job ledger
    run    items are worked here (`Prelabeler.run`: the CLI, or the server in the background),
           or by RQ workers on any machine that reaches the shared Redis (worker.py)

Idempotent per (task, model_version): a task whose Label Studio predictions already carry the
version is skipped, so a second run, or a run after a crash, writes only what is missing. The
ledger's claims keep two processes from working on one task at once. A run never blocks a
Label Studio request: it shares the inference thread with /predict, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx

from .. import metrics
from ..config import Settings
from ..errors import BackendError, ConfigError, LabelStudioError, Overloaded, StoreUnavailable
from ..labelstudio.client import LabelStudioAPI
from ..netguard import GuardedTransport
from ..store import ZERO_SHOT
from ..store.jobs import JobLedger

if TYPE_CHECKING:
    from ..runtime import Backend

log = logging.getLogger(__name__)

Task = dict[str, Any]
Executor = Literal["local", "rq"]
PLANNER = "#planner"
"""The claim the planning process holds: one planner per job at a time."""
CLAIM_TTL_S = 300.0
"""A claim outlives any item; a crashed worker's tasks are free again after this (at once for
a dead process on the same machine)."""
PLANNER_TTL_S = 60.0
OVERLOAD_RETRY_S = 1.0
_off = asyncio.to_thread
"""Ledger calls are blocking I/O (Redis, SQLite): never on the event loop."""


class JobRunning(BackendError):
    """Another live process is already planning this job."""


class JobNotFound(BackendError):
    """No pre-label job has this id."""


@dataclass(frozen=True)
class JobSpec:
    """What every worker needs to know about a job; travels with each work item."""

    id: str
    project: str
    model_version: str
    label_config: str
    head: str
    """The adapted head the job started with (or zero-shot): kept for the whole job."""


def job_id(project: str, model_version: str) -> str:
    """One job per (project, model_version): starting it again resumes it."""
    return f"{project}-{hashlib.sha1(model_version.encode()).hexdigest()[:12]}"


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _dead(owner: str) -> bool:
    """True if `owner` was a process on this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim(ledger: JobLedger, job: str, tasks: Sequence[str], owner: str, ttl_s: float) -> list[str]:
    """Claim `tasks`, taking over those held by dead processes on this machine."""
    got = ledger.claim(job, tasks, owner, ttl_s)
    missing = [task for task in tasks if task not in set(got)]
    stale = {task: holder for task, holder in ledger.holders(job, missing).items()
             if _dead(holder)}
    for task, holder in stale.items():
        ledger.release(job, [task], holder)
    return got + (ledger.claim(job, list(stale), owner, ttl_s) if stale else [])


def progress(record: dict[str, Any]) -> dict[str, Any]:
    """The job as users see it: status and counts (tasks done include those skipped because
    Label Studio already had this version's prediction)."""
    seen, done, failed = record.get("seen", 0), record.get("done", 0), record.get("failed", 0)
    if record.get("error"):
        status = "failed"
    elif record.get("cancelled"):
        status = "cancelled"
    elif record.get("planning") != "done":
        status = "running"
    else:
        status = "done" if done + failed >= seen else "running"
    total = max(seen, int(record.get("total", 0)))
    return {"id": record["id"], "project": record["project"],
            "model_version": record["model_version"], "status": status, "total": total,
            "done": done, "failed": failed, "queued": max(0, total - done - failed),
            "skipped": record.get("skipped", 0), "executor": record.get("executor"),
            "started_at": record.get("started_at"), "updated_at": record.get("updated_at"),
            "error": record.get("error")}


class Prelabeler:
    """Starts, runs and reports pre-label jobs for one model, against one ledger."""

    def __init__(self, model: Backend, ledger: JobLedger, settings: Settings) -> None:
        self.model = model
        self.ledger = ledger
        self.settings = settings
        self.owner = new_owner()
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}

    # --- starting and following ----------------------------------------------------------
    async def start(self, project: str, executor: Executor = "local") -> dict[str, Any]:
        """Begin (or resume) the project's job in the background; return its progress."""
        spec = await self.prepare(project)
        if spec.id in self._running and not self._running[spec.id].done():
            return await _off(self.status, spec.id)  # already running here
        await _off(self._take_planner, spec)
        await _off(self.ledger.update, spec.id, spec.project, {
            "id": spec.id, "project": spec.project, "model_version": spec.model_version,
            "label_config": spec.label_config, "head": spec.head, "executor": executor,
            "planning": "running",
            "cancelled": False, "error": None, "seen": 0, "skipped": 0,
            "started_at": time.time(), "updated_at": time.time()})
        await _off(self.ledger.clear_failures, spec.id)  # this run retries them
        self._running[spec.id] = asyncio.ensure_future(self._plan_and_run(spec, executor))
        return await _off(self.status, spec.id)

    async def run(self, project: str, executor: Executor = "local",
                  on_progress: Callable[[dict[str, Any]], None] | None = None,
                  wait_workers: bool = True) -> dict[str, Any]:
        """Run the job to its end (local), or plan it and follow the workers (rq)."""
        started = await self.start(project, executor)
        task = self._running[started["id"]]
        state = started
        while not task.done() or (wait_workers and executor == "rq"
                                  and state["status"] == "running"):
            await asyncio.wait([task], timeout=0.5)
            state = await _off(self.status, started["id"])
            if on_progress:
                on_progress(state)
        task.result()  # raise what planning raised
        final = await _off(self.status, started["id"])
        if on_progress:
            on_progress(final)
        return final

    async def prepare(self, project: str) -> JobSpec:
        api = label_studio_api(self.model, project)
        try:
            settings = await api.project(project)
        finally:
            await api.aclose()
        if settings.get("evaluate_predictions_automatically"):
            log.warning("project %s: Label Studio calls /predict itself for the task pages a "
                        "pre-label job reads (project setting 'Retrieve predictions when loading "
                        "a task automatically'); turn it off while the job runs", project)
        config = str(settings.get("label_config") or "")
        ctx = await self.model.context(config, project)
        return JobSpec(job_id(project, ctx.model_version), project, ctx.model_version, config,
                       ctx.active.id or ZERO_SHOT)

    def status(self, job: str) -> dict[str, Any]:
        record = self.ledger.get(job)
        if record is None:
            raise JobNotFound(f"no pre-label job {job!r}; list a project's jobs with "
                              "GET /prelabel?project=ID")
        return {**self._state(record), "failures": self.ledger.failures(job)}

    def _state(self, record: dict[str, Any]) -> dict[str, Any]:
        state = progress(record)
        if state["status"] == "running" and self._orphaned(record):
            state["status"] = "interrupted"
            state["error"] = ("the process running this job stopped; start the job again "
                              "(POST /prelabel or python -m backend prelabel) to finish it")
        return state

    def _orphaned(self, record: dict[str, Any]) -> bool:
        """Planning, or working locally, with no live process holding the job."""
        if record.get("planning") == "done" and record.get("executor") == "rq":
            return False  # the workers have it
        holder = self.ledger.holders(record["id"], [PLANNER]).get(PLANNER)
        return holder is None or _dead(holder)

    def jobs(self, project: str) -> list[dict[str, Any]]:
        return [self._state(record) for record in self.ledger.jobs(project)]

    def cancel(self, job: str) -> dict[str, Any]:
        """Stop planning and working the job; items in flight finish, queued ones are dropped."""
        project = self.status(job)["project"]
        self.ledger.update(job, project, {"cancelled": True, "updated_at": time.time()})
        return self.status(job)

    async def aclose(self) -> None:
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _take_planner(self, spec: JobSpec) -> None:
        if not claim(self.ledger, spec.id, [PLANNER], self.owner, PLANNER_TTL_S):
            holder = self.ledger.holders(spec.id, [PLANNER]).get(PLANNER, "another process")
            raise JobRunning(f"job {spec.id} is already being planned by {holder}; follow it "
                             f"with GET /prelabel/{spec.id}, or wait {PLANNER_TTL_S:.0f} s if "
                             "that process has died")

    # --- planning --------------------------------------------------------------------------
    async def _plan_and_run(self, spec: JobSpec, executor: Executor) -> dict[str, Any]:
        error: str | None = None
        try:
            if executor == "rq":
                from .rq import enqueuer

                enqueue = enqueuer(self.settings)
                await self._plan(spec, lambda tasks: asyncio.to_thread(enqueue, spec, tasks))
            else:
                await self._plan_locally(spec)
        except Exception as exc:
            log.exception("pre-label job %s failed", spec.id)
            error = str(exc) or type(exc).__name__
        finally:
            await self._end_planning(spec, error)
        with contextlib.suppress(StoreUnavailable):
            return await _off(self.status, spec.id)
        return {"id": spec.id, "project": spec.project, "status": "unknown",
                "error": "the store is unavailable: GET /prelabel/{id} once it is back"}

    async def _end_planning(self, spec: JobSpec, error: str | None) -> None:
        """Record how planning ended and free the planner claim. With the store down this is
        skipped, not raised: the claim expires by itself (PLANNER_TTL_S), and the job then
        reports `interrupted` and can be resumed."""
        try:
            if error is not None:
                await _off(self.ledger.update, spec.id, spec.project, {
                    "error": error, "updated_at": time.time()})
            await _off(self.ledger.release, spec.id, [PLANNER], self.owner)
        except StoreUnavailable as exc:
            log.warning("pre-label job %s: could not record its end (%s); its planner claim "
                        "expires within %.0f s, then POST /prelabel resumes it", spec.id, exc,
                        PLANNER_TTL_S)

    async def _plan_locally(self, spec: JobSpec) -> None:
        items: asyncio.Queue[list[Task] | None] = asyncio.Queue(self.settings.PRELABEL_PARALLEL)

        async def work() -> None:
            while (tasks := await items.get()) is not None:
                try:
                    await work_item(self.model, self.ledger, spec, tasks, self.owner)
                except Exception as exc:  # noqa: BLE001 - stop the job, keep draining the queue
                    log.exception("pre-label job %s: a batch failed", spec.id)
                    with contextlib.suppress(Exception):
                        await _off(self.ledger.update, spec.id, spec.project, {
                            "error": f"{type(exc).__name__}: {exc}", "updated_at": time.time()})

        workers = [asyncio.ensure_future(work()) for _ in range(self.settings.PRELABEL_PARALLEL)]
        try:
            await self._plan(spec, items.put)
        finally:
            for _ in workers:
                await items.put(None)
            await asyncio.gather(*workers)

    async def _plan(self, spec: JobSpec, dispatch: Callable[[list[Task]], Awaitable[Any]]) -> None:
        api = label_studio_api(self.model, spec.project)
        done = await _off(self.ledger.done, spec.id)
        seen = skipped = 0
        try:
            page = 1
            while True:
                if await _off(_stopped, self.ledger, spec.id):
                    return
                await _off(claim, self.ledger, spec.id, [PLANNER], self.owner, PLANNER_TTL_S)
                total, tasks = await api.task_page(spec.project, page,
                                                   self.settings.PRELABEL_PAGE_SIZE)
                if not tasks:
                    break
                have = [str(t["id"]) for t in tasks if _has_version(t, spec.model_version)]
                await _off(self.ledger.finish, spec.id, have, {})
                skip = done.union(have)
                todo = [{"id": t["id"], "data": t.get("data", {})} for t in tasks
                        if str(t["id"]) not in skip]
                seen, skipped = seen + len(tasks), skipped + len(have)
                await _off(self.ledger.update, spec.id, spec.project, {
                    "seen": seen, "skipped": skipped, "total": total, "updated_at": time.time()})
                size = self.settings.PRELABEL_ITEM_TASKS
                for start in range(0, len(todo), size):
                    await dispatch(todo[start:start + size])
                page += 1
        finally:
            await api.aclose()
        await _off(self.ledger.update, spec.id, spec.project, {
            "planning": "done", "seen": seen, "updated_at": time.time()})


def _stopped(ledger: JobLedger, job: str) -> bool:
    record = ledger.get(job) or {}
    return bool(record.get("cancelled") or record.get("error"))


def _has_version(task: Task, version: str) -> bool:
    """Label Studio lists a task's prediction versions comma-joined."""
    return version in str(task.get("predictions_model_versions") or "").split(",")


# --- one work item: shared by the local runner and RQ workers ----------------------------------
async def work_item(model: Backend, ledger: JobLedger, spec: JobSpec, tasks: list[Task],
                    owner: str) -> dict[str, int]:
    """Predict `tasks` (those this owner could claim), store the predictions in Label Studio,
    and record the outcome. Returns counts; failures are recorded, never raised."""
    if await _off(_stopped, ledger, spec.id):
        return {"done": 0, "failed": 0}
    ids = [str(task["id"]) for task in tasks]
    mine = set(await _off(claim, ledger, spec.id, ids, owner, CLAIM_TTL_S))
    claimed = [task for task in tasks if str(task["id"]) in mine]
    if not claimed:
        return {"done": 0, "failed": 0}
    try:
        done, failed = await _predict_and_store(model, spec, claimed)
    except _VersionChanged as exc:
        await _off(ledger.release, spec.id, list(mine), owner)
        await _off(ledger.update, spec.id, spec.project, {"error": str(exc),
                                                          "updated_at": time.time()})
        return {"done": 0, "failed": 0}
    except BackendError as exc:
        done, failed = [], {task: str(exc) for task in mine}
    except asyncio.CancelledError:
        ledger.release(spec.id, list(mine), owner)
        raise
    await _off(ledger.finish, spec.id, done, failed)
    await _off(ledger.update, spec.id, spec.project, {"updated_at": time.time()})
    metrics.PRELABEL_TASKS.labels("done").inc(len(done))
    metrics.PRELABEL_TASKS.labels("failed").inc(len(failed))
    return {"done": len(done), "failed": len(failed)}


class _VersionChanged(BackendError):
    pass


async def _predict_and_store(model: Backend, spec: JobSpec,
                             tasks: list[Task]) -> tuple[list[str], dict[str, str]]:
    results = await _predict(model, spec, tasks)
    version = results[0].get("model_version") if results else spec.model_version
    if version != spec.model_version:
        raise _VersionChanged(
            f"this process predicts {version}, not the job's {spec.model_version}: run every "
            "worker with the backend's MODEL_NAME, MODEL_PRETRAINED and TEMPLATES (tasks "
            "already written keep their version)")
    rows, failed = [], {}
    for task, result in zip(tasks, results):
        if "result" in result:
            rows.append({"task": task["id"], "result": result["result"],
                         "score": result.get("score"), "model_version": version})
        else:
            failed[str(task["id"])] = str(result.get("error", "no prediction"))
    if rows:
        api = label_studio_api(model, spec.project)
        try:
            await api.import_predictions(spec.project, rows)
        except LabelStudioError as exc:
            return [], {**failed, **{str(row["task"]): str(exc) for row in rows}}
        finally:
            await api.aclose()
    return [str(row["task"]) for row in rows], failed


async def _predict(model: Backend, spec: JobSpec, tasks: list[Task]) -> list[dict[str, Any]]:
    while True:
        try:
            return await model.predict(tasks, label_config=spec.label_config,
                                       project=spec.project, head=spec.head, background=True)
        except Overloaded:  # Label Studio's own requests come first
            await asyncio.sleep(OVERLOAD_RETRY_S)


def label_studio_api(model: Backend, project: str) -> LabelStudioAPI:
    access = model.label_studio(project)
    if access is None or not access.token:
        raise ConfigError("pre-labeling reads tasks from and writes predictions to Label "
                          "Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    # the address guard too: a host named in /setup must not lead to cloud metadata
    transport = GuardedTransport(model.fetcher.ls_policy, httpx.Limits())
    return LabelStudioAPI(access, timeout_s=model.settings.LABEL_STUDIO_TIMEOUT_S,
                          transport=transport)
