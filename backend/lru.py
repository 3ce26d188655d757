"""`LRU`: a mapping that forgets its least recently stored entries beyond a bound."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `max_items` entries and, with `weight`, at most `max_weight` in total; the
    newest entry is always kept. `put` refreshes an entry; `get` does not."""

    def __init__(self, max_items: int, *, max_weight: int | None = None,
                 weight: Callable[[V], int] | None = None) -> None:
        self.max_items = max_items
        self.max_weight = max_weight
        self._weight = weight
        self._entries: OrderedDict[K, V] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > 1 and self._over():
            self._entries.popitem(last=False)

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def _over(self) -> bool:
        if len(self._entries) > self.max_items:
            return True
        if self.max_weight is None or self._weight is None:
            return False
        return sum(map(self._weight, self._entries.values())) > self.max_weight

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
