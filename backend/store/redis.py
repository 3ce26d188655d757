"""The Redis store, shared by every backend replica and worker. Key layout: store/keys.py.

Each log write is one Lua script, so "seen before?", "append to the log" and "update the
current record" happen atomically: a retry after an ambiguous failure (the reply was lost,
the write was not) is recognised by its key and changes nothing.

Run Redis with persistence (`appendonly yes`, `appendfsync always` for no loss even if Redis
itself is killed; `everysec` risks the last second).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from .. import metrics
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
from .keys import Keys

_COMMIT_ANNOTATION = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
local current = redis.call('HMGET', KEYS[3], 'updated_ts', 'deleted_at')
if current[2] or (current[1] and tonumber(current[1]) > tonumber(ARGV[4])) then return 1 end
redis.call('HSET', KEYS[3], 'record', ARGV[3], 'updated_ts', ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
redis.call('SADD', KEYS[6], ARGV[5])
return 1
"""

_COMMIT_DELETION = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 and not redis.call('HGET', KEYS[i], 'deleted_at') then
    redis.call('HSET', KEYS[i], 'deleted_at', ARGV[3])
  end
end
return 1
"""

_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
           redis.ReadOnlyError)
_REFUSALS = (redis.exceptions.OutOfMemoryError, redis.exceptions.TryAgainError,
             redis.exceptions.MasterDownError)
_REFUSAL_CODES = re.compile(
    r"(^|pipeline caused error: )(MISCONF|BUSY|NOREPLICAS|CLUSTERDOWN|READONLY|LOADING|OOM)\b")
"""Error replies of a Redis that cannot take writes *now*: waited for, never blamed on the data
(redis-py raises OOM as its own class, MISCONF as a plain ResponseError)."""


def _refuses_writes(exc: redis.ResponseError) -> bool:
    return isinstance(exc, _REFUSALS) or bool(_REFUSAL_CODES.search(str(exc)))


class RedisStore(BaseStore):
    def __init__(self, url: str, *, prefix: str = "clip-backend", timeout_s: float = 0.5,
                 client: redis.Redis | None = None) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self._redis = client or redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30)
        self._annotation = self._redis.register_script(_COMMIT_ANNOTATION)
        self._deletion = self._redis.register_script(_COMMIT_DELETION)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _ERRORS as exc:
            metrics.STORE_ERRORS.labels("redis").inc()
            raise StoreUnavailable(f"Redis at {self._where()} is unreachable "
                                   f"({type(exc).__name__}: {exc})") from None
        except redis.ResponseError as exc:
            if not _refuses_writes(exc):
                raise
            metrics.STORE_ERRORS.labels("redis").inc()
            raise StoreUnavailable(f"Redis at {self._where()} refuses writes "
                                   f"({type(exc).__name__}: {exc}); free memory or raise its "
                                   "maxmemory (OOM), fix its disk (MISCONF), or point REDIS_URL "
                                   "at the primary (READONLY)") from None

    def _where(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"

    def put_predictions(self, entries: Sequence[Entry]) -> list[bool]:
        if not entries:
            return []
        pipe = self._redis.pipeline(transaction=True)
        for entry in entries:
            record = json.dumps({"project": entry.project, **entry.data}, ensure_ascii=False)
            pipe.set(self.keys.prediction(entry.project, entry.data["task"]), record)
            pipe.sadd(self.keys.predicted_tasks(entry.project), entry.data["task"])
        self._call(pipe.execute)
        return [True] * len(entries)

    def commit_annotation(self, entry: Entry, record: Record, updated: float) -> bool:
        k = self.keys
        annotation, project = record["annotation"], entry.project
        keys = [k.seen(), k.log(), k.correction(annotation), k.corrections(project),
                k.corrections_all(), k.task_annotations(project, record["task"])]
        args = [entry.key, self.log_event(entry), json.dumps(record, ensure_ascii=False),
                repr(updated), annotation]
        return bool(self._call(self._annotation, keys=keys, args=args))

    def commit_deletion(self, entry: Entry, annotations: list[str]) -> bool:
        keys = [self.keys.seen(), self.keys.log(), *map(self.keys.correction, annotations)]
        args = [entry.key, self.log_event(entry), repr(entry.received_at)]
        return bool(self._call(self._deletion, keys=keys, args=args))

    def events(self) -> Iterator[Record]:
        last = "-"
        while True:
            batch = self._call(self._redis.xrange, self.keys.log(), min=last, count=1000)
            for stream_id, fields in batch:
                if stream_id.decode() != last:
                    yield json.loads(fields[b"event"])
            if len(batch) < 1000:
                return
            last = batch[-1][0].decode()

    def corrections(self, project: str | None = None) -> Iterator[Record]:
        index = self.keys.corrections(project) if project else self.keys.corrections_all()
        annotations = self._call(self._redis.zrange, index, 0, -1)
        for start in range(0, len(annotations), BULK_READ):
            pipe = self._redis.pipeline(transaction=False)
            for annotation in annotations[start:start + BULK_READ]:
                pipe.hmget(self.keys.correction(annotation.decode()), "record", "deleted_at")
            for record, deleted_at in self._call(pipe.execute):
                if record is not None:
                    yield {**json.loads(record),
                           "deleted_at": float(deleted_at) if deleted_at else None}

    def prediction(self, project: str, task: str) -> Record | None:
        raw = self._call(self._redis.get, self.keys.prediction(project, task))
        return json.loads(raw) if raw else None

    def put_head(self, project: str, record: Record) -> str:
        head = f"h{self._call(self._redis.incr, self.keys.head_seq(project))}"
        self._call(self._redis.hset, self.keys.heads(project), head,
                   json.dumps({**record, "id": head}, ensure_ascii=False))
        return head

    def heads(self, project: str) -> list[Record]:
        stored = self._call(self._redis.hgetall, self.keys.heads(project))
        records = [json.loads(record) for record in stored.values()]
        return sorted(records, key=lambda record: int(record["id"][1:]))

    def active_head(self, project: str) -> str | None:
        raw = self._call(self._redis.get, self.keys.active_head(project))
        return raw.decode() if raw else None

    def set_active_head(self, project: str, head: str) -> None:
        self._call(self._redis.set, self.keys.active_head(project), head)

    def predictions(self, project: str) -> Iterator[Record]:
        tasks = sorted(t.decode() for t in self._call(self._redis.smembers,
                                                       self.keys.predicted_tasks(project)))
        for start in range(0, len(tasks), BULK_READ):
            keys = [self.keys.prediction(project, task)
                    for task in tasks[start:start + BULK_READ]]
            for raw in self._call(self._redis.mget, keys):
                if raw:
                    yield json.loads(raw)

    def put_embeddings(self, items: Sequence[EmbeddingItem]) -> None:
        if not items:
            return
        pipe = self._redis.pipeline(transaction=True)
        now = repr(time.time())
        for key, vector, image_ref in items:
            pipe.set(self.keys.embedding(key), pack(vector))
            if image_ref is not None:
                self._queue_image_ref(pipe, key, image_ref, now)
        self._call(pipe.execute)

    def put_image_refs(self, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        pipe = self._redis.pipeline(transaction=True)
        now = repr(time.time())
        for key, image_ref in pairs:
            self._queue_image_ref(pipe, key, image_ref, now)
        self._call(pipe.execute)

    def _queue_image_ref(self, pipe: Any, key: str, image_ref: str, now: str) -> None:
        ref = ref_key(key.split("|", 1)[0], image_ref)
        pipe.set(self.keys.image(ref), key)
        pipe.set(self.keys.image_verified(ref), now)

    def embeddings(self, keys: Sequence[str]) -> dict[str, Vector]:
        """One pipeline of an MGET per BULK_READ keys: one round trip."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(keys), BULK_READ):
            pipe.mget([self.keys.embedding(key) for key in keys[start:start + BULK_READ]])
        values = [raw for chunk in self._call(pipe.execute) for raw in chunk]
        return {key: unpack(raw) for key, raw in zip(keys, values) if raw}

    def embedding_key_for(self, model: str, image_ref: str) -> str | None:
        raw = self._call(self._redis.get, self.keys.image(ref_key(model, image_ref)))
        return raw.decode() if raw else None

    def embeddings_for_refs(self, model: str, image_refs: Sequence[str],
                            verified_since: float) -> dict[str, Known]:
        found: dict[str, Known] = {}
        for start in range(0, len(image_refs), BULK_READ):
            found.update(self._fresh_embeddings(model, image_refs[start:start + BULK_READ],
                                                verified_since))
        return found

    def _fresh_embeddings(self, model: str, image_refs: Sequence[str],
                          verified_since: float) -> dict[str, Known]:
        """Two MGETs for the lot: the fresh mappings, then their embeddings."""
        refs = [ref_key(model, image_ref) for image_ref in image_refs]
        mapped = self._call(self._redis.mget, [*map(self.keys.image, refs),
                                                *map(self.keys.image_verified, refs)])
        fresh = {image_ref: key.decode() for image_ref, key, verified
                 in zip(image_refs, mapped[:len(refs)], mapped[len(refs):])
                 if key and verified and float(verified) >= verified_since}
        if not fresh:
            return {}
        vectors = self._call(self._redis.mget, [self.keys.embedding(k) for k in fresh.values()])
        return {image_ref: (key, unpack(raw))
                for (image_ref, key), raw in zip(fresh.items(), vectors) if raw}

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()
