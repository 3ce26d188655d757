"""Durable writes: into the store, or — while it is unreachable — into a local spool file
that a background thread replays, in order, once the store is back.

`write()` returns only when its entries are either applied or appended to the spool and
fsynced, so an acknowledged webhook is never lost. Consecutive `prediction` entries (what one
/predict proposed) are applied in one store transaction, every other entry in its own. While
anything is spooled, new entries are spooled too, which keeps the order. Replays are safe to
repeat: every entry carries an idempotency key, so an entry applied just before a crash is not
applied twice.

A spooled line the store can never apply (a malformed entry) is set aside as a dead letter
(corrections/dead_letters.py) with its reason, so it blocks no later entry; a store that is down or
refuses writes (StoreUnavailable: Redis unreachable, OOM, MISCONF, READONLY, LOADING) keeps
the line spooled and is retried with backoff. The replay thread is supervised: if it crashes
it is logged, counted (`backend_spool_replay_restarts_total`) and started again.

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

from .. import metrics
from ..errors import StoreUnavailable
from ..store import Store
from ..store.entry import Entry
from .dead_letters import DeadLetters
from .records import apply, apply_predictions, runs

log = logging.getLogger(__name__)
RETRY_S = 1.0
"""Seconds between replay attempts while the store is unavailable, at first."""
RETRY_MAX_S = 5.0
"""The longest pause between replay attempts: the backoff doubles up to this."""


class Journal:
    def __init__(self, store: Store, spool_dir: Path, retry_s: float = RETRY_S) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        slot, self._slot_lock = _claim_slot(spool_dir)
        self.path = spool_dir / f"spool-{slot}.jsonl"
        self._offset_path = spool_dir / f"spool-{slot}.offset"
        self.retry_s = retry_s
        self._delay = retry_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="spool-replay",
                                        daemon=True)
        self.dead_letters = DeadLetters(spool_dir)
        self.pending = 0
        self._set_pending(self._count_pending())
        self.spooled_total = 0
        self.restarts = 0

    @property
    def alive(self) -> bool:
        """Whether the replay thread runs (False before start() and after stop())."""
        return self._thread.is_alive()

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
            done = 0 if self.pending else self._apply(entries)
            if done < len(entries):
                self._spool(entries[done:])

    def _apply(self, entries: Sequence[Entry]) -> int:
        """Apply entries until the store is unavailable; how many were dealt with."""
        done = 0
        try:
            for run in runs(entries):
                if self._applied_together(run):
                    done += len(run)
                    continue
                for entry in run:
                    self._apply_one(entry)
                    done += 1
        except StoreUnavailable as exc:
            log.warning("store unavailable, spooling %d entries: %s", len(entries) - done, exc)
            return done
        return len(entries)

    def _applied_together(self, run: Sequence[Entry]) -> bool:
        """Apply a run of predictions in one transaction; False: apply its entries one by one
        (a single entry, or one of them can never be applied: only that one is set aside)."""
        if len(run) < 2:
            return False
        try:
            apply_predictions(self.store, run)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - which entry is at fault is found one by one
            log.debug("a batch of %d predictions failed; applying them one by one", len(run),
                      exc_info=True)
            return False
        return True

    def _apply_one(self, entry: Entry) -> None:
        """Apply an entry, or set it aside for good; StoreUnavailable: it was not applied."""
        try:
            apply(self.store, entry)
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - permanent: set aside, never lost
            self._dead_letter(entry.to_json().encode(), exc)

    def _spool(self, entries: Sequence[Entry]) -> None:
        with self.path.open("a", encoding="utf-8") as spool:
            spool.write("".join(entry.to_json() + "\n" for entry in entries))
            spool.flush()
            os.fsync(spool.fileno())
        self._set_pending(self.pending + len(entries))
        self.spooled_total += len(entries)
        self._wake.set()

    def _set_pending(self, count: int) -> None:
        self.pending = count
        metrics.SPOOLED.set(count)

    def _supervise(self) -> None:
        """Run the replay; if it crashes (a bug, a spool file it cannot read), log it, count
        it and run it again after a pause, so spooled entries are never stranded."""
        while True:
            try:
                self._run()
                return
            except Exception:  # noqa: BLE001 - whatever killed it, replaying must go on
                if self._stopping.is_set():
                    log.exception("spool replay crashed while stopping; the spool stays on disk")
                    return
                with self._lock:  # what it counted down may not be saved in its offset
                    self._set_pending(self._count_pending())
                self.restarts += 1
                metrics.SPOOL_REPLAY_RESTARTS.inc()
                log.exception("spool replay crashed (restart %d); retrying in %g s",
                              self.restarts, self._delay)
                self._backoff()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            if self.pending:
                self._drain()
            if self._stopping.is_set():
                return

    def _backoff(self) -> None:
        self._delay = min(self._delay * 2, RETRY_MAX_S)

    def _drain(self) -> None:
        """Apply spooled entries from the saved offset until the spool is empty or the store
        fails again (then back off); then truncate it — under the lock, so no writer slips in
        between."""
        offset = self._read_offset()
        while True:
            with self._lock, self.path.open("rb") as spool:  # never read a half-appended line
                spool.seek(offset)
                lines = spool.readlines()
            for line in lines:
                if not self._replay_line(line, offset):
                    self._save_offset(offset)
                    self._backoff()
                    return
                offset += len(line)
                with self._lock:
                    self._set_pending(self.pending - 1)
            self._delay = self.retry_s
            self._save_offset(offset)
            with self._lock:
                if self.path.stat().st_size == offset:
                    self.path.unlink()
                    self._offset_path.unlink(missing_ok=True)
                    self._set_pending(0)
                    log.info("spool replayed; writing to the store directly again")
                    return

    def _replay_line(self, line: bytes, offset: int) -> bool:
        """Apply the spooled line at `offset`, or set it aside for good; False: the store is
        unavailable, keep the line and retry later."""
        try:
            self._apply_line(line)
        except StoreUnavailable as exc:
            log.debug("spool replay waits for the store: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - permanent: this line can never be applied
            self._save_offset(offset)  # should setting it aside fail, replay resumes here
            self._dead_letter(line, exc)
        return True

    def _dead_letter(self, line: bytes, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.dead_letters.add(line, reason)
        metrics.DEAD_LETTERS.inc()
        log.error("a log entry cannot be applied and was set aside in %s (%s); read it with "
                  "`python -m backend export dead-letters`", self.dead_letters.path, reason)

    def _apply_line(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            log.error("dropping a torn spool line (written during a crash, never acknowledged)")
            return
        apply(self.store, Entry.from_json(line.decode("utf-8")))

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


def spooled_entries(spool_dir: Path) -> int:
    """Entries waiting in every spool of `spool_dir` (what each slot's offset has not passed)."""
    total = 0
    for spool in spool_dir.glob("spool-*.jsonl"):
        try:
            offset = int(spool.with_suffix(".offset").read_text())
        except (FileNotFoundError, ValueError):
            offset = 0
        with spool.open("rb") as lines:
            lines.seek(offset)
            total += sum(1 for line in lines if line.endswith(b"\n"))
    return total


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
