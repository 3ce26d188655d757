"""Log lines: plain text or one JSON object per line (LOG_FORMAT), each tagged with the id of
the HTTP request it belongs to.

The request id comes from the caller's `X-Request-ID` header (so a proxy's or Label Studio's id
follows the request through) or is generated; it is returned in the response's `X-Request-ID`
and kept in a context variable, which `asyncio.to_thread` and child tasks inherit, so every
line logged while serving the request carries it.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import logging.config
import re
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"

# an incoming id is echoed into logs and headers: only short, plain tokens are taken as they are
_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# characters that end or rewrite a line on a terminal or in a log viewer (C0, DEL, C1, U+2028/9)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime",
                                                                "request_id", "color_message"}


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the current request's id, or "-" outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT lines whose message is one line, whatever its arguments hold: control
    characters (a newline in a webhook's `action` or an image URL) are escaped, so input cannot
    forge log lines. A traceback, when there is one, follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def escape_controls(text: str) -> str:
    """`text` with each control character written as a Python escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id,
    exception (the traceback, when there is one) and any JSON-serialisable `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id and request_id != "-":
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        line.update(_extras(record))
        return json.dumps(line, ensure_ascii=False, default=str)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items()
            if key not in _RECORD_FIELDS and isinstance(value, (str, int, float, bool))}


def logging_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the backend and uvicorn: one handler on stderr, the
    format LOG_FORMAT asks for. uvicorn applies it in every worker process."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if settings.LOG_FORMAT == "json"
        else {"()": f"{__name__}.TextFormatter", "fmt": TEXT_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": "default", "filters": ["request_id"]}},
        "root": {"level": settings.LOG_LEVEL, "handlers": ["default"]},
        # uvicorn's own loggers propagate to the root handler instead of keeping their own;
        # httpx would log every image URL at INFO, presigned signatures included
        # (their levels follow uvicorn's --log-level, set after this config is applied)
        "loggers": {**{name: {"handlers": [], "propagate": True, "level": "NOTSET"}
                       for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
                    **{name: {"level": "WARNING"} for name in ("httpx", "httpcore")}},
    }


def configure_logging(settings: Settings) -> None:
    logging.config.dictConfig(logging_config(settings))


def request_id_from(value: str | None) -> str:
    """The caller's id if it is a plain token, else a new one."""
    if value and _VALID_ID.match(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Outermost ASGI middleware: sets REQUEST_ID for the request and returns it as a header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, REQUEST_ID_HEADER))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return bytes(value).decode("latin-1")
    return None
