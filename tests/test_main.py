"""`python -m backend`: the image's command, PID 1 in a container without an init.

The kernel drops SIGTERM sent to a PID 1 without a handler, so `docker stop` during the
seconds the CLI spends importing torch and pyarrow was ignored until Docker's SIGKILL. Here a
real process gets SIGTERM while it is importing; not being PID 1, it would die of the signal
(status -15) without a handler, and must instead exit 0 at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_while_the_cli_is_still_importing_exits_0(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_DIR": str(tmp_path / "model-dir"),
           "PORT": str(free_port()), "REDIS_URL": "", "PYTHONUNBUFFERED": "1"}
    # -X importtime reports each import as it ends: once backend.config is reported, the
    # CLI's own imports (torch, pyarrow: seconds) are under way
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "backend", "serve"],
                               cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.rpartition("|")[2].strip() == "backend.config":
                break
        else:
            raise AssertionError("backend.config was never imported")
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, rest[-2000:]
    assert "Traceback" not in rest
