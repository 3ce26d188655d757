"""HTTP middleware: who may call (Basic auth, the webhook secret), what every request costs
(Prometheus), and the request id its log lines carry (`logs.py`)."""

from __future__ import annotations

import base64
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from . import metrics
from .config import Settings
from .logs import RequestIdMiddleware

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
Handler = Callable[[Request], Awaitable[Response]]
OPEN_ROUTES_FIX = ("set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same pair in Label Studio's "
                   "model connection, Authentication: Basic), or HOST=127.0.0.1 when Label Studio "
                   "runs on this machine")


def is_loopback(host: str) -> bool:
    """True if listening on `host` accepts connections from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # another name, or an interface address: reachable from elsewhere
        return False


def exposure(settings: Settings, host: str, port: int) -> str | None:
    """Why anyone who reaches the server may call every route, or None when they may not."""
    if settings.auth_enabled or is_loopback(host):
        return None
    return (f"authentication is off and HOST={host} is not a loopback address: anyone who can "
            f"reach port {port} may call /setup, /predict, /prelabel, /heads/activate and "
            "/export/*" + (" (WEBHOOK_SECRET guards /webhook only)" if settings.WEBHOOK_SECRET
                           else ""))


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Auth outermost, then the metrics of what got through. (The body size limit is
    FastAPI's own `max_body_size`: bodies are counted as they are read, and one that declares
    or reaches too many bytes is refused without being buffered; a body that declares its
    size too large gets Starlette's plain "Content Too Large".)"""
    app.middleware("http")(_observe)
    if settings.auth_enabled or settings.WEBHOOK_SECRET:
        app.middleware("http")(_authenticate(settings))
    # added last, so outermost: even a refused request gets an id, and every line logged
    # while serving it carries that id
    app.add_middleware(RequestIdMiddleware)


def too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over MAX_REQUEST_BYTES={max_bytes}; send "
                                   "fewer tasks per request or raise the limit"}, 413)


async def _observe(request: Request, call_next: Handler) -> Response:
    started = time.perf_counter()
    response = await call_next(request)
    path = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.REQUESTS.labels(path, str(response.status_code)).inc()
    metrics.REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)
    return response


def _authenticate(settings: Settings) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Basic auth on every route when set. /webhook may instead carry the shared secret,
    because the webhook Label Studio creates sends no Authorization header."""
    basic = (f"{settings.BASIC_AUTH_USER}:{settings.BASIC_AUTH_PASS}".encode()
             if settings.auth_enabled else None)
    secret = settings.WEBHOOK_SECRET.encode() if settings.WEBHOOK_SECRET else None

    async def check(request: Request, call_next: Handler) -> Response:
        is_webhook = request.url.path == "/webhook"
        if is_webhook and secret is not None and _matches(
                request.headers.get(WEBHOOK_SECRET_HEADER, ""), secret):
            return await call_next(request)
        if basic is not None and _matches(_basic_credentials(request), basic):
            return await call_next(request)
        if basic is None and not is_webhook:  # only a webhook secret is configured
            return await call_next(request)
        return _unauthorised(is_webhook and secret is not None, basic is not None)

    return check


def _matches(given: str | bytes, expected: bytes) -> bool:
    """Constant-time: the time taken does not tell how much of a guess was right."""
    data = given.encode() if isinstance(given, str) else given
    return secrets.compare_digest(data, expected)


def _basic_credentials(request: Request) -> bytes:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        return b""


def _unauthorised(webhook_secret: bool, basic: bool) -> JSONResponse:
    ways = ([f"the {WEBHOOK_SECRET_HEADER} header"] if webhook_secret else []) + (
        ["HTTP Basic auth"] if basic else [])
    headers = {"WWW-Authenticate": 'Basic realm="backend"'} if basic else {}
    return JSONResponse({"detail": f"authentication required: {' or '.join(ways)}"}, 401,
                        headers=headers)
