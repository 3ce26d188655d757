"""The HTTP face of the backend: Label Studio's ML-backend protocol on FastAPI.

| route             | Label Studio's use (label-studio-protocol.md)                  | budget |
|-------------------|----------------------------------------------------------------|--------|
| GET /, /health    | connection check before every batch                            | 1 s    |
| POST /setup       | config check, model_version (also before every batch)          | 3 s    |
| POST /predict     | all selected tasks in one call                                 | 100 s  |
| POST /webhook     | every project event; START_TRAINING from the Train button      | 1 s    |
| GET /versions     | model versions this process has issued                         | 3 s    |
| GET /metrics      | Prometheus scrape                                              | –      |

Handlers only parse and delegate to `ZeroShotModel`; the model runs on its own thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from . import __version__, metrics
from .config import Settings, load_settings
from .errors import BackendError, LabelConfigError, ModelUnavailable, TaskError
from .model import ZeroShotModel

log = logging.getLogger(__name__)

_STATUS_FOR: tuple[tuple[type[BackendError], int], ...] = (
    (LabelConfigError, 422),
    (TaskError, 422),
    (ModelUnavailable, 503),
)


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str | int | None = None
    label_config: str = Field(..., alias="schema", description="The project's label config XML")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | str | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]]
    label_config: str | None = None
    project: str | int | None = None
    params: dict[str, Any] | None = None


def create_app(settings: Settings | None = None, model: ZeroShotModel | None = None) -> FastAPI:
    """Build the app; the model starts loading (in the background) when the app starts."""
    settings = settings or load_settings()
    model = model or ZeroShotModel(settings)
    background: set[asyncio.Task[Any]] = set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        model.start()
        yield
        await model.aclose()

    app = FastAPI(title="CLIP zero-shot pre-labeling backend for Label Studio",
                  version=__version__, lifespan=lifespan)
    app.state.model = model
    app.middleware("http")(_observe)
    if settings.auth_enabled:
        app.middleware("http")(_basic_auth(settings))
    _add_error_handlers(app)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = model.status
        metrics.INFERENCE_QUEUE.set(model.worker.pending)
        return {"status": "UP", "model_class": type(model).__name__,
                "model_state": status.state, "model_error": status.error,
                "model": model.model_label, "load_seconds": status.load_seconds,
                **status.details}

    @app.post("/setup")
    async def setup(body: SetupRequest) -> dict[str, Any]:
        # parsing a large label config takes milliseconds to seconds: keep /health responsive
        version = await asyncio.to_thread(model.setup, body.label_config, body.project,
                                          body.hostname, body.access_token)
        job = asyncio.create_task(model.warm_up(body.label_config))
        background.add(job)
        job.add_done_callback(_finish_background(background))
        return {"model_version": version}

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        if not body.label_config:
            raise LabelConfigError("The request has no label_config; Label Studio always sends "
                                   "one — check what is calling /predict.")
        context = (body.params or {}).get("context")
        results = await model.predict(body.tasks, context, label_config=body.label_config,
                                      project=body.project)
        return {"results": results}

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        try:
            event = await request.json()
        except ValueError:
            return JSONResponse({"status": "error", "detail": "the body is not JSON"}, 400)
        if not isinstance(event, dict) or not isinstance(event.get("action"), str):
            return JSONResponse({"status": "error", "detail": "expected {\"action\": ...}"}, 400)
        return JSONResponse(model.fit(event["action"], event))

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return {"versions": model.issued_versions(), "model": model.model_label}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.INFERENCE_QUEUE.set(model.worker.pending)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _finish_background(pending: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("prompt warm-up failed: %s", task.exception())
    return done


Handler = Callable[[Request], Awaitable[Response]]


async def _observe(request: Request, call_next: Handler) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")
    metrics.REQUESTS.labels(path, str(response.status_code)).inc()
    metrics.REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)
    return response


def _basic_auth(settings: Settings) -> Callable[[Request, Handler], Awaitable[Response]]:
    expected = f"{settings.BASIC_AUTH_USER}:{settings.BASIC_AUTH_PASS}".encode()

    async def check(request: Request, call_next: Handler) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else b""
        except ValueError:
            given = b""
        if not secrets.compare_digest(given, expected):
            return JSONResponse({"detail": "HTTP Basic authentication required"}, 401,
                                headers={"WWW-Authenticate": 'Basic realm="backend"'})
        return await call_next(request)

    return check


def _add_error_handlers(app: FastAPI) -> None:
    async def backend_error(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for kind, code in _STATUS_FOR if isinstance(exc, kind)), 500)
        log.warning("%s %s → %d: %s", request.method, request.url.path, status, exc)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status)

    app.add_exception_handler(BackendError, backend_error)
