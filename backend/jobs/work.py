"""A pre-label job's work item, shared by the local executor and RQ workers.

    item   claim the tasks → predict (the /predict pipeline) → import the predictions into
           Label Studio in one call → record done or failed in the job ledger

`JobSpec` travels with every item; `Job` is one job's ledger as one process works on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from .. import metrics
from ..errors import BackendError, ConfigError, LabelStudioError, Overloaded, VersionMismatch
from ..images.fetch import address_policy
from ..labelstudio.client import LabelStudioAPI
from ..netguard import GuardedTransport
from ..store.jobs import JobLedger
from .predictor import Predictor, Task

CLAIM_TTL_S = 300.0
"""A claim outlives any item; a crashed worker's tasks are free again after this (at once for
a dead process on the same machine)."""
OVERLOAD_RETRY_S = 1.0


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


def dead(owner: str) -> bool:
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
             if dead(holder)}
    for task, holder in stale.items():
        ledger.release(job, [task], holder)
    return got + (ledger.claim(job, list(stale), owner, ttl_s) if stale else [])


def stopped(ledger: JobLedger, job: str) -> bool:
    record = ledger.get(job) or {}
    return bool(record.get("cancelled") or record.get("error"))


class Job:
    """One job's ledger as one owner works on it, awaited: each call runs in a thread (the
    ledger is Redis or SQLite I/O, never run on the event loop), and every update is stamped
    with `updated_at`."""

    def __init__(self, ledger: JobLedger, spec: JobSpec, owner: str) -> None:
        self.ledger = ledger
        self.spec = spec
        self.owner = owner

    async def update(self, **fields: Any) -> None:
        await asyncio.to_thread(self.ledger.update, self.spec.id, self.spec.project,
                                {**fields, "updated_at": time.time()})

    async def stopped(self) -> bool:
        """Cancelled, or failed: no more items are worked."""
        return await asyncio.to_thread(stopped, self.ledger, self.spec.id)

    async def claim(self, tasks: Sequence[str], ttl_s: float) -> list[str]:
        return await asyncio.to_thread(claim, self.ledger, self.spec.id, tasks, self.owner,
                                       ttl_s)

    async def release(self, tasks: Sequence[str]) -> None:
        await asyncio.to_thread(self.ledger.release, self.spec.id, tasks, self.owner)

    async def finish(self, done: Sequence[str], failed: Mapping[str, str]) -> None:
        await asyncio.to_thread(self.ledger.finish, self.spec.id, done, failed)

    async def done(self) -> set[str]:
        return await asyncio.to_thread(self.ledger.done, self.spec.id)

    async def clear_failures(self) -> None:
        await asyncio.to_thread(self.ledger.clear_failures, self.spec.id)


async def work_item(predictor: Predictor, job: Job, tasks: list[Task]) -> dict[str, int]:
    """Predict `tasks` (those this owner could claim), store the predictions in Label Studio,
    and record the outcome. Returns counts; failures are recorded, never raised."""
    if await job.stopped():
        return {"done": 0, "failed": 0}
    mine = set(await job.claim([str(task["id"]) for task in tasks], CLAIM_TTL_S))
    claimed = [task for task in tasks if str(task["id"]) in mine]
    if not claimed:
        return {"done": 0, "failed": 0}
    try:
        done, failed = await _predict_and_store(predictor, job.spec, claimed)
    except VersionMismatch as exc:
        await job.release(list(mine))
        await job.update(error=str(exc))
        return {"done": 0, "failed": 0}
    except BackendError as exc:
        done, failed = [], {task: str(exc) for task in mine}
    except asyncio.CancelledError:  # released at once: awaiting a thread here is not possible
        job.ledger.release(job.spec.id, list(mine), job.owner)
        raise
    await job.finish(done, failed)
    await job.update()
    metrics.PRELABEL_TASKS.labels("done").inc(len(done))
    metrics.PRELABEL_TASKS.labels("failed").inc(len(failed))
    return {"done": len(done), "failed": len(failed)}


async def _predict_and_store(predictor: Predictor, spec: JobSpec,
                             tasks: list[Task]) -> tuple[list[str], dict[str, str]]:
    results = await _predict(predictor, spec, tasks)
    version = results[0].get("model_version") if results else spec.model_version
    if version != spec.model_version:
        raise VersionMismatch(
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
        async with opened_label_studio(predictor, spec.project) as api:
            try:
                await api.import_predictions(spec.project, rows)
            except LabelStudioError as exc:
                return [], {**failed, **{str(row["task"]): str(exc) for row in rows}}
    return [str(row["task"]) for row in rows], failed


async def _predict(predictor: Predictor, spec: JobSpec, tasks: list[Task]) -> list[dict[str, Any]]:
    while True:
        try:
            return await predictor.predict(tasks, label_config=spec.label_config,
                                           project=spec.project, head=spec.head,
                                           background=True)
        except Overloaded:  # Label Studio's own requests come first
            await asyncio.sleep(OVERLOAD_RETRY_S)


def label_studio_api(predictor: Predictor, project: str) -> LabelStudioAPI:
    access = predictor.label_studio(project)
    if access is None or not access.token:
        raise ConfigError("pre-labeling reads tasks from and writes predictions to Label "
                          "Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    settings = predictor.settings
    # the address guard too: a host named in /setup must not lead to cloud metadata
    transport = GuardedTransport(address_policy(settings).for_label_studio(), httpx.Limits())
    return LabelStudioAPI(access, timeout_s=settings.LABEL_STUDIO_TIMEOUT_S,
                          transport=transport)


@asynccontextmanager
async def opened_label_studio(predictor: Predictor, project: str) -> AsyncIterator[LabelStudioAPI]:
    """`label_studio_api`, closed on the way out."""
    api = label_studio_api(predictor, project)
    try:
        yield api
    finally:
        await api.aclose()
