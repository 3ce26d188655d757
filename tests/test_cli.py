"""backend.cli: what `serve` says before it serves (every route open beyond loopback), and
what it refuses with the fix named (a MODEL_DIR it cannot write: a host directory owned by root
bind-mounted at the image's /data crashed it with a traceback)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.cli import warn_if_open
from backend.config import load_settings

from .support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("host", "auth", "warned"), [
    ("0.0.0.0", False, True), ("::", False, True), ("192.168.1.5", False, True),
    ("backend.internal", False, True),
    ("127.0.0.1", False, False), ("::1", False, False), ("localhost", False, False),
    ("0.0.0.0", True, False),
])
def test_serving_every_route_without_auth_beyond_loopback_is_warned_about(caplog, host, auth,
                                                                          warned):
    users = {"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"} if auth else {}
    with caplog.at_level(logging.WARNING):
        warn_if_open(load_settings(**users), host, 9090)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(lines) == warned
    if warned:
        assert f"HOST={host} is not a loopback address" in lines[0]
        assert "port 9090" in lines[0] and "BASIC_AUTH_USER" in lines[0]


def serve(tmp_path: Path, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_DIR": str(model_dir),
           "PORT": str(free_port()), "REDIS_URL": ""}
    return subprocess.run([sys.executable, "-m", "backend", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def unwritable_directories(tmp_path: Path) -> list[Path]:
    """A directory under a regular file (unwritable even for root) and, for other users, one
    owned by this user without write permission (as root's is for uid 10001)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    found = [blocker / "model-dir"]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        found.append(locked / "model-dir")
    return found


def test_serve_names_the_fix_for_an_unwritable_model_dir(tmp_path: Path):
    for model_dir in unwritable_directories(tmp_path):
        result = serve(tmp_path, model_dir)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert f"MODEL_DIR {model_dir} is not writable" in result.stderr
        assert "chown -R 10001:10001" in result.stderr


@pytest.mark.parametrize("name", ["MODEL_DIR", "MODEL_CACHE_DIR"])
def test_unwritable_checks_each_directory_and_passes_writable_ones(tmp_path: Path, name: str):
    from backend.cli import _unwritable
    from backend.config import load_settings

    writable = {"MODEL_DIR": tmp_path / "state", "MODEL_CACHE_DIR": tmp_path / "weights"}
    assert _unwritable(load_settings(**writable)) is None
    assert (tmp_path / "state").is_dir() and (tmp_path / "weights").is_dir()
    bad = unwritable_directories(tmp_path)[0]
    message = _unwritable(load_settings(**{**writable, name: bad}))
    assert message is not None and message.startswith(f"{name} {bad} is not writable")


def test_sigterm_after_graceful_shutdown_exits_0_without_the_interpreter_teardown(tmp_path: Path):
    """The teardown (collecting torch's objects) took 3-4 s in the image, past `docker stop`'s
    patience: once uvicorn's graceful shutdown is over the process leaves with os._exit(0).
    An atexit hook stands for the teardown: it must not run."""
    import signal
    import time

    import httpx

    sys.path.insert(0, str(REPO / "tests" / "support"))
    from tiny_models import write_config

    hook = tmp_path / "sitecustomize.py"
    hook.write_text("import atexit\natexit.register(lambda: print('TEARDOWN RAN', flush=True))\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "PORT": str(port),
           "MODEL_DIR": str(tmp_path / "model-dir"), "REDIS_URL": "",
           "MODEL_CONFIG": str(write_config(tmp_path / "tiny")), "MODEL_PRETRAINED": "none"}
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, output[-2000:]
    assert "Application shutdown complete" in output
    assert "TEARDOWN RAN" not in output
