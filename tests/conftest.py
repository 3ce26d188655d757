"""Shared fixtures. Everything runs offline, against servers on 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from backend.config import Settings, load_settings
from backend.images import plane as _plane
from backend.store import Store, open_store

from .support.http_server import LoopbackServer
from .support.network_guard import install_loopback_only_guard
from .support.redis_server import RedisServer
from .support.session_resources import build_before_tests, close_prebuilt, prebuilt
from .support.tiny_models import write_config

# Before a test module imports huggingface_hub (it reads this once), and before any test runs:
# tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
install_loopback_only_guard()
# ... and in the data plane's decode processes too (they are spawned: nothing is inherited)
_plane.CHILD_SETUP.append(install_loopback_only_guard)

REPO = Path(__file__).resolve().parents[1]
TESTBED_CACHE = Path(os.environ.get("TESTBED_CACHE", REPO / ".testbed-cache"))

# Settings come from the environment: a developer's own variables must not leak into tests.
_SETTING_NAMES = set(Settings.model_fields)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper() in _SETTING_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))  # no state shared by tests
    # test image servers listen on 127.0.0.1, which the SSRF guard refuses unless allowed;
    # tests of the guard itself set their own allow-list
    monkeypatch.setenv("IMAGE_URL_ALLOWLIST", "127.0.0.1")
    # the data plane is on, as by default, with one decode process whatever the machine
    monkeypatch.setenv("DECODE_PROCESSES", "1")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs the CLI configures logging onto that test's captured stderr; later
    tests must not log into the closed stream."""
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error",
                                                     "uvicorn.access", "httpx", "httpcore")]
    saved = [(lg, lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, level, handlers, propagate, disabled in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tiny-configs")
    return {family: write_config(directory, family) for family in ("clip", "siglip")}


@pytest.fixture
def tiny_settings(tiny_configs: dict[str, Path], tmp_path: Path) -> Settings:
    """Settings for a tiny random-weight CLIP: fast, for protocol and plumbing tests."""
    return load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                         MODEL_DIR=tmp_path / "model-dir")


def _micro_clip(stack: ExitStack):  # type: ignore[no-untyped-def]
    from .support.microclip_cache import ensure_usable_micro_clip  # imports torch: when needed

    return ensure_usable_micro_clip(TESTBED_CACHE, family="clip")


def pytest_collection_finish(session: pytest.Session) -> None:
    # Training takes minutes on a busy machine: before the tests, outside their timeouts.
    build_before_tests(session, "micro_clip", f"micro-CLIP testbed ({TESTBED_CACHE})", _micro_clip)


def pytest_sessionfinish(session: pytest.Session) -> None:
    close_prebuilt(session.config)


@pytest.fixture(scope="session")
def micro_clip(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The micro CLIP trained on synthetic colour × shape images (cached between runs), built
    before the first test (tests/support/session_resources.py)."""
    return prebuilt(request.config, "micro_clip", _micro_clip)


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (AOF on, fsync always)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tiny_settings: Settings) -> Iterator[Store]:
    """An opened store, the embedded SQLite one and then Redis (modules that need another
    store define their own `store`)."""
    update = {"REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    opened = open_store(tiny_settings.model_copy(update=update))
    yield opened
    opened.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url
