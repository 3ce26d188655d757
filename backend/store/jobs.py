"""The pre-label job ledger: what every process working on a job must agree on.

It lives in the store (the same Redis, or the same SQLite file), so the process that planned a
job, RQ workers on other machines and a later run after a crash all see one truth:

    fields   the job's settings and the planner's counters (project, model_version, total, …)
    done     tasks whose prediction Label Studio stored for the job's model_version
    failed   task → why it failed (a later run retries it)
    claims   task → the worker holding it, until a deadline: no task is worked on twice at once

Claims expire, so a worker that dies frees its tasks; `release` only frees claims the caller
holds, so a slow worker can never free a task another worker has taken over since.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .base import Record, Store

FAILURES_SHOWN = 100


class JobLedger(Protocol):
    def update(self, job: str, project: str, fields: Record) -> None:
        """Merge `fields` into the job's record (creating it)."""
        ...

    def get(self, job: str) -> Record | None:
        """The job's fields plus `done` and `failed` counts; None if there is no such job."""
        ...

    def jobs(self, project: str) -> list[Record]: ...

    def finish(self, job: str, done: Sequence[str], failed: Mapping[str, str]) -> None:
        """Record tasks as done (no longer failed) or failed (unless done), freeing claims."""
        ...

    def done(self, job: str) -> set[str]: ...

    def clear_failures(self, job: str) -> None: ...

    def failures(self, job: str, limit: int = FAILURES_SHOWN) -> dict[str, str]: ...

    def claim(self, job: str, tasks: Sequence[str], owner: str, ttl_s: float) -> list[str]:
        """The tasks now held by `owner`: those not done and unclaimed, expired, or already
        its own (renewed)."""
        ...

    def holders(self, job: str, tasks: Sequence[str]) -> dict[str, str]:
        """Current (unexpired) claim holder of each claimed task."""
        ...

    def release(self, job: str, tasks: Sequence[str], owner: str) -> None: ...


def open_ledger(store: Store) -> JobLedger:
    from .redis import RedisStore
    from .sqlite import SqliteStore

    if isinstance(store, RedisStore):
        return RedisLedger(store)
    if isinstance(store, SqliteStore):
        return SqliteLedger(store)
    raise TypeError(f"no job ledger for {type(store).__name__}")


