"""The embed phase: image references → fetched bytes → pixels → embeddings (batched on the
inference thread), reusing the store's embedding cache.

Per request, in phases, so the store is read and written a fixed number of times whatever the
number of images: reads once per encoder batch, writes once per group of up to
`DECODED_PER_BATCH` encoder batches. Decoding and encoding overlap batch by batch:

1. by reference: embeddings of images whose reference was checked within IMAGE_REF_TTL_S
   (`known_embeddings`: no download at all);
2. fetch, hash, decode and preprocess every other reference (`_decoded_batches`): in the data
   plane's decode processes (uint8 pixels through shared memory, images/plane.py) unless
   DECODE_PROCESSES=0 or the model's preprocessing does not split; else fetched on the event
   loop and decoded in DECODE_THREADS threads;
3. per encoder batch of decoded images, one read of the stored embeddings of their keys
   (same bytes, same model);
4. encode the misses (the inference thread batches them, across requests too);
5. one write: the new embeddings, and the references seen to hold each image.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics
from ..config import Settings
from ..corrections.journal import Journal
from ..errors import BackendError, ImageRefused, StoreUnavailable, TaskError
from ..images.decode import decode_image
from ..images.fetch import Fetched, ImageFetcher, is_data_uri
from ..images.plane import DecodePlane, plane_processes
from ..labelstudio.client import LabelStudioAccess, ProjectId
from ..labelstudio.label_config import LabelSpace
from ..store import EmbeddingItem, Store, Vector, embedding_key
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
Refs = Mapping[str, "int | None"]
"""Image reference → the id of the (first) task using it."""


@dataclass(frozen=True)
class Embedded:
    """An image's embedding and the store key it is cached under."""

    vector: torch.Tensor
    key: str


@dataclass(frozen=True)
class Decoded:
    """A fetched image: its embedding key (model + SHA-256 of the bytes) and its preprocessed
    pixels, or why it could not be decoded (the task fails only if no embedding is stored for
    these bytes)."""

    key: str
    pixels: torch.Tensor | BaseException


