"""`ZeroShotModel`: the Label Studio model, with the familiar `predict(tasks, context)` and
`fit(event, data)` of label-studio-ml backends.

One instance per process holds the heavy parts (encoder, inference thread, HTTP client, caches)
and runs the request path phase by phase:

    label config → label spaces → prompt plans → heads (text, cached)
    task → image ref → bytes → RGB image → tensor → embedding (batched) → probabilities → regions
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from . import metrics
from .adapt.registry import ZERO_SHOT_SERVED, HeadRegistry, ServedHead
from .adapt.trainer import Trainer
from .config import Settings
from .corrections.entries import entries_from_webhook, prediction_entry
from .corrections.journal import Journal
from .errors import (
    BackendError,
    ImageRefused,
    LimitExceeded,
    ModelUnavailable,
    Overloaded,
    ReviewError,
    StoreUnavailable,
    TaskError,
)
from .images.decode import decode_image
from .images.fetch import Fetched, ImageFetcher
from .labelstudio.client import LabelStudioAccess, project_key
from .labelstudio.label_config import LabelSpace, ParsedConfig, parse_label_config
from .labelstudio.version_sync import VersionSync
from .predict.predictions import (
    ControlOutcome,
    decide,
    empty_prediction,
    region_id,
    task_prediction,
)
from .review.queues import head_probabilities, project_view, review, selection
from .store import Store, Vector, embedding_key, open_store
from .store.entry import Entry
from .zeroshot.encoder import Encoder, ModelSpec, load_encoder
from .zeroshot.inference import BACKGROUND, FOREGROUND, InferenceWorker, lower_priority
from .zeroshot.prompts import PromptPlan, check_prompt_count, plan_prompts, prompt_set_hash
from .zeroshot.scoring import Head, build_head, ensemble, label_logits, probabilities
from .zeroshot.text_embeddings import DEFAULT_MAX_PROMPTS, TextEmbeddingCache
from .zeroshot.uncertainty import measures

log = logging.getLogger(__name__)

DECODED_PER_BATCH = 4
"""Decoded images allowed to wait for the encoder, in encoder batches."""
LAZY_EMBEDDINGS_QUEUED = 1_000
"""Beyond this, corrected images are not embedded in the background (it is best effort)."""
LAZY_EMBEDDINGS_IN_FLIGHT = 4
"""Images of corrected-but-never-predicted tasks embedded at once, in the background."""
HEAD_CACHE_SIZE = 256
REMEMBERED_CONFIG_CHARS = 64 * 1024 * 1024
"""Label-config text kept for projects (for Train and review exports), in characters: the
least recently used projects' configs are forgotten beyond it (the newest is always kept)."""
PROMPTS_PER_CALL = 256
"""Prompts encoded per inference-thread call while a head is built: image batches of other
requests run between calls, so a large label set delays them by one call, not by all of it."""
MAX_VERSIONS_KEPT = 100
LOAD_WAIT_S = 90.0
"""How long /predict waits for a model still loading (Label Studio gives it 100 s)."""

Task = dict[str, Any]
State = Literal["loading", "ready", "failed"]


@dataclass
class ModelState:
    state: State = "loading"
    error: str | None = None
    load_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProjectContext:
    """What one request knows about its project: label spaces, heads, version, LS access."""

    parsed: ParsedConfig
    heads: tuple[Head, ...]
    model_version: str
    ls: LabelStudioAccess | None
    project: str | None = None
    active: ServedHead = ZERO_SHOT_SERVED


@dataclass(frozen=True)
class Embedded:
    """An image's embedding and the store key it is cached under."""

    vector: torch.Tensor
    key: str


