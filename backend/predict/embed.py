"""The embed phase: image references → fetched bytes → pixels → embeddings (batched on the
inference thread), reusing the store's embedding cache."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics
from ..config import Settings
from ..corrections.journal import Journal
from ..errors import BackendError, ImageRefused, StoreUnavailable, TaskError
from ..images.decode import decode_image
from ..images.fetch import Fetched, ImageFetcher
from ..images.plane import DecodePlane, plane_processes
from ..labelstudio.client import LabelStudioAccess, ProjectId
from ..labelstudio.label_config import LabelSpace
from ..store import Store, Vector, embedding_key
from ..store.entry import Entry
from ..zeroshot.encoder import Encoder
from ..zeroshot.inference import BACKGROUND, BACKGROUND_NICE, FOREGROUND, lower_priority
from ..zeroshot.loader import EncoderHost

log = logging.getLogger(__name__)

DECODED_PER_BATCH = 4
"""Decoded images allowed to wait for the encoder, in encoder batches."""
LAZY_EMBEDDINGS_QUEUED = 1_000
"""Beyond this, corrected images are not embedded in the background (it is best effort)."""
LAZY_EMBEDDINGS_IN_FLIGHT = 4
"""Images of corrected-but-never-predicted tasks embedded at once, in the background."""

Task = dict[str, Any]
Embeddings = dict[str, "Embedded | BaseException"]
"""Image reference → its embedding, or why there is none."""


@dataclass(frozen=True)
class Embedded:
    """An image's embedding and the store key it is cached under."""

    vector: torch.Tensor
    key: str


