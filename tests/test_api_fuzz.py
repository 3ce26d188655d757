"""schemathesis against the app's own OpenAPI schema: whatever it sends, no 5xx.

The schemathesis CLI fuzzes the real server on loopback, with the SSRF guard on (no image URL
is allowed) and this process's network guard underneath the server: fuzzed URLs in task data
never leave the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from backend.config import load_settings
from backend.web.app import create_app

from .support.backend_server import BackendThread
from .support.http_server import LoopbackServer

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_input_makes_the_server_fail(tiny_configs, tmp_path):
    with LoopbackServer() as label_studio:  # knows no project: pre-label jobs get its 404
        settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                                 IMAGE_URL_ALLOWLIST="", FETCH_TIMEOUT_S=2.0,
                                 MAX_REQUEST_BYTES=2_000_000, LABEL_STUDIO_URL=label_studio.base,
                                 LABEL_STUDIO_API_KEY="fuzz-token")
        run = fuzz(settings, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def fuzz(settings, tmp_path) -> subprocess.CompletedProcess[str]:
    with BackendThread(create_app(settings)) as server:
        server.wait_model()
        run = subprocess.run(
            [str(SCHEMATHESIS), "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "40", "--seed", "1", "--workers", "1",
             "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
            cwd=tmp_path)  # schemathesis keeps a cache in its working directory
    return run
