"""Run the backend's real ASGI app under uvicorn on a loopback port, in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

T = TypeVar("T")


class BackendThread:
    """`with BackendThread(app) as server: httpx.get(server.url + "/health")`"""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on TCP-protocol
        # sockets; without it every keep-alive response waits ~40 ms for a delayed ACK
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        serve = self._server.serve

        async def serve_and_keep_loop(sockets: list[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await serve(sockets)

        self._server.serve = serve_and_keep_loop  # type: ignore[method-assign]
        self._server.run(sockets=[self._socket])

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's event loop (as a request handler would)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def __enter__(self) -> BackendThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("backend server did not start")
            time.sleep(0.02)
        return self

    def wait_model(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = httpx.get(self.url + "/health", timeout=5).json()
            if health["model_state"] != "loading":
                return health
            time.sleep(0.1)
        raise RuntimeError("model did not load")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(60)
        self._socket.close()