class Embedder:
    """Embeds images: the decode pool, the bounds on decoded images, the embedding cache."""

    def __init__(self, settings: Settings, host: EncoderHost, fetcher: ImageFetcher,
                 store: Store, journal: Journal) -> None:
        self.settings = settings
        self.host = host
        self.fetcher = fetcher
        self.store = store
        self.journal = journal
        threads = settings.DECODE_THREADS or os.cpu_count() or 2
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode",
                                              initializer=lower_priority)
        batch = host.inference.max_batch
        # decoded images waiting for the encoder: bounded, so memory is too
        self._decoded = asyncio.Semaphore(DECODED_PER_BATCH * batch)
        # background jobs get their own, smaller share: they never hold what a request needs
        self._decoded_background = asyncio.Semaphore(2 * batch)
        self._lazy = asyncio.Semaphore(LAZY_EMBEDDINGS_IN_FLIGHT)
        self._lazy_waiting = 0
        self._plane: DecodePlane | None = None

    @property
    def model(self) -> str:
        return self.host.embedding_model

    def close(self) -> None:
        if self._plane is not None:
            self._plane.close()
        self.decode_pool.shutdown(wait=True, cancel_futures=True)

    async def embed_tasks(self, tasks: Sequence[Task], spaces: Sequence[LabelSpace],
                          ls: LabelStudioAccess | None,
                          priority: int = FOREGROUND) -> Embeddings:
        """Embedding (or the error) of every distinct image reference the tasks use."""
        refs = distinct_refs(tasks, spaces)
        known = await self.known_embeddings(list(refs))
        jobs = {ref: asyncio.ensure_future(self.embed(ref, task_id, ls, priority))
                for ref, task_id in refs.items() if ref not in known}
        done = await asyncio.gather(*jobs.values(), return_exceptions=True)
        return {**known, **dict(zip(jobs, done))}

    async def known_embeddings(self, refs: list[str]) -> dict[str, Embedded]:
        """Embeddings of the images whose reference was checked within IMAGE_REF_TTL_S: they
        need no download. One store round trip for the lot; data: URIs are hashed instead."""
        ttl = self.settings.IMAGE_REF_TTL_S
        refs = [ref for ref in refs if not ref.lstrip().startswith("data:")]
        if not ttl or not refs:
            return {}
        found = await self.cached(self.store.embeddings_for_refs, self.model, refs,
                                  time.time() - ttl) or {}
        metrics.EMBEDDING_CACHE.labels("hit").inc(len(found))
        return {ref: Embedded(torch.from_numpy(vector), key)
                for ref, (key, vector) in found.items()}

    async def embed(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None,
                    priority: int = FOREGROUND) -> Embedded:
        """Fetch the image; reuse its cached embedding (same bytes, same model) or encode it
        (`BACKGROUND` work waits behind Label Studio's requests for decode slots and encoder)."""
        encoder = self.host.loaded()
        plane = self.plane(encoder)
        if plane is not None:
            return await self._embed_in_plane(plane, encoder, ref, task_id, ls, priority)
        fetched = await self.fetcher.fetch(ref, task_id=task_id, ls=ls)
        key = embedding_key(self.model, fetched.data)
        cached = await self.cached(self._stored_embedding, key, ref)
        if cached is not None:
            metrics.EMBEDDING_CACHE.labels("hit").inc()
            return Embedded(torch.from_numpy(cached), key)
        metrics.EMBEDDING_CACHE.labels("miss").inc()
        loop = asyncio.get_running_loop()
        async with self._decoded_background if priority == BACKGROUND else self._decoded:
            pixels = await loop.run_in_executor(self.decode_pool, self._pixels, encoder, fetched)
            row = await self.host.inference.encode(encoder.encode_images, pixels, priority)
        metrics.IMAGES_ENCODED.inc()
        await self.cached(self.store.put_embedding, key, row.numpy(), ref)
        return Embedded(row, key)

    # --- the data plane (DECODE_PROCESSES) -------------------------------------------------------
    def plane(self, encoder: Encoder) -> DecodePlane | None:
        """The decode processes, started on first use; None when DECODE_PROCESSES=0 or the
        model's preprocessing does not split into PIL steps and a tensor tail."""
        steps = getattr(encoder, "pixel_steps", None)
        if self.settings.DECODE_PROCESSES == 0 or steps is None:
            return None
        if self._plane is None:
            self._plane = DecodePlane(
                self.settings, model=self.model, steps=steps, side=encoder.input_size,
                processes=plane_processes(self.settings, os.cpu_count()), nice=BACKGROUND_NICE)
        return self._plane

    async def _embed_in_plane(self, plane: DecodePlane, encoder: Encoder, ref: str,
                              task_id: int | None, ls: LabelStudioAccess | None,
                              priority: int) -> Embedded:
        """`embed` with fetch, hash, decode and resize in the decode processes; uint8 pixels
        normalised and encoded on the inference thread, batched across requests."""
        async with self._decoded_background if priority == BACKGROUND else self._decoded:
            decoded = await plane.decode(ref, task_id, ls, background=priority == BACKGROUND)
            cached = await self.cached(self._stored_embedding, decoded.key, ref)
            if cached is not None:
                metrics.EMBEDDING_CACHE.labels("hit").inc()
                return Embedded(torch.from_numpy(cached), decoded.key)
            metrics.EMBEDDING_CACHE.labels("miss").inc()
            row = await self.host.inference.encode(encoder.encode_pixels,
                                                   torch.from_numpy(decoded.pixels), priority)
        metrics.IMAGES_ENCODED.inc()
        await self.cached(self.store.put_embedding, decoded.key, row.numpy(), ref)
        return Embedded(row, decoded.key)

    def _stored_embedding(self, key: str, ref: str) -> Vector | None:
        """The stored embedding of these bytes; if found, `ref` was just seen to hold them."""
        vector = self.store.get_embedding(key)
        if vector is not None and not ref.lstrip().startswith("data:"):
            self.store.put_image_ref(key, ref)
        return vector

    async def cached(self, call: Callable[..., Any], *args: Any) -> Any:
        """The embedding cache is an optimisation: when the store is down, carry on without.
        While the journal is spooling, the store is known to be down: don't wait for it."""
        if self.journal.pending:
            return None
        try:
            return await asyncio.to_thread(call, *args)
        except StoreUnavailable as exc:
            log.debug("embedding cache unavailable: %s", exc)
            return None

    def _pixels(self, encoder: Encoder, fetched: Fetched) -> torch.Tensor:
        image = decode_image(fetched.data, max_pixels=self.settings.MAX_IMAGE_PIXELS,
                             draft_size=encoder.input_size, content_type=fetched.content_type,
                             max_bytes=self.settings.MAX_DECODE_BYTES,
                             formats=self.settings.image_formats)
        return encoder.preprocess(image)

    async def embed_corrected(
            self, entries: Sequence[Entry],
            label_studio: Callable[[ProjectId | None], LabelStudioAccess | None]) -> None:
        """Embed the images of corrected tasks the backend never predicted (background)."""
        for entry in entries:
            if entry.kind != "annotation" or not self.host.ready:
                continue
            for ref in entry.data["images"].values():
                known = await self.cached(self.store.embedding_key_for, self.model, ref)
                if known is None and self._lazy_waiting < LAZY_EMBEDDINGS_QUEUED:
                    self._lazy_waiting += 1
                    try:
                        async with self._lazy:
                            await self._embed_quietly(
                                ref, entry, label_studio(ProjectId(entry.project)))
                    finally:
                        self._lazy_waiting -= 1

    async def _embed_quietly(self, ref: str, entry: Entry, ls: LabelStudioAccess | None) -> None:
        task_id = int(entry.data["task"]) if entry.data["task"].isdigit() else None
        try:
            await self.embed(ref, task_id, ls)
        except BackendError as exc:
            log.warning("task %s: could not embed the corrected image: %s", task_id, exc)


def task_id(task: Task) -> int | None:
    value = task.get("id") if isinstance(task, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def distinct_refs(tasks: Sequence[Task], spaces: Sequence[LabelSpace]) -> dict[str, int | None]:
    """Each image reference the tasks use, with the id of the first task using it."""
    refs: dict[str, int | None] = {}
    for task in tasks:
        for space in spaces:
            ref = image_ref(task, space)
            if isinstance(ref, str) and ref not in refs:
                refs[ref] = task_id(task)
    return refs


def image_ref(task: Task, space: LabelSpace) -> str | TaskError:
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        return TaskError("the task has no 'data' object")
    if space.data_key not in data:
        return TaskError(f"the task's data has no field {space.data_key!r} "
                         f"(named by <Image value=\"${space.data_key}\">)")
    value = data[space.data_key]
    if not isinstance(value, str):
        return ImageRefused(f"data.{space.data_key} is a {type(value).__name__}, not an image URL")
    return value
