"""The store's contract (`Store`), the logic both stores share (`BaseStore`), and how
embeddings are keyed and packed."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .entry import Entry

Record = dict[str, Any]
ZERO_SHOT = "zero-shot"
"""The active-head value of a project rolled back to pure zero-shot."""
Vector = npt.NDArray[np.float32]
Known = tuple[str, Vector]
"""An image's embedding key and its embedding."""
EmbeddingItem = tuple[str, Vector, str | None]
"""An embedding to store: its key, the vector, and the image reference it was fetched from
(None for a data: URI, never recorded as a reference)."""
BULK_READ = 500
"""References looked up per round trip."""


class Store(Protocol):
    def put_prediction(self, entry: Entry) -> bool:
        """Keep a `prediction` entry as its task's latest prediction."""
        ...

    def put_predictions(self, entries: Sequence[Entry]) -> list[bool]:
        """`put_prediction` of each entry, in order, in one transaction (one round trip)."""
        ...

    def commit_annotation(self, entry: Entry, record: Record, updated: float) -> bool:
        """Atomically: skip if `entry.key` was seen (False); log it; replace the annotation's
        record with `record` unless the stored one is newer than `updated` or deleted."""
        ...

    def commit_deletion(self, entry: Entry, annotations: list[str]) -> bool:
        """Atomically: skip if `entry.key` was seen (False); log it; mark the annotations'
        records deleted."""
        ...

    def events(self) -> Iterator[Record]:
        """The annotation event log, oldest first: every distinct event, each once."""
        ...

    def corrections(self, project: str | None = None) -> Iterator[Record]:
        """Current correction records (deleted ones included, with `deleted_at`)."""
        ...

    def prediction(self, project: str, task: str) -> Record | None:
        """The latest prediction issued for a task."""
        ...

    def predictions(self, project: str) -> Iterator[Record]:
        """The latest prediction issued for each of a project's tasks."""
        ...

    def put_head(self, project: str, record: Record) -> str:
        """Store an adapted head; return its new id (`h1`, `h2`, … per project)."""
        ...

    def heads(self, project: str) -> list[Record]:
        """A project's stored heads, oldest first."""
        ...

    def active_head(self, project: str) -> str | None:
        """The id of the head a project serves; None (never trained) or ZERO_SHOT."""
        ...

    def set_active_head(self, project: str, head: str) -> None: ...

    def put_embedding(self, key: str, vector: Vector, image_ref: str | None = None) -> None:
        """Store an embedding; with `image_ref`, also record that the image at that reference
        was fetched just now and hashed to `key`."""
        ...

    def put_image_ref(self, key: str, image_ref: str) -> None:
        """Record that the image at `image_ref` was fetched just now and hashed to `key`."""
        ...

    def put_embeddings(self, items: Sequence[EmbeddingItem]) -> None:
        """`put_embedding` of each (key, vector, image_ref or None), in one transaction."""
        ...

    def put_image_refs(self, pairs: Sequence[tuple[str, str]]) -> None:
        """`put_image_ref` of each (key, image_ref), in one transaction."""
        ...

    def get_embedding(self, key: str) -> Vector | None: ...

    def embeddings(self, keys: Sequence[str]) -> dict[str, Vector]:
        """The stored embeddings of these keys (those not stored are left out); one round
        trip."""
        ...

    def embedding_key_for(self, model: str, image_ref: str) -> str | None: ...

    def embeddings_for_refs(self, model: str, image_refs: Sequence[str],
                            verified_since: float) -> dict[str, Known]:
        """For each image reference whose mapping to a `model` embedding was recorded at or
        after `verified_since` (Unix time, s) and whose embedding is stored: (key, vector).
        One round trip per few hundred references."""
        ...

    def ping(self) -> None: ...
    def close(self) -> None: ...


def embedding_key(model: str, content: bytes) -> str:
    """Key of an image embedding: the model's identity and the image bytes' SHA-256."""
    return f"{model}|{hashlib.sha256(content).hexdigest()}"


def model_embedding_key(store: Store, key: str | None, image_ref: str | None,
                        model: str | None) -> str | None:
    """The key of an image's embedding by `model`: `key` if it is that model's (any key when
    `model` is None), else the one the store recorded for the image reference."""
    if key and (model is None or key.startswith(f"{model}|")):
        return key
    return store.embedding_key_for(model, image_ref) if model and image_ref else None


def ref_key(model: str, image_ref: str) -> str:
    return f"{model}|{hashlib.sha1(image_ref.encode()).hexdigest()}"


def pack(vector: Vector) -> bytes:
    """Embeddings are stored as float16: half the bytes, far below the model's own precision."""
    return np.asarray(vector, dtype=np.float16).tobytes()


def unpack(data: bytes) -> Vector:
    return np.frombuffer(data, dtype=np.float16).astype(np.float32)


class BaseStore(ABC):
    """What both stores share; subclasses make each write atomic in their own way."""

    @staticmethod
    def log_event(entry: Entry) -> str:
        """The event as the log keeps it."""
        return json.dumps({"key": entry.key, "kind": entry.kind, "project": entry.project,
                           "received_at": entry.received_at, **entry.data},
                          sort_keys=True, ensure_ascii=False)

    def put_prediction(self, entry: Entry) -> bool:
        (kept,) = self.put_predictions([entry])
        return kept

    @abstractmethod
    def put_predictions(self, entries: Sequence[Entry]) -> list[bool]: ...

    def put_embedding(self, key: str, vector: Vector, image_ref: str | None = None) -> None:
        self.put_embeddings([(key, vector, image_ref)])

    def put_image_ref(self, key: str, image_ref: str) -> None:
        self.put_image_refs([(key, image_ref)])

    def get_embedding(self, key: str) -> Vector | None:
        return self.embeddings([key]).get(key)

    @abstractmethod
    def put_embeddings(self, items: Sequence[EmbeddingItem]) -> None: ...

    @abstractmethod
    def put_image_refs(self, pairs: Sequence[tuple[str, str]]) -> None: ...

    @abstractmethod
    def embeddings(self, keys: Sequence[str]) -> dict[str, Vector]: ...

    @abstractmethod
    def commit_annotation(self, entry: Entry, record: Record, updated: float) -> bool:
        """Atomically: skip if `entry.key` was seen; log it; replace the annotation's record
        unless the stored one is newer or deleted."""

    @abstractmethod
    def commit_deletion(self, entry: Entry, annotations: list[str]) -> bool:
        """Atomically: skip if seen; log it; mark the annotations' records deleted."""