class ZeroShotModel:
    """Zero-shot image classifier speaking Label Studio's ML-backend protocol."""

    def __init__(self, settings: Settings, encoder: Encoder | None = None,
                 fetcher: ImageFetcher | None = None, store: Store | None = None) -> None:
        self.settings = settings
        self.spec = ModelSpec.from_settings(settings)
        self.model_label = self.spec.label()  # the weights as loaded, even if the file changes
        # random weights differ in every process: their embeddings must never be reused
        self.embedding_model = self.model_label + (f"#{uuid.uuid4().hex[:8]}"
                                                  if self.spec.random_weights else "")
        self.status = ModelState()
        self.encoder: Encoder | None = encoder
        self.worker = InferenceWorker(self._max_batch(), settings.BATCH_WAIT_MS / 1000)
        # room for the largest config's prompts: a head never outgrows the cache
        self.texts = TextEmbeddingCache(max(DEFAULT_MAX_PROMPTS, settings.MAX_PROMPTS_PER_CONFIG))
        self.fetcher = fetcher or ImageFetcher(settings)
        threads = settings.DECODE_THREADS or os.cpu_count() or 2
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode",
                                              initializer=lower_priority)
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._building: dict[str, asyncio.Future[Head]] = {}
        self._projects: dict[str, LabelStudioAccess] = {}
        """Per project, the Label Studio host and token its last /setup named: used only for
        that project, and the token only ever goes to that host."""
        self._configs: OrderedDict[str, str] = OrderedDict()  # project → its last label config
        self._versions: OrderedDict[str, None] = OrderedDict()
        self.store = store or open_store(settings)
        self.journal = Journal(self.store, settings.MODEL_DIR / "spool")
        self.registry = HeadRegistry(self.store, self.embedding_model)
        self.version_sync = VersionSync(self.fetcher.ls_policy)
        self.trainer = Trainer(self.store, self.registry, self._zero_shot_heads,
                               settings.ADAPT_EVERY)
        self._lazy = asyncio.Semaphore(LAZY_EMBEDDINGS_IN_FLIGHT)
        self._lazy_waiting = 0
        # decoded images waiting for the encoder: bounded, so memory is too
        self._decoded = asyncio.Semaphore(DECODED_PER_BATCH * self.worker.max_batch)
        # background jobs get their own, smaller share: they never hold what a request needs
        self._decoded_background = asyncio.Semaphore(2 * self.worker.max_batch)
        self.pending_tasks = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the inference thread and load the model on it, in the background."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # started outside an event loop: no background embedding
            self._loop = None
        self.journal.start()
        self.worker.start()
        if self.encoder is not None:
            self._mark_ready(0.0)
            return
        self.worker.submit(self._load)

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.encoder = load_encoder(self.settings)
        except BackendError as exc:
            self.status = ModelState("failed", str(exc))
            log.error("model failed to load: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - anything else is a load failure too
            self.status = ModelState("failed", f"{type(exc).__name__}: {exc}")
            log.exception("model failed to load")
            return
        self._mark_ready(time.perf_counter() - started)

    def _mark_ready(self, seconds: float) -> None:
        assert self.encoder is not None
        details: dict[str, Any] = getattr(self.encoder, "describe", dict)()
        self.status = ModelState("ready", None, round(seconds, 3), details)
        metrics.MODEL_LOAD_SECONDS.set(seconds)
        metrics.MODEL_READY.set(1)
        log.info("model %s ready in %.1f s: %s", self.model_label, seconds, details)

    async def aclose(self) -> None:
        await self.trainer.wait_idle()
        await asyncio.to_thread(self.trainer.close)
        await asyncio.to_thread(self.worker.stop, 30.0)
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        await self.version_sync.aclose()
        await self.fetcher.aclose()
        await asyncio.to_thread(self.journal.stop)
        self.store.close()

    async def wait_ready(self, timeout: float = LOAD_WAIT_S) -> Encoder:
        deadline = time.monotonic() + timeout
        while self.status.state == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.status.state == "failed":
            raise ModelUnavailable(f"The model failed to load: {self.status.error}")
        if self.encoder is None:
            raise ModelUnavailable(f"The model is still loading after {timeout:.0f} s; retry.")
        return self.encoder

    def _max_batch(self) -> int:
        """CPU: batch 1 → 8 gains only 1.4× on ViT-B/32 (performance-notes.md); GPU: batch big."""
        if self.settings.BATCH_SIZE:
            return self.settings.BATCH_SIZE
        device = self.settings.DEVICE
        gpu = device.startswith(("cuda", "mps")) or device == "auto" and torch.cuda.is_available()
        return 64 if gpu else 8

    # --- setup: cheap, never touches the model ----------------------------------------------
    def model_version(self, parsed: ParsedConfig, active: ServedHead = ZERO_SHOT_SERVED) -> str:
        """Backbone, weights, prompt-set hash and the project's adapted head if it has one,
        e.g. `ViT-B-16-SigLIP/webli:p1a2b3c4d` or `…:p1a2b3c4d:h3`."""
        plans = [plan_prompts(space, self.settings.TEMPLATES) for space in parsed.spaces]
        version = f"{self.model_label}:p{prompt_set_hash(plans, parsed.spaces)}"
        if active.id:
            version += f":{active.id}"
        self._versions[version] = None
        self._versions.move_to_end(version)
        while len(self._versions) > MAX_VERSIONS_KEPT:
            self._versions.popitem(last=False)
        return version

    def issued_versions(self) -> list[str]:
        """Model versions this process has issued, most recent last."""
        return list(self._versions)

    def setup(self, label_config: str, project: Any = None, hostname: str | None = None,
              access_token: str | None = None) -> str:
        """Validate the config, remember how to reach Label Studio, return the model_version."""
        parsed = self._parse(label_config)
        key = project_key(project)
        if key is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._remember_config, key, label_config)
        if self.status.state == "failed":
            raise ModelUnavailable(f"The model failed to load: {self.status.error}")
        self.remember_project(project, hostname, access_token)
        return self.model_version(parsed, self.active_head(project_key(project)))

    def active_head(self, project: str | None) -> ServedHead:
        """The adapted head a project serves; zero-shot when it has none (or the store is
        down and this process never read it)."""
        if not self.settings.ADAPT:
            return ZERO_SHOT_SERVED
        try:
            return self.registry.active(project)
        except StoreUnavailable as exc:
            log.debug("active head unknown: %s", exc)
            return self.registry.last_known(project)

    def remember_project(self, project: Any, hostname: str | None, token: str | None) -> None:
        """Keep the host and token a /setup named, as this project's trust record: its
        token is only ever sent to its own origin, and nothing in it reaches other projects."""
        key = project_key(project)
        if key is None or not hostname or not hostname.startswith(("http://", "https://")):
            return
        record = LabelStudioAccess(hostname, token or None)
        previous = self._projects.get(key)
        self._projects[key] = record
        configured = self.settings.LABEL_STUDIO_URL
        if (configured and not self.settings.LABEL_STUDIO_API_KEY and record.token
                and not record.owns(configured)
                and (previous is None or previous.url != record.url)):
            log.warning("project %s: /setup names Label Studio at %s, not LABEL_STUDIO_URL=%s, "
                        "so its token is not sent to LABEL_STUDIO_URL; set LABEL_STUDIO_API_KEY",
                        key, record.url, configured)

    def label_studio(self, project: Any = None) -> LabelStudioAccess | None:
        """Settings first (they know the URL as this backend sees it), then what /setup said.
        The configured key goes only to LABEL_STUDIO_URL; a /setup token only to its own
        origin (to LABEL_STUDIO_URL, then, only when they are the same)."""
        remembered = self._projects.get(project_key(project) or "")
        url, token = self.settings.LABEL_STUDIO_URL, self.settings.LABEL_STUDIO_API_KEY
        if not url:
            return remembered
        if token is None and remembered is not None and remembered.owns(url):
            token = remembered.token
        return LabelStudioAccess(url, token)

    async def warm_up(self, label_config: str) -> None:
        """Encode a config's prompts ahead of the first /predict (called after /setup)."""
        if self.status.state != "ready":
            return
        await self.context(label_config)

    # --- predict -----------------------------------------------------------------------------
    async def context(self, label_config: str, project: Any = None,
                      head: str | None = None) -> ProjectContext:
        """What predicting for this config and project needs; `head` pins a stored head
        (a pre-label job keeps the one it started with) instead of the active one."""
        parsed = await asyncio.to_thread(self._parse, label_config)
        encoder = await self.wait_ready()
        heads = [await self._head(space, encoder) for space in parsed.spaces]
        ls = self.label_studio(project)
        key = project_key(project)
        if key is not None:
            self._remember_config(key, label_config)
        if head is None or key is None:
            active = await asyncio.to_thread(self.active_head, key)
        else:
            active = await asyncio.to_thread(self.registry.load, key, head)
        return ProjectContext(parsed, tuple(heads), self.model_version(parsed, active), ls,
                              key, active)

    def _parse(self, label_config: str) -> ParsedConfig:
        """The parsed config, refused (422) if it expands to more than MAX_PROMPTS_PER_CONFIG
        prompts."""
        parsed = parse_label_config(label_config)
        check_prompt_count(parsed.spaces, self.settings.TEMPLATES,
                           self.settings.MAX_PROMPTS_PER_CONFIG)
        return parsed

    def _remember_config(self, project: str, label_config: str) -> None:
        self._configs[project] = label_config
        self._configs.move_to_end(project)
        while len(self._configs) > 1 and (
                len(self._configs) > HEAD_CACHE_SIZE
                or sum(map(len, self._configs.values())) > REMEMBERED_CONFIG_CHARS):
            self._configs.popitem(last=False)

    async def _zero_shot_heads(self, label_config: str) -> tuple[ParsedConfig, tuple[Head, ...]]:
        ctx = await self.context(label_config)
        return ctx.parsed, ctx.heads

    async def predict(self, tasks: Sequence[Task], context: dict[str, Any] | None = None, *,
                      label_config: str, project: Any = None, head: str | None = None,
                      background: bool = False) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order. A failing task gets an empty one.
        `background` work (pre-label jobs) waits for Label Studio's requests at every step."""
        priority = BACKGROUND if background else FOREGROUND
        with self._admitted(len(tasks)):
            ctx = await self.context(label_config, project, head)
            embeddings = await self._embed_tasks(tasks, ctx, priority)
            unsure: list[dict[str, dict[str, float]]] = [{} for _ in tasks]
            results = [self._predict_task(task, embeddings, ctx, unsure[i])
                       for i, task in enumerate(tasks)]
            await self._record_predictions(tasks, results, embeddings, ctx, unsure)
        if self.settings.SYNC_MODEL_VERSION and any("result" in r for r in results):
            self.version_sync.after_predict(ctx.project, ctx.model_version, ctx.ls)
        return results

    @contextlib.contextmanager
    def _admitted(self, count: int) -> Iterator[None]:
        """Shed a request up front, rather than queue work that will not finish in time."""
        limit = self.settings.MAX_PENDING_TASKS
        if self.pending_tasks and self.pending_tasks + count > limit:
            raise Overloaded(f"{self.pending_tasks} tasks are being predicted already "
                             f"(MAX_PENDING_TASKS={limit}); retry in a few seconds")
        self.pending_tasks += count
        try:
            yield
        finally:
            self.pending_tasks -= count

    async def _embed_tasks(self, tasks: Sequence[Task], ctx: ProjectContext,
                           priority: int = FOREGROUND) -> dict[str, Embedded | BaseException]:
        """Embedding (or the error) of every distinct image reference the tasks use."""
        refs = _distinct_refs(tasks, ctx.parsed.spaces)
        known = await self._known_embeddings(list(refs))
        jobs = {ref: asyncio.ensure_future(self._embed(ref, task_id, ctx.ls, priority))
                for ref, task_id in refs.items() if ref not in known}
        done = await asyncio.gather(*jobs.values(), return_exceptions=True)
        return {**known, **dict(zip(jobs, done))}

    async def _known_embeddings(self, refs: list[str]) -> dict[str, Embedded]:
        """Embeddings of the images whose reference was checked within IMAGE_REF_TTL_S: they
        need no download. One store round trip for the lot; data: URIs are hashed instead."""
        ttl = self.settings.IMAGE_REF_TTL_S
        refs = [ref for ref in refs if not ref.lstrip().startswith("data:")]
        if not ttl or not refs:
            return {}
        found = await self._cache(self.store.embeddings_for_refs, self.embedding_model, refs,
                                  time.time() - ttl) or {}
        metrics.EMBEDDING_CACHE.labels("hit").inc(len(found))
        return {ref: Embedded(torch.from_numpy(vector), key)
                for ref, (key, vector) in found.items()}

    async def _embed(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None,
                     priority: int = FOREGROUND) -> Embedded:
        """Fetch the image; reuse its cached embedding (same bytes, same model) or encode it
        (`BACKGROUND` work waits behind Label Studio's requests for decode slots and encoder)."""
        encoder = self.encoder
        assert encoder is not None
        fetched = await self.fetcher.fetch(ref, task_id=task_id, ls=ls)
        key = embedding_key(self.embedding_model, fetched.data)
        cached = await self._cache(self._stored_embedding, key, ref)
        if cached is not None:
            metrics.EMBEDDING_CACHE.labels("hit").inc()
            return Embedded(torch.from_numpy(cached), key)
        metrics.EMBEDDING_CACHE.labels("miss").inc()
        loop = asyncio.get_running_loop()
        async with self._decoded_background if priority == BACKGROUND else self._decoded:
            pixels = await loop.run_in_executor(self.decode_pool, self._pixels, encoder, fetched)
            row = await self.worker.encode(encoder.encode_images, pixels, priority)
        metrics.IMAGES_ENCODED.inc()
        await self._cache(self.store.put_embedding, key, row.numpy(), ref)
        return Embedded(row, key)

    def _stored_embedding(self, key: str, ref: str) -> Vector | None:
        """The stored embedding of these bytes; if found, `ref` was just seen to hold them."""
        vector = self.store.get_embedding(key)
        if vector is not None and not ref.lstrip().startswith("data:"):
            self.store.put_image_ref(key, ref)
        return vector

    async def _cache(self, call: Any, *args: Any) -> Any:
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

    def _predict_task(self, task: Task, embeddings: dict[str, Any], ctx: ProjectContext,
                      unsure: dict[str, dict[str, float]]) -> dict[str, Any]:
        """The task's prediction; fills `unsure` with each control's uncertainty measures."""
        task_id = _task_id(task)
        outcomes: list[ControlOutcome] = []
        failed: dict[str, list[str]] = {}  # reason → controls it broke
        for space, head in zip(ctx.parsed.spaces, ctx.heads):
            ref = _image_ref(task, space)
            found = embeddings.get(ref) if isinstance(ref, str) else ref
            if not isinstance(found, Embedded):
                failed.setdefault(_reason(task_id, found), []).append(space.name)
                continue
            adapter = ctx.active.adapter_for(space)
            vector = found.vector.unsqueeze(0)
            if adapter is None:
                probs, thresholds = probabilities(head, vector)[0], None
            else:
                z0 = label_logits(head, vector.float()).double().numpy()
                probs = adapter.probabilities(z0, vector.double().numpy(), head.scoring)[0]
                thresholds = adapter.thresholds
            rid = region_id(task_id, space.name, ctx.model_version)
            unsure[space.name] = {name: round(float(values[0]), 6) for name, values in measures(
                probs[None, :], space.multiple, thresholds).items()}
            outcomes.append(decide(space, probs, head.scoring, self.settings.TOP_K, rid,
                                   thresholds))
        reasons = [f"task {task_id}: {why} (controls: {', '.join(names)})"
                   for why, names in failed.items()]
        for line in reasons:
            log.warning("%s", line)
        if not outcomes:
            metrics.TASKS.labels("failed").inc()
            return empty_prediction(ctx.model_version, "; ".join(reasons))
        metrics.TASKS.labels("partial" if reasons else "ok").inc()
        return task_prediction(outcomes, ctx.model_version)

    async def _head(self, space: LabelSpace, encoder: Encoder) -> Head:
        # a digest: a fingerprint holds every label and prompt, megabytes for a large set
        key = hashlib.sha256(f"{space.fingerprint()}\x00{self.settings.TEMPLATES}".encode(
            "utf-8", "surrogatepass")).hexdigest()
        if key in self._heads:
            self._heads.move_to_end(key)
            return self._heads[key]
        if key not in self._building:  # concurrent requests for a new config share one build
            self._building[key] = asyncio.ensure_future(self._build_head(space, encoder))
        try:
            head = await asyncio.shield(self._building[key])
        finally:
            self._building.pop(key, None)
        self._heads[key] = head
        while len(self._heads) > HEAD_CACHE_SIZE:
            self._heads.popitem(last=False)
        return head

    async def _build_head(self, space: LabelSpace, encoder: Encoder) -> Head:
        """Encode the missing prompts on the inference thread, PROMPTS_PER_CALL per call (each
        call queues behind the image work that arrived meanwhile), then ensemble each group."""
        plan = await asyncio.to_thread(plan_prompts, space, self.settings.TEMPLATES)
        absent = self.texts.missing(plan.texts)
        for start in range(0, len(absent), PROMPTS_PER_CALL):
            await self.worker.call(self.texts.add, absent[start:start + PROMPTS_PER_CALL],
                                   encoder.encode_texts)
        return await self.worker.call(self._assemble_head, space, plan, encoder)

    def _assemble_head(self, space: LabelSpace, plan: PromptPlan, encoder: Encoder) -> Head:
        """Runs on the inference thread: ensembles each group of the plan's prompt rows."""
        rows = self.texts.lookup(plan.texts, encoder.encode_texts)
        groups = torch.stack([ensemble(torch.stack([rows[text] for text in group]))
                              for group in plan.groups])
        return build_head(groups, plan.group_label, space, encoder.family,
                          encoder.logit_scale, encoder.logit_bias)

    async def _record_predictions(self, tasks: Sequence[Task], results: list[dict[str, Any]],
                                  embeddings: dict[str, Any], ctx: ProjectContext,
                                  unsure: list[dict[str, dict[str, float]]]) -> None:
        """Log what was proposed per task and control, for the corrections that follow."""
        if ctx.project is None:
            return
        entries = []
        for task, result, measured in zip(tasks, results, unsure):
            if "result" not in result:
                continue
            images: dict[str, dict[str, Any]] = {}
            for space in ctx.parsed.spaces:
                ref = _image_ref(task, space)
                found = embeddings.get(ref) if isinstance(ref, str) else None
                if isinstance(ref, str) and isinstance(found, Embedded):
                    images[space.name] = {"image_ref": ref, "embedding_key": found.key,
                                          "uncertainty": measured.get(space.name)}
            entries.append(prediction_entry(ctx.project, _task_id(task), result, images))
        await asyncio.to_thread(self.journal.write, entries)

    # --- what humans should look at next -------------------------------------------------------
    async def review_export(self, kind: str, project: str, *, label_config: str | None = None,
                            control: str | None = None, **params: Any
                            ) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        """Selection (`kind="selection"`) or review-queue rows for a project's control, their
        header (strategy, parameters, model_version) and the image field's name."""
        config = label_config or self._configs.get(project)
        if not config:
            raise ReviewError(f"no label config known for project {project}: Label Studio sends "
                              "it with /setup and /predict (connect the backend first), or pass "
                              "one (--label-config)")
        ctx = await self.context(config, project)
        found = [(s, h) for s, h in zip(ctx.parsed.spaces, ctx.heads)
                 if control in (None, s.name)]
        if not found:
            names = ", ".join(s.name for s in ctx.parsed.spaces)
            raise ReviewError(f"no control {control!r} in the label config; it has: {names}")
        space, head = found[0]
        adapter = ctx.active.adapter_for(space)

        def compute() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            view = project_view(self.store, project, space, self.embedding_model)
            probs = head_probabilities(view, head, adapter)
            if kind == "selection":
                return selection(view, probs, **params)
            return review(view, probs, head, **params)

        rows, header = await asyncio.to_thread(compute)
        header.update(project=project, model_version=ctx.model_version)
        return rows, header, space.data_key

    # --- fit ---------------------------------------------------------------------------------
    def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Receive a Label Studio event: annotation events go to the corrections log, durably
        (in the store, or spooled) before this returns. Call it off the event loop."""
        metrics.WEBHOOKS.labels(metrics.webhook_action(event)).inc()
        entries = entries_from_webhook(data)
        self._check_sizes(entries)
        self.journal.write(entries)
        corrections = sum(entry.kind == "annotation" for entry in entries)
        metrics.CORRECTIONS.inc(corrections)
        project = project_key(data.get("project"))
        log.info("event %s for project %s: %d log entries", event, project, len(entries))
        answer: dict[str, Any] = {"status": "ok", "event": event, "recorded": len(entries)}
        if self._loop is None:
            return answer
        if entries:
            asyncio.run_coroutine_threadsafe(self.embed_corrected_images(entries), self._loop)
        if self.settings.ADAPT and project is not None:
            config = _label_config(data)
            if event == "START_TRAINING":
                answer["job"] = self._call_on_loop(self.train, project, config, event)
            elif corrections:
                self._loop.call_soon_threadsafe(self._count_corrections, project, corrections,
                                                config)
        return answer

    def _check_sizes(self, entries: Sequence[Entry]) -> None:
        """Refuse the whole event (before any of it is written) if one entry is over
        MAX_CORRECTION_BYTES: the log keeps each entry whole, in the store and the spool."""
        limit = self.settings.MAX_CORRECTION_BYTES
        for entry in entries:
            size = len(entry.to_json().encode("utf-8", "surrogatepass"))
            if size > limit:
                raise LimitExceeded(
                    f"{entry.kind} {entry.data.get('annotation', entry.key)} of project "
                    f"{entry.project} is {size} bytes as a log entry, over MAX_CORRECTION_BYTES="
                    f"{limit}; nothing of this event was recorded. Raise MAX_CORRECTION_BYTES "
                    "(results of other controls, e.g. brush masks, count too)")

    def _call_on_loop(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self._loop).result(5)

    def _count_corrections(self, project: str, count: int, label_config: str | None) -> None:
        """Queue a fit every ADAPT_EVERY corrections, after their images are embedded."""
        config = label_config or self._configs.get(project)
        self.trainer.corrections_logged(project, count, config)

    def train(self, project: str, label_config: str | None, trigger: str) -> str:
        """Queue a fit of the project's head (runs in the background). Call on the loop."""
        config = label_config or self._configs.get(project)
        if not config:
            return ("not started: no label config known for this project yet (send /setup or "
                    "/predict first)")
        return f"{self.trainer.request(project, config, trigger)}: project {project}"

    async def embed_corrected_images(self, entries: Sequence[Entry]) -> None:
        """Embed the images of corrected tasks the backend never predicted (background)."""
        for entry in entries:
            if entry.kind != "annotation" or self.status.state != "ready":
                continue
            for ref in entry.data["images"].values():
                known = await self._cache(self.store.embedding_key_for, self.embedding_model, ref)
                if known is None and self._lazy_waiting < LAZY_EMBEDDINGS_QUEUED:
                    self._lazy_waiting += 1
                    try:
                        async with self._lazy:
                            await self._embed_quietly(ref, entry)
                    finally:
                        self._lazy_waiting -= 1

    async def _embed_quietly(self, ref: str, entry: Entry) -> None:
        task_id = int(entry.data["task"]) if entry.data["task"].isdigit() else None
        try:
            await self._embed(ref, task_id, self.label_studio(entry.project))
        except BackendError as exc:
            log.warning("task %s: could not embed the corrected image: %s", task_id, exc)


def _label_config(event: dict[str, Any]) -> str | None:
    project = event.get("project")
    config = project.get("label_config") if isinstance(project, dict) else None
    return config if isinstance(config, str) and config else None


async def _as_coroutine(fn: Any, *args: Any) -> Any:
    return fn(*args)


def _task_id(task: Task) -> int | None:
    value = task.get("id") if isinstance(task, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _distinct_refs(tasks: Sequence[Task], spaces: Sequence[LabelSpace]) -> dict[str, int | None]:
    """Each image reference the tasks use, with the id of the first task using it."""
    refs: dict[str, int | None] = {}
    for task in tasks:
        for space in spaces:
            ref = _image_ref(task, space)
            if isinstance(ref, str) and ref not in refs:
                refs[ref] = _task_id(task)
    return refs


def _image_ref(task: Task, space: LabelSpace) -> str | TaskError:
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


def _reason(task_id: int | None, error: Any) -> str:
    if not isinstance(error, BaseException):
        error = TaskError("no embedding was computed")
    kind = type(error).__name__
    metrics.TASK_FAILURES.labels(kind).inc()
    if not isinstance(error, BackendError):
        log.error("task %s: unexpected %s", task_id, kind, exc_info=error)
    return f"{kind}: {error}"
