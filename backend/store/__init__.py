"""Where corrections, issued predictions and image embeddings live.

`Store` is the contract; `RedisStore` (store/redis.py, when REDIS_URL is set: shared by every
replica and worker) and `SqliteStore` (store/sqlite.py, embedded in MODEL_DIR: zero services)
implement it, and the same contract tests run against both. The store keeps records and
makes each write atomic; what a record holds is decided above it (corrections/records.py).
`Journal` (corrections/journal.py) wraps either with a local spool so a store outage never
loses a write.
"""

from __future__ import annotations

from ..config import Settings
from .base import (
    BULK_READ,
    ZERO_SHOT,
    BaseStore,
    EmbeddingItem,
    Known,
    Record,
    Store,
    Vector,
    embedding_key,
    model_embedding_key,
    pack,
    ref_key,
    unpack,
)
from .entry import Entry

__all__ = ["BULK_READ", "ZERO_SHOT", "BaseStore", "EmbeddingItem", "Entry", "Known", "Record",
           "Store", "Vector", "embedding_key", "model_embedding_key", "open_store", "pack",
           "ref_key", "unpack"]


def open_store(settings: Settings) -> Store:
    """Redis when REDIS_URL is set, else the embedded SQLite store in MODEL_DIR."""
    if settings.REDIS_URL:
        from .redis import RedisStore

        return RedisStore(settings.REDIS_URL, prefix=settings.STORE_PREFIX,
                          timeout_s=settings.REDIS_TIMEOUT_S)
    from .sqlite import SqliteStore

    return SqliteStore(settings.MODEL_DIR / "store.sqlite3")