_CLAIM = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local deadline = now_ms + tonumber(ARGV[2])
local claimed = {}
for i = 3, #ARGV do
  local task = ARGV[i]
  if redis.call('SISMEMBER', KEYS[1], task) == 0 then
    local current = redis.call('HGET', KEYS[2], task)
    local free = not current
    if current then
      local space = string.find(current, ' ')
      free = tonumber(string.sub(current, 1, space - 1)) < now_ms
        or string.sub(current, space + 1) == ARGV[1]
    end
    if free then
      redis.call('HSET', KEYS[2], task, deadline .. ' ' .. ARGV[1])
      claimed[#claimed + 1] = task
    end
  end
end
return claimed
"""

_HOLDERS = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
for i = 1, #ARGV do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current then
    local space = string.find(current, ' ')
    if tonumber(string.sub(current, 1, space - 1)) >= now_ms then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = string.sub(current, space + 1)
    end
  end
end
return out
"""

_RELEASE = """
for i = 2, #ARGV do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and string.sub(current, string.find(current, ' ') + 1) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"""

_FINISH = """
local done = tonumber(ARGV[1])
for i = 2, done + 1 do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
for i = done + 2, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return 1
"""


class RedisLedger:
    def __init__(self, store: Store) -> None:
        from .redis import RedisStore

        assert isinstance(store, RedisStore)
        self._store = store
        self.keys = store.keys
        client = store.client
        self._claim = client.register_script(_CLAIM)
        self._holders = client.register_script(_HOLDERS)
        self._release = client.register_script(_RELEASE)
        self._finish = client.register_script(_FINISH)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._store._call(fn, *args, **kwargs)

    def update(self, job: str, project: str, fields: Record) -> None:
        pipe = self._store.client.pipeline(transaction=True)
        pipe.hset(self.keys.job(job), mapping={name: json.dumps(value)
                                               for name, value in fields.items()})
        pipe.sadd(self.keys.jobs(project), job)
        self._call(pipe.execute)

    def get(self, job: str) -> Record | None:
        pipe = self._store.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job))
        pipe.scard(self.keys.job_done(job))
        pipe.hlen(self.keys.job_failed(job))
        fields, done, failed = self._call(pipe.execute)
        if not fields:
            return None
        record = {name.decode(): json.loads(value) for name, value in fields.items()}
        return {**record, "done": int(done), "failed": int(failed)}

    def jobs(self, project: str) -> list[Record]:
        ids = sorted(raw.decode() for raw in self._call(
            self._store.client.smembers, self.keys.jobs(project)))
        return [record for job in ids if (record := self.get(job)) is not None]

    def finish(self, job: str, done: Sequence[str], failed: Mapping[str, str]) -> None:
        pairs = [part for task, why in failed.items() for part in (task, why)]
        self._call(self._finish, keys=[self.keys.job_done(job), self.keys.job_failed(job),
                                       self.keys.job_claims(job)],
                   args=[len(done), *done, *pairs])

    def done(self, job: str) -> set[str]:
        members = self._call(self._store.client.smembers, self.keys.job_done(job))
        return {raw.decode() for raw in members}

    def clear_failures(self, job: str) -> None:
        self._call(self._store.client.delete, self.keys.job_failed(job))

    def failures(self, job: str, limit: int = FAILURES_SHOWN) -> dict[str, str]:
        def scan() -> dict[bytes, bytes]:
            found: dict[bytes, bytes] = {}
            cursor = 0
            while True:
                cursor, page = self._store.client.hscan(self.keys.job_failed(job), cursor,
                                                        count=limit)
                found.update(page)  # type: ignore[arg-type]  # redis-py's loose annotation
                if not cursor or len(found) >= limit:
                    return found

        return {task.decode(): why.decode()
                for task, why in list(self._call(scan).items())[:limit]}

    def claim(self, job: str, tasks: Sequence[str], owner: str, ttl_s: float) -> list[str]:
        if not tasks:
            return []
        got = self._call(self._claim, keys=[self.keys.job_done(job), self.keys.job_claims(job)],
                         args=[owner, int(ttl_s * 1000), *tasks])
        return [raw.decode() for raw in got]

    def holders(self, job: str, tasks: Sequence[str]) -> dict[str, str]:
        if not tasks:
            return {}
        flat = [raw.decode() for raw in self._call(
            self._holders, keys=[self.keys.job_claims(job)], args=list(tasks))]
        return dict(zip(flat[::2], flat[1::2]))

    def release(self, job: str, tasks: Sequence[str], owner: str) -> None:
        if tasks:
            self._call(self._release, keys=[self.keys.job_claims(job)], args=[owner, *tasks])


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, project TEXT NOT NULL, fields TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_tasks (
    job TEXT NOT NULL, task TEXT NOT NULL, done INTEGER NOT NULL, reason TEXT,
    PRIMARY KEY (job, task));
CREATE TABLE IF NOT EXISTS job_claims (
    job TEXT NOT NULL, task TEXT NOT NULL, owner TEXT NOT NULL, deadline REAL NOT NULL,
    PRIMARY KEY (job, task));
