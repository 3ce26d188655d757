"""The embedded store: one SQLite file in MODEL_DIR, so the backend runs with zero services.

Tables:
    log          the annotation event log; `seq` gives the order, `key` makes it idempotent
    corrections  the current record of each annotation (`updated_ts`: LS's updated_at)
    predictions  the latest prediction issued per (project, task)
    embeddings   image embeddings (float16) by content key
    images       image reference → embedding key, per model, and when that was last checked
    heads        adapted heads per project (`seq` gives the id: h1, h2, …)
    active_heads the head each project serves

WAL journal with `synchronous=FULL`: a write acknowledged to Label Studio survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import StoreUnavailable
from .base import (
    BULK_READ,
    BaseStore,
    EmbeddingItem,
    Known,
    Record,
    Vector,
    pack,
    ref_key,
    unpack,
)
from .entry import Entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
    project TEXT NOT NULL, event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS corrections (
    annotation TEXT PRIMARY KEY, project TEXT NOT NULL, task TEXT NOT NULL,
    updated_ts REAL NOT NULL, deleted_at REAL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS corrections_by_project ON corrections (project, updated_ts);
CREATE TABLE IF NOT EXISTS predictions (
    project TEXT NOT NULL, task TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (project, task));
CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    ref TEXT PRIMARY KEY, embedding_key TEXT NOT NULL, verified_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS heads (
    project TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (project, seq));
CREATE TABLE IF NOT EXISTS active_heads (project TEXT PRIMARY KEY, head TEXT NOT NULL);
"""


