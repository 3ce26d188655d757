"""Waiting for something another thread or process does (webhooks, background replays)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """True as soon as `check()` is truthy; False if it still is not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False