class Slots:
    """Room for decoded images waiting for the encoder, so memory stays bounded. A group of
    images takes its slots one by one (each image starts as soon as it has one), and groups
    take in turn: two groups never each hold part of what the other waits for."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = asyncio.Semaphore(capacity)
        self._taking = asyncio.Lock()

    def group(self) -> SlotGroup:
        return SlotGroup(self._free, self._taking)


class SlotGroup:
    """The slots one group holds; `release_all` when the group is done (or cancelled)."""

    def __init__(self, free: asyncio.Semaphore, taking: asyncio.Lock) -> None:
        self._free = free
        self.taking = taking
        self.held = 0

    async def take(self) -> None:
        """One more slot; call only while holding `taking`."""
        await self._free.acquire()
        self.held += 1

    def release(self, count: int = 1) -> None:
        for _ in range(min(count, self.held)):
            self.held -= 1
            self._free.release()

    def release_all(self) -> None:
        self.release(self.held)


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
        self._decoded = Slots(DECODED_PER_BATCH * batch)
        # background jobs get their own, smaller share: they never hold what a request needs
        self._decoded_background = Slots(2 * batch)
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

    def _slots(self, priority: int) -> Slots:
        return self._decoded_background if priority == BACKGROUND else self._decoded

    async def embed_tasks(self, tasks: Sequence[Task], spaces: Sequence[LabelSpace],
                          ls: LabelStudioAccess | None,
                          priority: int = FOREGROUND) -> Embeddings:
        """Embedding (or the error) of every distinct image reference the tasks use."""
        refs = distinct_refs(tasks, spaces)
        known: Embeddings = {**await self.known_embeddings(list(refs))}
        todo = [(ref, task) for ref, task in refs.items() if ref not in known]
        size = self._slots(priority).capacity  # a group never needs more slots than there are
        groups = [dict(todo[start:start + size]) for start in range(0, len(todo), size)]
        done = await asyncio.gather(*(self._embed_group(group, ls, priority)
                                      for group in groups), return_exceptions=True)
        for group, embedded in zip(groups, done):
            known.update(embedded if isinstance(embedded, dict)
                         else dict.fromkeys(group, embedded))
        return known

    async def embed(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None,
                    priority: int = FOREGROUND) -> Embedded:
        """One image through phases 2-5 (`BACKGROUND` work waits behind Label Studio's
        requests for decode slots and encoder)."""
        found = (await self._embed_group({ref: task_id}, ls, priority))[ref]
        if isinstance(found, BaseException):
            raise found
        return found

    async def known_embeddings(self, refs: list[str]) -> dict[str, Embedded]:
        """Phase 1: embeddings of the images whose reference was checked within
        IMAGE_REF_TTL_S: they need no download. One store round trip for the lot; data: URIs
        are hashed instead."""
        ttl = self.settings.IMAGE_REF_TTL_S
        refs = [ref for ref in refs if not is_data_uri(ref)]
        if not ttl or not refs:
            return {}
        found = await self.cached(self.store.embeddings_for_refs, self.model, refs,
                                  time.time() - ttl) or {}
        metrics.EMBEDDING_CACHE.labels("hit").inc(len(found))
        return {ref: Embedded(torch.from_numpy(vector), key)
                for ref, (key, vector) in found.items()}

    async def _embed_group(self, refs: Refs, ls: LabelStudioAccess | None,
                           priority: int) -> Embeddings:
        """Phases 2-5 for up to one `Slots.capacity` of images, pipelined by encoder batch:
        as soon as a batch of images is decoded, one read finds those already stored and the
        rest go to the encoder while the next batch decodes; one write at the end."""
        encoder = self.host.loaded()
        slots = self._slots(priority).group()
        done: Embeddings = {}
        hits: dict[str, Embedded] = {}
        encoding: list[asyncio.Future[Embeddings]] = []
        try:
            async for decoded in self._decoded_batches(refs, ls, encoder, slots, priority):
                images = {ref: d for ref, d in decoded.items() if isinstance(d, Decoded)}
                failed = {ref: e for ref, e in decoded.items() if isinstance(e, BaseException)}
                done.update(failed)
                slots.release(len(failed))
                stored: dict[str, Vector] = await self.cached(
                    self.store.embeddings, list(dict.fromkeys(d.key for d in images.values()))
                ) or {}
                found = self._hits(images, stored)
                slots.release(len(found))
                hits.update(found)
                encoding.append(asyncio.ensure_future(
                    self._encode_misses(images, encoder, priority, slots)))
            encoded: Embeddings = {}
            for batch in await asyncio.gather(*encoding):
                encoded.update(batch)
            await self._remember(hits, encoded)
            return {**done, **hits, **encoded}
        finally:
            for job in encoding:
                job.cancel()
            slots.release_all()

    async def _decoded_batches(self, refs: Refs, ls: LabelStudioAccess | None,
                               encoder: Encoder, slots: SlotGroup, priority: int
                               ) -> AsyncIterator[dict[str, Decoded | BaseException]]:
        """Phase 2: fetch, hash, decode and preprocess every reference, each once it has a
        slot in `slots`, yielded an encoder batch at a time (the last one may be smaller): in
        the decode processes (uint8 pixels), or fetched on the event loop and decoded in the
        decode pool (float tensors). An error (fetch refused, image unreadable) is that
        reference's result."""
        arrived: asyncio.Queue[tuple[str, Decoded | BaseException]] = asyncio.Queue()
        jobs: list[asyncio.Future[None]] = []

        async def one(ref: str, task_id: int | None) -> None:
            try:
                result: Decoded | BaseException = await self._decode_one(
                    ref, task_id, ls, encoder, priority)
            except Exception as exc:  # noqa: BLE001 - fails this reference only
                result = exc
            arrived.put_nowait((ref, result))

        async def start_all() -> None:
            async with slots.taking:
                for ref, task_id in refs.items():
                    await slots.take()
                    jobs.append(asyncio.ensure_future(one(ref, task_id)))

        starter = asyncio.ensure_future(start_all())
        size, waiting = self.host.inference.max_batch, len(refs)
        ready: dict[str, Decoded | BaseException] = {}
        try:
            while waiting:
                ref, result = await arrived.get()
                ready[ref], waiting = result, waiting - 1
                if len(ready) >= size or not waiting:
                    yield ready
                    ready = {}
            await starter
        finally:
            starter.cancel()
            for job in jobs:
                job.cancel()

    async def _decode_one(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None,
                          encoder: Encoder, priority: int) -> Decoded:
        plane = self.plane(encoder)
        if plane is not None:
            made = await plane.decode(ref, task_id, ls, background=priority == BACKGROUND)
            pixels = made.pixels
            return Decoded(made.key, pixels if isinstance(pixels, BaseException)
                           else torch.from_numpy(pixels))
        fetched = await self.fetcher.fetch(ref, task_id=task_id, ls=ls)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, self._decode, encoder, fetched)

    def _decode(self, encoder: Encoder, fetched: Fetched) -> Decoded:
        key = embedding_key(self.model, fetched.data)
        try:
            return Decoded(key, self._pixels(encoder, fetched))
        except Exception as exc:  # noqa: BLE001 - fails its task, unless the store has it
            return Decoded(key, exc)

    def _pixels(self, encoder: Encoder, fetched: Fetched) -> torch.Tensor:
        image = decode_image(fetched.data, max_pixels=self.settings.MAX_IMAGE_PIXELS,
                             draft_size=encoder.input_size, content_type=fetched.content_type,
                             max_bytes=self.settings.MAX_DECODE_BYTES,
                             formats=self.settings.image_formats)
        return encoder.preprocess(image)

    @staticmethod
    def _hits(images: dict[str, Decoded], stored: dict[str, Vector]) -> dict[str, Embedded]:
        """Phase 3's outcome: the images whose embedding is stored, taken out of `images`
        (what is left are the misses). Counted in the embedding-cache metric."""
        hits = {ref: Embedded(torch.from_numpy(stored[decoded.key]), decoded.key)
                for ref, decoded in images.items() if decoded.key in stored}
        for ref in hits:
            del images[ref]
        metrics.EMBEDDING_CACHE.labels("hit").inc(len(hits))
        metrics.EMBEDDING_CACHE.labels("miss").inc(len(images))
        return hits

    async def _encode_misses(self, misses: dict[str, Decoded], encoder: Encoder, priority: int,
                             slots: SlotGroup) -> Embeddings:
        """Phase 4: encode the misses (emptying `misses`, so each image's pixels are freed
        as soon as it is encoded; its slot is given back then too)."""
        async def one(decoded: Decoded) -> Embedded:
            try:
                if isinstance(decoded.pixels, BaseException):
                    raise decoded.pixels
                # uint8 from the decode processes, normalised on the inference thread
                encode = (encoder.encode_pixels if decoded.pixels.dtype == torch.uint8
                          else encoder.encode_images)
                row = await self.host.inference.encode(encode, decoded.pixels, priority)
            finally:
                slots.release()
            metrics.IMAGES_ENCODED.inc()
            return Embedded(row, decoded.key)

        refs = list(misses)
        jobs = [one(misses.pop(ref)) for ref in refs]
        return dict(zip(refs, await asyncio.gather(*jobs, return_exceptions=True)))

    async def _remember(self, hits: dict[str, Embedded], encoded: Embeddings) -> None:
        """Phase 5: one write of the new embeddings, each with the reference it came from (a
        data: URI too: a corrected data: image then finds its embedding), and the references
        seen to hold an already stored image (URLs only: a data: URI is its own bytes)."""
        new: list[EmbeddingItem] = [(e.key, e.vector.numpy(), ref)
                                    for ref, e in encoded.items() if isinstance(e, Embedded)]
        seen = [(e.key, ref) for ref, e in hits.items() if not is_data_uri(ref)]
        if new or seen:
            await self.cached(self._write_embeddings, new, seen)

    def _write_embeddings(self, new: list[EmbeddingItem], seen: list[tuple[str, str]]) -> None:
        if new:
            self.store.put_embeddings(new)
        if seen:
            self.store.put_image_refs(seen)

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
