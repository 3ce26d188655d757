from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

from tests.e2e.label_studio import (
    LabelStudioClient,
    LabelStudioNotInstalled,
    LabelStudioServer,
    find_label_studio,
)
from tests.support.session_resources import build_before_tests, prebuilt

STARTUP_TIMEOUT_S = 900.0
"""Label Studio's start (migrations) took 280 s with two cores shared by a dozen processes,
against the harness's default of 300 s; it runs before the tests, so waiting longer costs
nothing when all is well."""


def _start(stack: ExitStack) -> tuple[LabelStudioServer, LabelStudioClient]:
    keep_files = os.environ.get("LS_E2E_KEEP_FILES") == "1"
    server = stack.enter_context(
        LabelStudioServer(keep_files=keep_files, startup_timeout=STARTUP_TIMEOUT_S))
    return server, stack.enter_context(LabelStudioClient.for_server(server))


@pytest.hookimpl(trylast=True)  # after the testbed is trained, so LS is not left idle meanwhile
def pytest_collection_finish(session: pytest.Session) -> None:
    # Starting LS (migrations) takes minutes on a busy machine: before the tests, outside
    # their timeouts. Disabled or missing, the fixture skips or fails each test, saying why.
    if not _disabled() and _missing_label_studio() is None:
        build_before_tests(session, "label_studio", "Label Studio", _start)


@pytest.fixture(scope="session")
def label_studio(request: pytest.FixtureRequest) -> tuple[LabelStudioServer, LabelStudioClient]:
    """A real Label Studio server for the whole session, and a client for its admin; started
    before the first test (tests/support/session_resources.py).

    Fails when Label Studio is not installed (with the install command), unless SKIP_E2E=1.
    LS_E2E_KEEP_FILES=1 keeps the server's data dir and log for debugging.
    """
    if _disabled():
        pytest.skip("SKIP_E2E=1: end-to-end tests against Label Studio disabled")
    missing = _missing_label_studio()
    if missing:
        pytest.fail(missing, pytrace=False)
    started: tuple[LabelStudioServer, LabelStudioClient] = prebuilt(
        request.config, "label_studio", _start)
    return started


def _disabled() -> bool:
    return os.environ.get("SKIP_E2E") == "1"


def _missing_label_studio() -> str | None:
    try:
        find_label_studio()
    except LabelStudioNotInstalled as exc:
        return str(exc)
    return None
