"""A real HTTP server on 127.0.0.1 that serves canned responses and records requests.

Used wherever a test needs images served over the network: the backend fetches from it exactly
as it would from any web server (no mocked transport).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drip_s: float = 0.0
    """Seconds between 1 KiB chunks: a slow server."""
    require_header: tuple[str, str] | None = None
    """(name, value) the request must carry, else 401."""
    declared_length: int | None = None
    """Content-Length to announce (defaults to the real one)."""
    chunked: bool = False
    """Send the body with chunked transfer encoding, announcing no length."""


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    request_queue_size = 128
    """The listen backlog. socketserver's default, 5, drops connections a burst opens at once
    (the decode processes open up to FETCH_CONCURRENCY each); a dropped SYN is retried only
    after a second, a stall no real image server shows."""


class LoopbackServer:
    """`with LoopbackServer() as server: server.add('/a.png', Route(...)); server.url('/a.png')`"""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route | Callable[[Recorded], Route]] = {}
        self.requests: list[Recorded] = []
        self._server = _Server((host, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, route: Route | Callable[[Recorded], Route]) -> str:
        self.routes[path] = route
        return self.url(path)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PATCH(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                record = Recorded(self.command, self.path, dict(self.headers.items()),
                                  self.rfile.read(length) if length else b"")
                owner.requests.append(record)
                route = owner.routes.get(self.path) or owner.routes.get(self.path.split("?")[0])
                if callable(route):
                    route = route(record)
                if route is None:
                    route = Route(b"not found", 404, "text/plain")
                if route.require_header and self.headers.get(route.require_header[0]) != route.require_header[1]:
                    route = Route(b"unauthorized", 401, "text/plain")
                self._respond(route)

            def _respond(self, route: Route) -> None:
                time.sleep(route.delay_s)
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                length = route.declared_length if route.declared_length is not None else len(route.body)
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(length))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    if route.chunked:
                        for start in range(0, len(route.body), 4096):
                            piece = route.body[start:start + 4096]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    elif route.drip_s:
                        for start in range(0, len(route.body), 1024):
                            self.wfile.write(route.body[start:start + 1024])
                            self.wfile.flush()
                            time.sleep(route.drip_s)
                    else:
                        self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
