"""Spooled entries the store could never apply, set aside so they block nothing and lose nothing.

The journal's replay moves a spooled line here when applying it fails for a reason that
retrying cannot fix (the entry itself is malformed); a store that is down or refuses writes
(Redis OOM, MISCONF, READONLY, LOADING) is waited for instead. Every server process sharing
MODEL_DIR appends to the same file, `MODEL_DIR/spool/dead-letters.jsonl`, one JSON object a line:

    {"dead_at": 1764300000.0, "reason": "TypeError: ...", "entry": {...} | null, "line": "..."}

`entry` is the log entry (null, with the raw `line`, when the line is not one). Operators read
them with `python -m backend export dead-letters` (or GET /export/dead-letters), fix `entry`,
and apply them with `python -m backend replay dead-letters --input FILE`; the applied ones leave
the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailable
from ..store import Store
from ..store.entry import Entry
from .entries import check_entry
from .records import apply

FILE_NAME = "dead-letters.jsonl"
Letter = dict[str, Any]


class DeadLetters:
    """The dead-letter file of a spool directory; safe to share between processes."""

    def __init__(self, spool_dir: Path) -> None:
        self.path = spool_dir / FILE_NAME
        self._lock_path = spool_dir / "dead-letters.lock"

    def add(self, line: bytes, reason: str) -> None:
        """Set aside one spooled line with why it failed; durable (fsynced) on return."""
        text = line.decode("utf-8", errors="replace").rstrip("\n")
        letter = {"dead_at": time.time(), "reason": reason, "entry": _entry_or_none(text)}
        if letter["entry"] is None:
            letter["line"] = text
        with self._locked(), self.path.open("a", encoding="utf-8") as spool:
            spool.write(json.dumps(letter, ensure_ascii=False) + "\n")
            spool.flush()
            os.fsync(spool.fileno())

    def read(self) -> list[Letter]:
        if not self.path.exists():
            return []
        with self._locked():
            return read_letters(self.path)

    def count(self) -> int:
        return len(self.read())

    def remove(self, keys: set[str]) -> int:
        """Drop the letters whose entry has one of `keys` (they were applied); how many."""
        with self._locked():
            letters = read_letters(self.path) if self.path.exists() else []
            kept = [letter for letter in letters if _key(letter) not in keys]
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text("".join(json.dumps(letter, ensure_ascii=False) + "\n"
                                         for letter in kept), encoding="utf-8")
            os.replace(temporary, self.path)
            return len(letters) - len(kept)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def read_letters(path: Path) -> list[Letter]:
    """Dead letters from a file (the dead-letter file, or an operator's edited export)."""
    letters = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                letter = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number} is not JSON ({exc}): each line is one "
                                 "dead letter as `export dead-letters` wrote it") from None
            letters.append(letter if isinstance(letter, dict) else {"entry": None})
    return letters


@dataclass
class Replayed:
    applied: int = 0
    already: int = 0
    failed: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


def replay(store: Store, letters: Iterable[Letter]) -> Replayed:
    """Apply dead letters to the store, in order. A letter that fails again stays (its reason
    is reported); StoreUnavailable stops the replay, as nothing more can be applied."""
    result = Replayed()
    for number, letter in enumerate(letters, 1):
        if not isinstance(letter.get("entry"), dict):
            result.failed.append(f"letter {number}: no entry (the spooled line was not one): "
                                 "write the entry, as JSON, into its `entry` field")
            continue
        try:
            entry = Entry(**letter["entry"])
            check_entry(entry)
            applied = apply(store, entry)
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever stops this one, the rest go on
            result.failed.append(f"letter {number}: {type(exc).__name__}: {exc}")
            continue
        result.applied += applied
        result.already += not applied
        result.keys.add(entry.key)
    return result


def _entry_or_none(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _key(letter: Letter) -> str | None:
    entry = letter.get("entry")
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) else None
