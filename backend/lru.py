"""`LRU`: a mapping that forgets its least recently stored entries beyond a bound; `ByIdentity`:
values remembered per object identity in one."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


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


class ByIdentity(Generic[T, V]):
    """Values derived from objects, remembered per (object, `extra`) by the object's identity,
    not its value: no hashing or comparing of a large object (a parsed label config) on each
    look-up. An entry holds a weak reference, so it keeps nothing alive, and an object that
    takes the address of a dead one finds nothing. At most `max_items` entries (`LRU`)."""

    def __init__(self, max_items: int) -> None:
        self._entries: LRU[tuple[int, Hashable], tuple[weakref.ref[T], V]] = LRU(max_items)

    def get(self, obj: T, extra: Hashable) -> V | None:
        key = (id(obj), extra)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not obj:
            return None
        self._entries.put(key, entry)  # the most recently used
        return entry[1]

    def put(self, obj: T, extra: Hashable, value: V) -> None:
        self._entries.put((id(obj), extra), (weakref.ref(obj), value))

    def __len__(self) -> int:
        return len(self._entries)
