"""The pre-label routes: whole-project jobs started here, worked in the background
(jobs/prelabel.py) or by RQ workers."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Query

from ..config import Settings
from ..jobs.executors import ExecutorName
from ..jobs.prelabel import Prelabeler
from .schemas import PrelabelRequest


def add_prelabel_routes(app: FastAPI, jobs: Prelabeler, settings: Settings) -> None:
    """Whole-project pre-labeling: started here, worked in the background (jobs/prelabel.py)."""

    @app.post("/prelabel", status_code=202)
    async def start_prelabel(body: PrelabelRequest) -> dict[str, Any]:
        """Start pre-labeling every task of the project that has no prediction for the current
        model_version (a running or finished job for that version is resumed, not repeated)."""
        executor: ExecutorName = body.executor or settings.PRELABEL_EXECUTOR
        return await jobs.start(str(body.project), executor)

    @app.get("/prelabel")
    async def list_prelabel(project: str = Query(..., description="Label Studio project id")
                            ) -> dict[str, Any]:
        return {"project": project, "jobs": await asyncio.to_thread(jobs.jobs, project)}

    @app.get("/prelabel/{job}")
    async def prelabel_status(job: str) -> dict[str, Any]:
        """Progress: status, total, done (skipped included), failed (reasons), queued."""
        return await asyncio.to_thread(jobs.status, job)

    @app.post("/prelabel/{job}/cancel")
    async def cancel_prelabel(job: str) -> dict[str, Any]:
        return await asyncio.to_thread(jobs.cancel, job)
