"""Expensive session resources, built before the first test starts.

pytest-timeout's per-test limit covers a test's fixture setup, so a session fixture that
trains the micro-CLIP testbed or starts Label Studio (minutes on a busy machine) spent the
budget of whichever test happened to need it first; past the limit, that test and every test
sharing the fixture errored at once. The conftests instead build these resources in
`pytest_collection_finish`, after collection and before any test's timer starts, and only
when a selected test needs them; the session fixture then hands out what was built. A build
that fails is reported by each test needing it, as a failed session fixture would be.

    def pytest_collection_finish(session):            # conftest.py
        build_before_tests(session, "micro_clip", "the micro-CLIP testbed", build)

    @pytest.fixture(scope="session")
    def micro_clip(request):
        return prebuilt(request.config, "micro_clip", build)

`build(stack)` returns the resource and registers its clean-up on `stack` (an ExitStack
closed when the session ends, by `close_prebuilt` in `pytest_sessionfinish`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

Build = Callable[[ExitStack], Any]


@dataclass
class _Prebuilt:
    stack: ExitStack = field(default_factory=ExitStack)
    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)


_KEY = pytest.StashKey[_Prebuilt]()


def _prebuilt(config: pytest.Config) -> _Prebuilt:
    if _KEY not in config.stash:
        config.stash[_KEY] = _Prebuilt()
    return config.stash[_KEY]


def needed(session: pytest.Session, fixture: str) -> bool:
    """Whether a selected test uses `fixture`, directly or through other fixtures."""
    if session.config.option.collectonly:
        return False
    return any(fixture in getattr(item, "fixturenames", ()) for item in session.items)


def build_before_tests(session: pytest.Session, fixture: str, what: str, build: Build) -> None:
    """Build `fixture`'s resource now, outside every per-test timeout, if a test needs it."""
    if not needed(session, fixture):
        return
    state = _prebuilt(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    say(f"{what}: preparing it before the tests start (no per-test timeout applies) ...")
    started = time.monotonic()
    try:
        state.values[fixture] = build(state.stack)
    except Exception as exc:  # reported by each test that needs it, not as a crash here
        state.errors[fixture] = exc
        say(f"{what}: FAILED after {time.monotonic() - started:.0f} s: {exc}")
        return
    say(f"{what}: ready after {time.monotonic() - started:.0f} s")


def prebuilt(config: pytest.Config, fixture: str, build: Build) -> Any:
    """What `build_before_tests` built for `fixture` (raising its error if the build failed);
    built now if it was not (a test that asked for it with `request.getfixturevalue`)."""
    state = _prebuilt(config)
    if fixture in state.errors:
        raise state.errors[fixture]
    if fixture not in state.values:
        state.values[fixture] = build(state.stack)
    return state.values[fixture]


def close_prebuilt(config: pytest.Config) -> None:
    """Release every resource built for the session (stop servers, close clients)."""
    if _KEY in config.stash:
        config.stash[_KEY].stack.close()
