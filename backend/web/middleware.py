"""HTTP middleware: who may call (Basic auth, the webhook secret), what every request costs
(Prometheus), the request id its log lines carry (`logs.py`), and how long a client may take
to send its body (REQUEST_BODY_TIMEOUT_S).

All plain ASGI, none of Starlette's `BaseHTTPMiddleware`: that one ends a streamed body
cleanly when the app fails part-way, so an interrupted export would look complete. Here the
error reaches the server, which breaks off the transfer.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics
from ..config import Settings
from ..logs import RequestIdMiddleware

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
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
    """The body deadline outermost (it answers before auth reads a byte), then auth, then
    the metrics of what got through. (The body size limit is FastAPI's own `max_body_size`:
    bodies are counted as they are read, and one that declares or reaches too many bytes is
    refused without being buffered; a body that declares its size too large gets Starlette's
    plain "Content Too Large".)"""
    app.add_middleware(ObserveMiddleware)
    if settings.auth_enabled or settings.WEBHOOK_SECRET:
        app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(BodyDeadline, seconds=settings.REQUEST_BODY_TIMEOUT_S)
    # added last, so outermost: even a refused request gets an id, and every line logged
    # while serving it carries that id
    app.add_middleware(RequestIdMiddleware)


def too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over MAX_REQUEST_BYTES={max_bytes}; send "
                                   "fewer tasks per request or raise the limit"}, 413)


class BodyDeadline:
    """A request's whole body must arrive within `seconds` of its headers, or the client gets
    a 408 and its connection is closed: one that trickles a body (a byte now and then) would
    otherwise hold its connection and its handler forever. uvicorn has no such limit.

    The 408 is sent from here and the app is told the client left (`http.disconnect`), so it
    stops reading; whatever it answers after that is dropped."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _BodyClock(asyncio.get_running_loop().time() + self.seconds)

        async def receive_in_time() -> Message:
            if body.timed_out:
                return {"type": "http.disconnect"}
            if body.complete:  # the body is in: waits for a disconnect are not limited
                return await receive()
            remaining = body.deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                await self._refuse(body, send)
                return {"type": "http.disconnect"}
            body.complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_unless_refused(message: Message) -> None:
            if body.timed_out:
                return
            body.started = body.started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_refused)
        except Exception:
            if not body.timed_out:  # else: the app failing to read the rest is expected
                raise

    async def _refuse(self, body: _BodyClock, send: Send) -> None:
        body.timed_out = True
        if body.started:
            return
        response = JSONResponse({"detail": body_timeout(self.seconds)}, 408,
                                headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": 408,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


@dataclass
class _BodyClock:
    deadline: float
    complete: bool = False
    started: bool = False
    timed_out: bool = False


def body_timeout(seconds: float) -> str:
    return (f"the request body did not arrive within REQUEST_BODY_TIMEOUT_S={seconds:g} s; "
            "send it at once (or raise the limit for very slow links)")


class ObserveMiddleware:
    """Counts and times every request by route and status (the time until the body is sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers, the server answers 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(path, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)


class AuthMiddleware:
    """Basic auth on every route when set. /webhook may instead carry the shared secret,
    because the webhook Label Studio creates sends no Authorization header."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.basic = (f"{settings.BASIC_AUTH_USER}:{settings.BASIC_AUTH_PASS}".encode()
                      if settings.auth_enabled else None)
        self.secret = settings.WEBHOOK_SECRET.encode() if settings.WEBHOOK_SECRET else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(Request(scope)):
            await self.app(scope, receive, send)
            return
        is_webhook = scope["path"] == "/webhook"
        refusal = _unauthorised(is_webhook and self.secret is not None, self.basic is not None)
        await refusal(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        is_webhook = request.url.path == "/webhook"
        if is_webhook and self.secret is not None and _matches(
                request.headers.get(WEBHOOK_SECRET_HEADER, ""), self.secret):
            return True
        if self.basic is not None:
            return _matches(_basic_credentials(request), self.basic)
        return not is_webhook  # only a webhook secret is configured


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
