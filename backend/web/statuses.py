"""Errors → HTTP responses: each `BackendError` kind has its status, and the body names what
to fix."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import metrics
from ..config import Settings
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
from .middleware import too_large

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


def add_error_handlers(app: FastAPI, settings: Settings) -> None:
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
