"""Durable writes: into the store, or — while it is unreachable — into a local spool file
that a background thread replays, in order, once the store is back.

`write()` returns only when its entries are either applied or appended to the spool and
fsynced, so an acknowledged webhook is never lost. While anything is spooled, new entries
are spooled too, which keeps the order. Replays are safe to repeat: every entry carries an
idempotency key, so an entry applied just before a crash is not applied twice.

Each process (WORKERS > 1 share MODEL_DIR) owns one spool slot, `spool-<n>.jsonl`, held by an
exclusive lock on `slot-<n>.lock`; a restarted process takes a free slot and replays what the
slot's previous owner left.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..errors import StoreUnavailable
from ..feedback import Entry
from . import Store

log = logging.getLogger(__name__)
RETRY_S = 1.0


class Journal:
    def __init__(self, store: Store, spool_dir: Path, retry_s: float = RETRY_S) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        slot, self._slot_lock = _claim_slot(spool_dir)
        self.path = spool_dir / f"spool-{slot}.jsonl"
        self._offset_path = spool_dir / f"spool-{slot}.offset"
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-replay", daemon=True)
        self.pending = self._count_pending()
        self.spooled_total = 0

    def start(self) -> None:
        self._thread.start()
        if self.pending:
            log.warning("%d spooled entries from an earlier run will be replayed", self.pending)
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop replaying (one last attempt first); what is left stays spooled on disk."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._slot_lock.close()  # releases the slot for the next process

    def write(self, entries: Sequence[Entry]) -> None:
        """Apply `entries` in order, or spool what could not be applied. Durable on return."""
        with self._lock:
            done = 0
            if not self.pending:
                try:
                    for entry in entries:
                        self.store.apply(entry)
                        done += 1
                except StoreUnavailable as exc:
                    log.warning("store unavailable, spooling %d entries: %s",
                                len(entries) - done, exc)
            if done < len(entries):
                self._spool(entries[done:])

    def _spool(self, entries: Sequence[Entry]) -> None:
        with self.path.open("a", encoding="utf-8") as spool:
            spool.write("".join(entry.to_json() + "\n" for entry in entries))
            spool.flush()
            os.fsync(spool.fileno())
        self.pending += len(entries)
        self.spooled_total += len(entries)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.retry_s)
            self._wake.clear()
            if self.pending:
                self._drain()
            if self._stopping.is_set():
                return

    def _drain(self) -> None:
        """Apply spooled entries from the saved offset until the spool is empty or the store
        fails again; then truncate it — under the lock, so no writer slips in between."""
        offset = self._read_offset()
        while True:
            with self._lock, self.path.open("rb") as spool:  # never read a half-appended line
                spool.seek(offset)
                lines = spool.readlines()
            for line in lines:
                try:
                    self._apply_line(line)
                except StoreUnavailable:
                    self._save_offset(offset)
                    return
                offset += len(line)
                with self._lock:
                    self.pending -= 1
            self._save_offset(offset)
            with self._lock:
                if self.path.stat().st_size == offset:
                    self.path.unlink()
                    self._offset_path.unlink(missing_ok=True)
                    self.pending = 0
                    log.info("spool replayed; writing to the store directly again")
                    return

    def _apply_line(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            log.error("dropping a torn spool line (written during a crash, never acknowledged)")
            return
        self.store.apply(Entry.from_json(line.decode("utf-8")))

    def _count_pending(self) -> int:
        """Entries an earlier run left, after undoing what a crash can leave behind: an offset
        without its spool (crash between the two unlinks) would skip the next spool's start;
        a torn last line (an append cut short, never acknowledged) would fuse with the next
        append into one line that cannot be parsed."""
        if not self.path.exists():
            self._offset_path.unlink(missing_ok=True)
            return 0
        with self.path.open("rb+") as spool:
            spool.seek(self._read_offset())
            count, end = 0, spool.tell()
            for line in spool:
                if not line.endswith(b"\n"):
                    log.error("cutting off a torn spool line (written during a crash, never "
                              "acknowledged)")
                    spool.truncate(end)
                    os.fsync(spool.fileno())
                    break
                count, end = count + 1, end + len(line)
            return count

    def _read_offset(self) -> int:
        try:
            return int(self._offset_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        # not fsynced: after a crash, entries replay from an older offset and are recognised
        self._offset_path.write_text(str(offset))


def _claim_slot(spool_dir: Path) -> tuple[int, IO[str]]:
    """The first spool slot no other live process holds; the lock lasts as long as `handle`."""
    for slot in itertools.count():
        handle = (spool_dir / f"slot-{slot}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return slot, handle
    raise AssertionError("unreachable")
