"""Counting the calls a real store gets: each call of its contract (`Store`) is one store
transaction or round trip, so a count says how many a piece of work costs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from backend.store import Store

CONTRACT = sorted(name for name in dir(Store) if not name.startswith("_"))


def count_calls(store: Store) -> Counter[str]:
    """Count, by method name, the calls `store` gets from now on (the instance is patched, so
    every holder of it is counted and `isinstance` still holds). A call the store makes to its
    own contract (a single-item method wrapping the batched one) is not counted again."""
    calls: Counter[str] = Counter()
    inside = threading.local()
    for name in CONTRACT:
        setattr(store, name, _counted(name, getattr(store, name), calls, inside))
    return calls


def _counted(name: str, method: Callable[..., Any], calls: Counter[str],
             inside: threading.local) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        outermost = not getattr(inside, "active", False)
        if outermost:
            calls[name] += 1
            inside.active = True
        try:
            return method(*args, **kwargs)
        finally:
            if outermost:
                inside.active = False
    return counted
