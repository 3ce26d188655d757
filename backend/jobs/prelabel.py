"""Whole-project pre-labeling, outside Label Studio's request timeouts.

    plan   Label Studio's task pages → tasks without a prediction for the model_version → items
    item   claim the tasks → predict (the /predict pipeline) → import the predictions into
           Label Studio in one call → record done or failed in the job ledger (work.py)
    run    items are worked here (`Prelabeler.run`: the CLI, or the server in the background),
           or by RQ workers on any machine that reaches the shared Redis (executors.py, rq.py)

Idempotent per (task, model_version): a task whose Label Studio predictions already carry the
version is skipped, so a second run, or a run after a crash, writes only what is missing. The
ledger's claims keep two processes from working on one task at once. A run never blocks a
Label Studio request: it shares the inference thread with /predict, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import JobNotFound, JobRunning, StoreUnavailable
from ..store import ZERO_SHOT
from ..store.jobs import JobLedger
from .executors import Executor, ExecutorName, resolve_executor
from .predictor import Predictor
from .work import Job, JobSpec, claim, dead, job_id, new_owner, opened_label_studio

log = logging.getLogger(__name__)

PLANNER = "#planner"
"""The claim the planning process holds: one planner per job at a time."""
PLANNER_TTL_S = 60.0


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
    """Starts, runs and reports pre-label jobs for one predictor, against one ledger."""

    def __init__(self, predictor: Predictor, ledger: JobLedger, settings: Settings) -> None:
        self.predictor = predictor
        self.ledger = ledger
        self.settings = settings
        self.owner = new_owner()
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}

    # --- starting and following ----------------------------------------------------------
    async def start(self, project: str, executor: ExecutorName = "local") -> dict[str, Any]:
        """Begin (or resume) the project's job in the background; return its progress."""
        spec = await self.prepare(project)
        if spec.id in self._running and not self._running[spec.id].done():
            return await self._status(spec.id)  # already running here
        job = Job(self.ledger, spec, self.owner)
        await asyncio.to_thread(self._take_planner, spec)
        await job.update(id=spec.id, project=spec.project, model_version=spec.model_version,
                         label_config=spec.label_config, head=spec.head, executor=executor,
                         planning="running", cancelled=False, error=None, seen=0, skipped=0,
                         started_at=time.time())
        await job.clear_failures()  # this run retries them
        self._running[spec.id] = asyncio.ensure_future(self._plan_and_run(job, executor))
        return await self._status(spec.id)

    async def run(self, project: str, executor: ExecutorName = "local",
                  on_progress: Callable[[dict[str, Any]], None] | None = None,
                  wait_workers: bool = True) -> dict[str, Any]:
        """Run the job to its end (local), or plan it and follow the workers (rq)."""
        started = await self.start(project, executor)
        task = self._running[started["id"]]
        state = started
        while not task.done() or (wait_workers and executor == "rq"
                                  and state["status"] == "running"):
            await asyncio.wait([task], timeout=0.5)
            state = await self._status(started["id"])
            if on_progress:
                on_progress(state)
        task.result()  # raise what planning raised
        final = await self._status(started["id"])
        if on_progress:
            on_progress(final)
        return final

    async def prepare(self, project: str) -> JobSpec:
        async with opened_label_studio(self.predictor, project) as api:
            settings = await api.project(project)
        if settings.get("evaluate_predictions_automatically"):
            log.warning("project %s: Label Studio calls /predict itself for the task pages a "
                        "pre-label job reads (project setting 'Retrieve predictions when loading "
                        "a task automatically'); turn it off while the job runs", project)
        config = str(settings.get("label_config") or "")
        ctx = await self.predictor.context(config, project)
        return JobSpec(job_id(project, ctx.model_version), project, ctx.model_version, config,
                       ctx.active.id or ZERO_SHOT)

    def status(self, job: str) -> dict[str, Any]:
        record = self.ledger.get(job)
        if record is None:
            raise JobNotFound(f"no pre-label job {job!r}; list a project's jobs with "
                              "GET /prelabel?project=ID")
        return {**self._state(record), "failures": self.ledger.failures(job)}

    async def _status(self, job: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.status, job)

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
        return holder is None or dead(holder)

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
    async def _plan_and_run(self, job: Job, executor: ExecutorName) -> dict[str, Any]:
        spec, error = job.spec, None
        try:
            workers = resolve_executor(executor)(self.predictor, job)
            try:
                await self._plan(job, workers)
            finally:
                await workers.join()
        except Exception as exc:
            log.exception("pre-label job %s failed", spec.id)
            error = str(exc) or type(exc).__name__
        finally:
            await self._end_planning(job, error)
        with contextlib.suppress(StoreUnavailable):
            return await self._status(spec.id)
        return {"id": spec.id, "project": spec.project, "status": "unknown",
                "error": "the store is unavailable: GET /prelabel/{id} once it is back"}

    async def _end_planning(self, job: Job, error: str | None) -> None:
        """Record how planning ended and free the planner claim. With the store down this is
        skipped, not raised: the claim expires by itself (PLANNER_TTL_S), and the job then
        reports `interrupted` and can be resumed."""
        try:
            if error is not None:
                await job.update(error=error)
            await job.release([PLANNER])
        except StoreUnavailable as exc:
            log.warning("pre-label job %s: could not record its end (%s); its planner claim "
                        "expires within %.0f s, then POST /prelabel resumes it", job.spec.id, exc,
                        PLANNER_TTL_S)

    async def _plan(self, job: Job, workers: Executor) -> None:
        """Go through the project's task pages, handing the tasks still to do to `workers`."""
        spec, size = job.spec, self.settings.PRELABEL_ITEM_TASKS
        done = await job.done()
        seen = skipped = 0
        async with opened_label_studio(self.predictor, spec.project) as api:
            page = 1
            while True:
                if await job.stopped():
                    return
                await job.claim([PLANNER], PLANNER_TTL_S)
                total, tasks = await api.task_page(spec.project, page,
                                                   self.settings.PRELABEL_PAGE_SIZE)
                if not tasks:
                    break
                have = [str(t["id"]) for t in tasks if _has_version(t, spec.model_version)]
                await job.finish(have, {})
                skip = done.union(have)
                todo = [{"id": t["id"], "data": t.get("data", {})} for t in tasks
                        if str(t["id"]) not in skip]
                seen, skipped = seen + len(tasks), skipped + len(have)
                await job.update(seen=seen, skipped=skipped, total=total)
                for start in range(0, len(todo), size):
                    await workers.submit(todo[start:start + size])
                page += 1
        await job.update(planning="done", seen=seen)


def _has_version(task: dict[str, Any], version: str) -> bool:
    """Label Studio lists a task's prediction versions comma-joined."""
    return version in str(task.get("predictions_model_versions") or "").split(",")
