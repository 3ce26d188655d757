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
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, metrics
from ..config import Settings, load_settings
from ..corrections import export
from ..corrections.summary import summary
from ..errors import (
    BackendError,
    ConfigError,
    ExportError,
    HeadNotFound,
    InvalidEvent,
    JobNotFound,
    JobRunning,
    LabelConfigError,
    LabelStudioError,
    LimitExceeded,
    ModelUnavailable,
    Overloaded,
    ReviewError,
    StoreUnavailable,
    TaskError,
)
from ..formats import EXTENSIONS, MEDIA_TYPES, jsonl_chunks, streamed
from ..jobs.executors import ExecutorName
from ..jobs.prelabel import Prelabeler
from ..labelstudio.client import ProjectId, project_key
from ..model import ZeroShotModel
from ..review.queues import write
from ..runtime import Backend
from ..store.jobs import open_ledger
from .middleware import install_middleware, too_large

log = logging.getLogger(__name__)

_STATUS_FOR: tuple[tuple[type[BackendError], int], ...] = (
    (InvalidEvent, 400),
    (LabelConfigError, 422),
    (TaskError, 422),
    (LimitExceeded, 413),
    (ModelUnavailable, 503),
    (StoreUnavailable, 503),
    (Overloaded, 503),
    (HeadNotFound, 404),
    (ReviewError, 422),
    (JobNotFound, 404),
    (JobRunning, 409),
    (LabelStudioError, 502),
    (ConfigError, 503),
)


EXAMPLE_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="animal" '
                  'toName="image"><Choice value="Cat"/><Choice value="Dog"/></Choices></View>')
MAX_EVENT_DEPTH = 64
"""Nesting levels a webhook body may have; Label Studio's events have about 10."""
WEBHOOK_BODY = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["action"], "additionalProperties": True,
    "properties": {"action": {"type": "string", "example": "ANNOTATION_CREATED"},
                   "project": {"type": "object"}, "annotation": {}, "task": {}},
}}}, "required": True, "description": "A Label Studio webhook event"}


class ActivateRequest(BaseModel):
    project: str = Field(min_length=1, max_length=100)
    head: str = Field(min_length=1, max_length=40, description="`h3`, or `zero-shot`")


class PrelabelRequest(BaseModel):
    project: int = Field(..., ge=1, description="Label Studio project id", examples=[3])
    executor: ExecutorName | None = Field(
        None, description="local: this process; rq: RQ workers (default: PRELABEL_EXECUTOR)")


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str | int | None = Field(None, examples=["3.1764300000"])
    label_config: str = Field(..., alias="schema", description="The project's label config XML",
                              examples=[EXAMPLE_CONFIG])
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | str | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]] = Field(
        ..., examples=[[{"id": 1, "data": {"image": "data:image/png;base64,iVBORw0KGgo="}}]])
    label_config: str | None = Field(None, examples=[EXAMPLE_CONFIG])
    project: str | int | None = Field(None, examples=["3.1764300000"])
    params: dict[str, Any] | None = None


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
    _add_error_handlers(app, settings)

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
        key = _project_id(project)
        listing = await asyncio.to_thread(backend.heads_listing, key)
        run = backend.last_run(key)
        return {"project": project, "heads": listing,
                "active": await asyncio.to_thread(backend.active_head_id, key),
                "fitting": backend.fitting(key),
                "last_run": run.__dict__ if run else None}

    @app.post("/heads/activate")
    async def activate(body: ActivateRequest) -> dict[str, Any]:
        """Roll a project back (or forward) to a stored head, or to `zero-shot`."""
        await asyncio.to_thread(backend.activate_head, _project_id(body.project), body.head)
        return {"project": body.project, "active": body.head}

    @app.get("/metrics")
    async def prometheus() -> Response:
        backend.update_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    _add_export_routes(app, backend)
    _add_prelabel_routes(app, jobs, settings)
    return app


def _add_prelabel_routes(app: FastAPI, jobs: Prelabeler, settings: Settings) -> None:
    """Whole-project pre-labeling: started here, worked in the background (prelabel.py)."""

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


