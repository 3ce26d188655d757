from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.label_studio import (
    LabelStudioClient,
    LabelStudioNotInstalled,
    LabelStudioServer,
    find_label_studio,
)


@pytest.fixture(scope="session")
def label_studio() -> Iterator[tuple[LabelStudioServer, LabelStudioClient]]:
    """A real Label Studio server for the whole session, and a client for its admin.

    Fails when Label Studio is not installed (with the install command), unless SKIP_E2E=1.
    LS_E2E_KEEP_FILES=1 keeps the server's data dir and log for debugging.
    """
    if os.environ.get("SKIP_E2E") == "1":
        pytest.skip("SKIP_E2E=1: end-to-end tests against Label Studio disabled")
    missing = _missing_label_studio()
    if missing:
        pytest.fail(missing, pytrace=False)
    keep_files = os.environ.get("LS_E2E_KEEP_FILES") == "1"
    with (
        LabelStudioServer(keep_files=keep_files) as server,
        LabelStudioClient.for_server(server) as client,
    ):
        yield server, client


def _missing_label_studio() -> str | None:
    try:
        find_label_studio()
    except LabelStudioNotInstalled as exc:
        return str(exc)
    return None