"""


class SqliteLedger:
    """The same ledger in the embedded store's file (one machine; workers there share it)."""

    def __init__(self, store: Store) -> None:
        from .sqlite import SqliteStore

        assert isinstance(store, SqliteStore)
        self._store = store
        store.add_schema(SQLITE_SCHEMA)

    def _transaction(self, statements: Sequence[tuple[str, tuple[object, ...]]]) -> None:
        with self._store.transaction() as db:
            for sql, args in statements:
                db.execute(sql, args)

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return self._store._read(sql, args)

    def update(self, job: str, project: str, fields: Record) -> None:
        with self._store.transaction() as db:
            row = db.execute("SELECT fields FROM jobs WHERE id = ?", (job,)).fetchone()
            merged = {**(json.loads(row[0]) if row else {}), **fields}
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)",
                       (job, project, json.dumps(merged)))

    def get(self, job: str) -> Record | None:
        rows = self._read("SELECT fields FROM jobs WHERE id = ?", (job,))
        if not rows:
            return None
        counts = {int(str(done)): int(str(count)) for done, count in self._read(
            "SELECT done, COUNT(*) FROM job_tasks WHERE job = ? GROUP BY done", (job,))}
        return {**json.loads(str(rows[0][0])), "done": counts.get(1, 0),
                "failed": counts.get(0, 0)}

    def jobs(self, project: str) -> list[Record]:
        ids = self._read("SELECT id FROM jobs WHERE project = ? ORDER BY id", (project,))
        return [record for (job,) in ids if (record := self.get(str(job))) is not None]

    def finish(self, job: str, done: Sequence[str], failed: Mapping[str, str]) -> None:
        statements: list[tuple[str, tuple[object, ...]]] = []
        for task in done:
            statements += [("INSERT OR REPLACE INTO job_tasks VALUES (?, ?, 1, NULL)", (job, task)),
                           ("DELETE FROM job_claims WHERE job = ? AND task = ?", (job, task))]
        for task, why in failed.items():
            statements += [("INSERT INTO job_tasks VALUES (?, ?, 0, ?) ON CONFLICT (job, task) "
                            "DO UPDATE SET reason = excluded.reason WHERE job_tasks.done = 0",
                            (job, task, why)),
                           ("DELETE FROM job_claims WHERE job = ? AND task = ?", (job, task))]
        if statements:
            self._transaction(statements)

    def done(self, job: str) -> set[str]:
        rows = self._read("SELECT task FROM job_tasks WHERE job = ? AND done = 1", (job,))
        return {str(task) for (task,) in rows}

    def clear_failures(self, job: str) -> None:
        self._transaction([("DELETE FROM job_tasks WHERE job = ? AND done = 0", (job,))])

    def failures(self, job: str, limit: int = FAILURES_SHOWN) -> dict[str, str]:
        rows = self._read("SELECT task, reason FROM job_tasks WHERE job = ? AND done = 0 "
                          "LIMIT ?", (job, limit))
        return {str(task): str(why) for task, why in rows}

    def claim(self, job: str, tasks: Sequence[str], owner: str, ttl_s: float) -> list[str]:
        now = time.time()
        claimed: list[str] = []
        with self._store.transaction() as db:
            for task in tasks:
                if db.execute("SELECT 1 FROM job_tasks WHERE job = ? AND task = ? AND done = 1",
                              (job, task)).fetchone():
                    continue
                held = db.execute("SELECT owner, deadline FROM job_claims WHERE job = ? AND "
                                  "task = ?", (job, task)).fetchone()
                if held and held[0] != owner and held[1] >= now:
                    continue
                db.execute("INSERT OR REPLACE INTO job_claims VALUES (?, ?, ?, ?)",
                           (job, task, owner, now + ttl_s))
                claimed.append(task)
        return claimed

    def holders(self, job: str, tasks: Sequence[str]) -> dict[str, str]:
        now = time.time()
        found = {}
        for task in tasks:
            rows = self._read("SELECT owner FROM job_claims WHERE job = ? AND task = ? AND "
                              "deadline >= ?", (job, task, now))
            if rows:
                found[task] = str(rows[0][0])
        return found

    def release(self, job: str, tasks: Sequence[str], owner: str) -> None:
        self._transaction([("DELETE FROM job_claims WHERE job = ? AND task = ? AND owner = ?",
                            (job, task, owner)) for task in tasks])
