"""`python -m backend serve` start-up: what it says before it serves."""

from __future__ import annotations

import logging

import pytest

from backend.cli import warn_if_open
from backend.config import load_settings


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
