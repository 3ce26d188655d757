"""Prompt text → embedding, encoded once per process and model.

Encoding one prompt costs 40–70 ms on a small CPU (performance-notes.md), so a label set is
never encoded per request: each distinct prompt is encoded once and kept (bounded LRU);
a changed label config only encodes the prompts it adds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .. import metrics

DEFAULT_MAX_PROMPTS = 500_000
Encode = Callable[[Sequence[str]], torch.Tensor]


class TextEmbeddingCache:
    """Thread-safe LRU of normalised prompt embeddings for one model."""

    def __init__(self, max_prompts: int = DEFAULT_MAX_PROMPTS) -> None:
        self.max_prompts = max_prompts
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, texts: Sequence[str]) -> list[str]:
        with self._lock:
            absent = [text for text in dict.fromkeys(texts) if text not in self._rows]
        metrics.TEXT_CACHE.labels("miss").inc(len(absent))
        metrics.TEXT_CACHE.labels("hit").inc(len(set(texts)) - len(absent))
        return absent

    def fill(self, texts: Sequence[str], encode: Encode) -> None:
        """Encode the prompts among `texts` not cached yet (call on the inference thread)."""
        self.add(self.missing(texts), encode)

    def add(self, texts: Sequence[str], encode: Encode) -> dict[str, torch.Tensor]:
        """Encode those of `texts` still not cached (another build may have added some since
        they were found missing) and cache them; return their rows. Inference thread only."""
        with self._lock:
            absent = [text for text in dict.fromkeys(texts) if text not in self._rows]
        if not absent:
            return {}
        rows = dict(zip(absent, encode(absent)))
        self.encoded += len(absent)
        metrics.PROMPTS_ENCODED.inc(len(absent))
        with self._lock:
            self._rows.update(rows)
            while len(self._rows) > self.max_prompts:
                self._rows.popitem(last=False)
        return rows

    def lookup(self, texts: Sequence[str], encode: Encode) -> dict[str, torch.Tensor]:
        """Every one of `texts` → its row, encoding any that were evicted since they were
        added: a head is built from what this returns, never from the cache after eviction
        (a plan larger than the cache once ended in KeyError). Inference thread only."""
        with self._lock:
            found = {text: self._rows[text] for text in dict.fromkeys(texts) if text in self._rows}
            for text in found:
                self._rows.move_to_end(text)
        found.update(self.add([text for text in texts if text not in found], encode))
        return found

    def stack(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) embeddings; every text must have been filled."""
        with self._lock:
            for text in texts:
                self._rows.move_to_end(text)
            return torch.stack([self._rows[text] for text in texts])