def _add_export_routes(app: FastAPI, backend: Backend) -> None:
    """The corrections dataset and its summary, read from the store off the event loop."""

    @app.get("/export/corrections")
    async def export_rows(fmt: str = Query("jsonl", alias="format"), project: str | None = None,
                          since: str | None = None, only_changed: bool = False,
                          include_deleted: bool = False, embeddings: bool = False,
                          trailer: bool = True) -> Response:
        """JSONL and CSV are streamed and end with a trailer record (`trailer=false`: none on
        success); Parquet is built whole, so it is complete or an error status."""
        export.check_format(fmt)
        export.parse_since(since)  # a bad value is a 422 now, not a broken stream later
        headers = {"Content-Disposition": f'attachment; filename="{_filename(project, fmt)}"'}
        filters: dict[str, Any] = {"project": project, "since": since,
                                   "only_changed": only_changed,
                                   "include_deleted": include_deleted}
        if fmt == "parquet":
            body = await asyncio.to_thread(backend.corrections_parquet, filters, embeddings)
            return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)
        if embeddings:
            raise ExportError("embeddings=true is supported only with format=parquet "
                                     "over HTTP (JSONL and CSV carry them in a separate .npy: "
                                     "use the CLI)")
        rows = await asyncio.to_thread(_started, backend.correction_rows(**filters))
        return StreamingResponse(streamed(rows, fmt, export.COLUMNS, trailer),
                                 media_type=MEDIA_TYPES[fmt], headers=headers)

    @app.get("/export/selection")
    async def export_selection(
            project: str, strategy: str = "uncertainty", budget: int = Query(50, ge=1, le=100_000),
            seed: int = 0, uncertainty: str = "margin",
            random_fraction: float = Query(0.1, ge=0.0, le=1.0), control: str | None = None,
            fmt: str = Query("jsonl", alias="format")) -> Response:
        """Tasks to label next: strategy uncertainty | coreset | uncertain_diverse |
        cold_start | random; format jsonl | csv | labelstudio (tasks to import)."""
        rows, header, data_key = await backend.review_export(
            "selection", _project_id(project), control=control, strategy=strategy,
            budget=budget, seed=seed, uncertainty=uncertainty, random_fraction=random_fraction)
        return _review_response(rows, header, fmt, "selection", data_key, project)

    @app.get("/export/review")
    async def export_review(project: str, target_precision: float = Query(0.95, gt=0.0, le=1.0),
                            control: str | None = None,
                            fmt: str = Query("jsonl", alias="format")) -> Response:
        """Tasks a human should check: likely label errors, model–annotator disagreements,
        and predictions below the confidence that reaches `target_precision`."""
        rows, header, data_key = await backend.review_export(
            "review", _project_id(project), control=control, target_precision=target_precision)
        return _review_response(rows, header, fmt, "review", data_key, project)

    @app.get("/export/dead-letters")
    async def export_dead_letters() -> Response:
        """Log entries the store could never apply, each with why (JSONL): fix their `entry`
        and apply them with `python -m backend replay dead-letters --input FILE`."""
        letters = await asyncio.to_thread(backend.dead_letters)
        return Response(b"".join(jsonl_chunks(letters)),
                        media_type=MEDIA_TYPES["jsonl"], headers={
                            "Content-Disposition": 'attachment; filename="dead-letters.jsonl"'})

    @app.get("/export/summary")
    async def export_summary(project: str | None = None,
                             since: str | None = None) -> dict[str, Any]:
        export.parse_since(since)
        rows = backend.correction_rows(project=project, since=since)
        return await asyncio.to_thread(summary, rows)


def _review_response(rows: list[dict[str, Any]], header: dict[str, Any], fmt: str, kind: str,
                     data_key: str, project: str) -> Response:
    body = b"".join(write(rows, header, fmt, kind, data_key))
    suffix = EXTENSIONS[fmt]
    name = f"{kind}-project-{project}.{suffix}" if project.isdigit() else f"{kind}.{suffix}"
    return Response(body, media_type=MEDIA_TYPES[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _started(rows: Iterator[export.Row]) -> Iterator[export.Row]:
    """Read the first row now, so a store that is down is a 503, not a truncated download."""
    first = list(itertools.islice(rows, 1))
    return itertools.chain(first, rows)


def _project_id(value: str) -> ProjectId:
    """A project id from a query or body: "3", or Label Studio's "3.1700000000"."""
    return project_key(value) or ProjectId(value)


def _filename(project: str | None, fmt: str) -> str:
    key = project_key(project)
    suffix = f"-project-{key}" if key and key.isascii() and key.isdigit() else ""
    return f"corrections{suffix}.{fmt}"


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


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def backend_error(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for kind, code in _STATUS_FOR if isinstance(exc, kind)), 500)
        if isinstance(exc, LabelStudioError) and exc.status == 404:
            status = 404  # Label Studio has no such project: the caller's mistake, relayed
        if isinstance(exc, Overloaded):  # can be hundreds a second: counted, not logged
            metrics.SHED.inc()
        else:
            log.warning("%s %s → %d: %s", request.method, request.url.path, status, exc)
        headers = {"Retry-After": "5"} if isinstance(exc, Overloaded) else None
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status,
                            headers=headers)

    async def bad_export(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, 422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:
            return too_large(settings.MAX_REQUEST_BYTES)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(BackendError, backend_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ExportError, bad_export)
