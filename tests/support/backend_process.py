"""The backend as users run it: `python -m backend serve` in a subprocess, on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


class BackendProcess:
    """`python -m backend serve` as users run it, on a loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port),
                     "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def __enter__(self) -> BackendProcess:
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=REPO,
                                         env=self._env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"backend exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).json()["model_state"] == "ready":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"backend not ready: {self.log_path.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, as `docker stop` sends it; the exit status once the process has ended."""
        self._process.send_signal(signal.SIGTERM)
        return self._process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer ends it: no shutdown, nothing flushed."""
        self._process.kill()
        self._process.wait(30)

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()

    def counter(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
