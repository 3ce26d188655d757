"""`LRU` bounds and `ByIdentity`: values remembered per object identity, never for another
object, and bounded."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

from backend.lru import LRU, ByIdentity


@dataclass(frozen=True)
class Thing:
    name: str


def test_lru_forgets_the_least_recently_stored() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 3)  # refreshed
    lru.put("c", 4)
    assert list(lru) == ["a", "c"] and lru.get("a") == 3 and "b" not in lru


def test_by_identity_remembers_per_object_and_extra() -> None:
    memo: ByIdentity[Thing, str] = ByIdentity(8)
    first, equal = Thing("x"), Thing("x")
    memo.put(first, "simple", "one")
    assert memo.get(first, "simple") == "one"
    assert memo.get(first, "openai") is None  # another extra key
    assert memo.get(equal, "simple") is None  # equal, but another object


def test_by_identity_never_answers_for_an_object_at_a_dead_ones_address() -> None:
    """An entry is only ever found by the object it was stored for: one whose address an
    entry's (dead) object had is checked through the weak reference and misses."""
    memo: ByIdentity[Thing, int] = ByIdentity(8)
    alive, dead = Thing("alive"), Thing("dead")
    memo.put(dead, None, 1)
    # what a dead object's entry looks like to a new object at its address
    memo._entries.put((id(alive), None), (weakref.ref(dead), 1))
    assert memo.get(alive, None) is None
    del dead
    gc.collect()
    assert memo.get(alive, None) is None
    memo.put(alive, None, 2)
    assert memo.get(alive, None) == 2


def test_by_identity_is_bounded_and_keeps_nothing_alive() -> None:
    memo: ByIdentity[Thing, int] = ByIdentity(3)
    things = [Thing(str(i)) for i in range(5)]
    for i, thing in enumerate(things):
        memo.put(thing, None, i)
    assert len(memo) == 3 and memo.get(things[0], None) is None and memo.get(things[4], None) == 4
    memo.get(things[2], None)  # used: kept over things[3]
    memo.put(Thing("later"), None, 9)
    assert memo.get(things[2], None) == 2 and memo.get(things[3], None) is None
    gone = Thing("gone")
    watch = weakref.ref(gone)
    memo.put(gone, None, 10)
    del gone
    gc.collect()
    assert watch() is None
