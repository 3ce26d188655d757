"""The HTTP face of the backend: Label Studio's ML-backend protocol on FastAPI.

| route             | Label Studio's use (label-studio-protocol.md)                  | budget |
|-------------------|----------------------------------------------------------------|--------|
| GET /, /health    | connection check before every batch (liveness: always UP)      | 1 s    |
| GET /ready        | – (readiness: 200 once the model is loaded, else 503)          | 1 s    |
| POST /setup       | config check, model_version (also before every batch)          | 3 s    |
| POST /predict     | all selected tasks in one call                                 | 100 s  |
| POST /webhook     | every project event; START_TRAINING from the Train button      | 1 s    |
| GET /versions     | model versions this process has issued                         | 3 s    |
| GET /metrics      | Prometheus scrape                                              | –      |
| GET /export/...   | corrections (JSONL, CSV, Parquet), summary, dead letters       | –      |
| POST /prelabel    | start (or resume) pre-labeling a whole project, in background  | –      |
| GET /prelabel/... | a job's progress: queued, done, failed (with reasons)          | –      |

Handlers only parse (the project id once, here) and delegate to the process's `Backend`
(runtime.py), through the label-studio-ml facade `ZeroShotModel` for /setup, /predict, /webhook.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..config import Settings, load_settings
from ..errors import LabelConfigError, LimitExceeded
from ..jobs.prelabel import Prelabeler
from ..labelstudio.client import project_key
from ..model import ZeroShotModel
from ..runtime import Backend
from ..store.jobs import open_ledger
from .exports import add_export_routes
from .middleware import install_middleware
from .prelabel import add_prelabel_routes
from .schemas import (
    WEBHOOK_BODY,
    ActivateRequest,
    PredictRequest,
    SetupRequest,
    project_id,
)
from .statuses import add_error_handlers

log = logging.getLogger(__name__)

MAX_EVENT_DEPTH = 64
"""Nesting levels a webhook body may have; Label Studio's events have about 10."""


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the app; the model starts loading (in the background) when the app starts."""
    backend = backend or Backend(settings or load_settings())
    settings = settings or backend.settings
    model = ZeroShotModel(backend)
    background: set[asyncio.Task[Any]] = set()

    jobs = Prelabeler(backend, open_ledger(backend.store), settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        backend.start()
        yield
        await jobs.aclose()
        await backend.aclose()
        log.info("stopped: in-flight work finished; corrections left in the spool for the next "
                 "start: %d", backend.spooled)

    app = FastAPI(title="CLIP zero-shot pre-labeling backend for Label Studio",
                  version=__version__, lifespan=lifespan,
                  max_body_size=settings.MAX_REQUEST_BYTES)
    app.state.backend = backend
    app.state.model = model
    install_middleware(app, settings)
    add_error_handlers(app, settings)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = backend.status
        backend.update_gauges()
        return {"status": "UP", "model_class": type(model).__name__,
                "model_state": status.state, "model_error": status.error,
                "model": backend.model_label, "load_seconds": status.load_seconds,
                **status.details}

    @app.get("/ready", response_model=None)
    async def ready() -> dict[str, Any] | JSONResponse:
        """Readiness, for orchestrators: 503 while the model loads and after it failed."""
        status = backend.status
        body = {"status": "READY" if status.state == "ready" else "NOT_READY",
                "model_state": status.state, "model_error": status.error}
        return body if status.state == "ready" else JSONResponse(body, 503)

    @app.post("/setup")
    async def setup(body: SetupRequest) -> dict[str, Any]:
        version = await model.setup(body.label_config, project_key(body.project),
                                    body.hostname, body.access_token)
        job = asyncio.create_task(backend.warm_up(body.label_config))
        background.add(job)
        job.add_done_callback(_finish_background(background))
        return {"model_version": version}

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        if not body.label_config:
            raise LabelConfigError("The request has no label_config; Label Studio always sends "
                                   "one — check what is calling /predict.")
        limit = settings.MAX_TASKS_PER_REQUEST
        if len(body.tasks) > limit:
            raise LimitExceeded(f"{len(body.tasks)} tasks in one request; the limit is "
                                f"MAX_TASKS_PER_REQUEST={limit}: select fewer tasks")
        context = (body.params or {}).get("context")
        results = await model.predict(body.tasks, context, label_config=body.label_config,
                                      project=project_key(body.project))
        return {"results": results}

    @app.post("/webhook", openapi_extra={"requestBody": WEBHOOK_BODY})
    async def webhook(request: Request) -> JSONResponse:
        try:
            event = await request.json()
        except ValueError:
            return JSONResponse({"status": "error", "detail": "the body is not JSON"}, 400)
        except RecursionError:
            return _too_deep()
        if _deeper_than(event, MAX_EVENT_DEPTH):
            return _too_deep()
        if not isinstance(event, dict) or not isinstance(event.get("action"), str):
            return JSONResponse({"status": "error", "detail": "expected {\"action\": ...}"}, 400)
        try:
            return JSONResponse(await model.fit(event["action"], event))
        except OSError as exc:  # neither the store nor the local spool could take it
            log.error("webhook %s NOT recorded: %s", event["action"], exc)
            return JSONResponse({"status": "error", "detail": f"not recorded: {exc}"}, 503)

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return {"versions": backend.issued_versions(), "model": backend.model_label}

    @app.get("/heads")
    async def heads(project: str = Query(..., description="Label Studio project id")
                    ) -> dict[str, Any]:
        """The project's adapted heads with their held-out evidence; `active` marks the one
        served (none active: zero-shot)."""
        key = project_id(project)
        listing = await asyncio.to_thread(backend.heads_listing, key)
        run = backend.last_run(key)
        return {"project": project, "heads": listing,
                "active": await asyncio.to_thread(backend.active_head_id, key),
                "fitting": backend.fitting(key),
                "last_run": run.__dict__ if run else None}

    @app.post("/heads/activate")
    async def activate(body: ActivateRequest) -> dict[str, Any]:
        """Roll a project back (or forward) to a stored head, or to `zero-shot`."""
        await asyncio.to_thread(backend.activate_head, project_id(body.project), body.head)
        return {"project": body.project, "active": body.head}

    @app.get("/metrics")
    async def prometheus() -> Response:
        backend.update_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    add_export_routes(app, backend)
    add_prelabel_routes(app, jobs, settings)
    return app


def _too_deep() -> JSONResponse:
    return JSONResponse({"status": "error", "detail": f"the body is JSON nested more than "
                         f"{MAX_EVENT_DEPTH} levels deep; Label Studio's events are not: check "
                         "what is calling /webhook"}, 400)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests more than `limit` levels (checked without recursion)."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


def _finish_background(pending: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("prompt warm-up failed: %s", task.exception())
    return done