class SqliteStore(BaseStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            _add_verified_at(self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the embedded store {path}: {exc}; check that "
                                   "MODEL_DIR is writable") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the shared connection: committed at the end, rolled back
        on any error; SQLite's errors come out as StoreUnavailable."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(f"embedded store {self.path}: {exc}") from None
                raise

    def add_schema(self, script: str) -> None:
        """Create tables another part of the store keeps in this file (the job ledger)."""
        with self._lock:
            try:
                self._db.executescript(script)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"embedded store {self.path}: {exc}") from None

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> int:
        """Run statements in one transaction; return the first statement's rowcount (the
        others run only if it changed a row)."""
        with self.transaction() as db:
            first = db.execute(*statements[0]).rowcount
            if first:
                for statement in statements[1:]:
                    db.execute(*statement)
        return first

    def put_predictions(self, entries: Sequence[Entry]) -> list[bool]:
        rows = [(entry.project, entry.data["task"],
                 json.dumps({"project": entry.project, **entry.data}, ensure_ascii=False))
                for entry in entries]
        if not rows:
            return []
        with self.transaction() as db:
            return [bool(db.execute(
                "INSERT INTO predictions VALUES (?, ?, ?) ON CONFLICT (project, task) "
                "DO UPDATE SET record = excluded.record", row).rowcount) for row in rows]

    def commit_annotation(self, entry: Entry, record: Record, updated: float) -> bool:
        return bool(self._write([
            ("INSERT OR IGNORE INTO log (key, project, event) VALUES (?, ?, ?)",
             (entry.key, entry.project, self.log_event(entry))),
            ("INSERT INTO corrections VALUES (?, ?, ?, ?, NULL, ?) ON CONFLICT (annotation) "
             "DO UPDATE SET record = excluded.record, updated_ts = excluded.updated_ts "
             "WHERE corrections.deleted_at IS NULL "
             "AND excluded.updated_ts >= corrections.updated_ts",
             (record["annotation"], entry.project, record["task"], updated,
              json.dumps(record, ensure_ascii=False))),
        ]))

    def commit_deletion(self, entry: Entry, annotations: list[str]) -> bool:
        marks = [("UPDATE corrections SET deleted_at = ? "
                  "WHERE annotation = ? AND deleted_at IS NULL",
                  (entry.received_at, annotation)) for annotation in annotations]
        return bool(self._write([
            ("INSERT OR IGNORE INTO log (key, project, event) VALUES (?, ?, ?)",
             (entry.key, entry.project, self.log_event(entry))), *marks]))

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"embedded store {self.path}: {exc}") from None

    def _read_apart(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """One short read on a connection of its own, opened, used and closed in this call (so
        on one thread, whichever runs it): WAL lets it run beside the writer, so an export never
        holds up a webhook, and no read transaction outlives the call."""
        try:
            reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return reader.execute(sql, args).fetchall()
            finally:
                reader.close()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"embedded store {self.path}: {exc}") from None

    def _keyed(self, keys: list[object], sql: str,
               args: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
        """Large reads, in batches: the rows of `keys` (listed by one earlier read), in that
        order, BULK_READ per short read; `sql` selects the key first and has `{keys}` where the
        list of keys goes. A generator: each batch is read when the consumer gets to it, on the
        consumer's thread at that moment. Each key gives its row as it is then, at most once
        (one deleted meanwhile is left out)."""
        for start in range(0, len(keys), BULK_READ):
            batch = keys[start:start + BULK_READ]
            rows = self._read_apart(sql.format(keys=", ".join("?" * len(batch))),
                                    (*args, *batch))
            found = {row[0]: row[1:] for row in rows}
            yield from (found[key] for key in batch if key in found)

    def events(self) -> Iterator[Record]:
        seqs = [seq for (seq,) in self._read_apart("SELECT seq FROM log ORDER BY seq")]
        for (event,) in self._keyed(seqs, "SELECT seq, event FROM log WHERE seq IN ({keys})"):
            yield json.loads(str(event))

    def corrections(self, project: str | None = None) -> Iterator[Record]:
        where, args = ("", ()) if project is None else ("WHERE project = ?", (project,))
        annotations = [annotation for (annotation,) in self._read_apart(
            f"SELECT annotation FROM corrections {where} ORDER BY updated_ts, annotation", args)]
        for record, deleted_at in self._keyed(
                annotations, "SELECT annotation, record, deleted_at FROM corrections "
                "WHERE annotation IN ({keys})"):
            yield {**json.loads(str(record)), "deleted_at": deleted_at}

    def prediction(self, project: str, task: str) -> Record | None:
        rows = self._read("SELECT record FROM predictions WHERE project = ? AND task = ?",
                          (project, task))
        return json.loads(str(rows[0][0])) if rows else None

    def put_head(self, project: str, record: Record) -> str:
        with self.transaction() as db:
            (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM heads WHERE project = ?",
                                 (project,)).fetchone()
            head = f"h{last + 1}"
            db.execute("INSERT INTO heads VALUES (?, ?, ?)", (
                project, last + 1, json.dumps({**record, "id": head}, ensure_ascii=False)))
        return head

    def heads(self, project: str) -> list[Record]:
        rows = self._read("SELECT record FROM heads WHERE project = ? ORDER BY seq", (project,))
        return [json.loads(str(record)) for (record,) in rows]

    def active_head(self, project: str) -> str | None:
        rows = self._read("SELECT head FROM active_heads WHERE project = ?", (project,))
        return str(rows[0][0]) if rows else None

    def set_active_head(self, project: str, head: str) -> None:
        self._write([("INSERT OR REPLACE INTO active_heads VALUES (?, ?)", (project, head))])

    def predictions(self, project: str) -> Iterator[Record]:
        tasks = [task for (task,) in self._read_apart(
            "SELECT task FROM predictions WHERE project = ? ORDER BY task", (project,))]
        for (record,) in self._keyed(tasks, "SELECT task, record FROM predictions "
                                     "WHERE project = ? AND task IN ({keys})", (project,)):
            yield json.loads(str(record))

    def put_embeddings(self, items: Sequence[EmbeddingItem]) -> None:
        if not items:
            return
        now = time.time()
        refs = [(key, image_ref) for key, _, image_ref in items if image_ref is not None]
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                           [(key, pack(vector)) for key, vector, _ in items])
            db.executemany(IMAGE_REF_SQL, _image_ref_rows(refs, now))

    def put_image_refs(self, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        with self.transaction() as db:
            db.executemany(IMAGE_REF_SQL, _image_ref_rows(pairs, time.time()))

    def embeddings(self, keys: Sequence[str]) -> dict[str, Vector]:
        """BULK_READ keys per SELECT, all under one hold of the connection."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Vector] = {}
        with self._lock:
            try:
                for start in range(0, len(keys), BULK_READ):
                    batch = keys[start:start + BULK_READ]
                    rows = self._db.execute(
                        "SELECT key, data FROM embeddings "
                        f"WHERE key IN ({', '.join('?' * len(batch))})", batch).fetchall()
                    found.update({str(key): unpack(data) for key, data in rows})
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"embedded store {self.path}: {exc}") from None
        return found

    def embedding_key_for(self, model: str, image_ref: str) -> str | None:
        rows = self._read("SELECT embedding_key FROM images WHERE ref = ?",
                          (ref_key(model, image_ref),))
        return str(rows[0][0]) if rows else None

    def embeddings_for_refs(self, model: str, image_refs: Sequence[str],
                            verified_since: float) -> dict[str, Known]:
        found: dict[str, Known] = {}
        for start in range(0, len(image_refs), BULK_READ):
            refs = {ref_key(model, r): r for r in image_refs[start:start + BULK_READ]}
            rows = self._read(
                "SELECT images.ref, images.embedding_key, embeddings.data FROM images "
                "JOIN embeddings ON embeddings.key = images.embedding_key "
                f"WHERE images.ref IN ({', '.join('?' * len(refs))}) "
                "AND images.verified_at >= ?", (*refs, verified_since))
            found.update({refs[str(ref)]: (str(key), unpack(data))  # type: ignore[arg-type]
                          for ref, key, data in rows})
        return found

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()


IMAGE_REF_SQL = "INSERT OR REPLACE INTO images VALUES (?, ?, ?)"


def _image_ref_rows(pairs: Sequence[tuple[str, str]],
                    now: float) -> list[tuple[str, str, float]]:
    return [(ref_key(key.split("|", 1)[0], image_ref), key, now) for key, image_ref in pairs]


def _add_verified_at(db: sqlite3.Connection) -> None:
    """Stores written before `verified_at` existed: their mappings count as never checked."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    if "verified_at" not in columns:
        db.execute("ALTER TABLE images ADD COLUMN verified_at REAL NOT NULL DEFAULT 0")
