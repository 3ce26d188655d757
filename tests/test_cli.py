"""backend.cli: `serve` refuses, with the fix named, a MODEL_DIR it cannot write (a host
directory owned by root bind-mounted at the image's /data crashed it with a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]


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
