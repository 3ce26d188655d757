"""`Backend`: the composition root. Built once per process (the server, the CLI, an RQ worker),
it wires the parts and starts and stops them; the work itself is in the stage packages.

    settings → store, journal, head registry, image fetcher, inference thread, encoder host
             → heads (zeroshot), project memory (labelstudio), contexts, embedder, pipeline
               (predict), trainer (adapt), ingest (corrections), review exports (review)
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from . import metrics
from .adapt.registry import HeadRegistry
from .adapt.trainer import Run, Trainer
from .config import Settings
from .corrections import export
from .corrections.dead_letters import Letter
from .corrections.ingest import Ingest
from .corrections.journal import Journal
from .images.fetch import ImageFetcher
from .labelstudio.client import LabelStudioAccess, ProjectId, project_key
from .labelstudio.projects import ProjectMemory
from .labelstudio.version_sync import VersionSync
from .predict.context import Contexts, ProjectContext
from .predict.embed import Embedder
from .predict.pipeline import Pipeline
from .review.service import ReviewExports
from .store import Record, Store, open_store
from .store.entry import Entry
from .zeroshot.encoder import Encoder
from .zeroshot.heads import HeadCache, parse_config
from .zeroshot.inference import InferenceThread
from .zeroshot.loader import LOAD_WAIT_S, EncoderHost, ModelState, max_batch

log = logging.getLogger(__name__)

Task = dict[str, Any]


class Backend:
    """Every long-lived part of one backend process, and the few calls its callers need.

    `project` arguments take any spelling Label Studio uses ("3.1700000000", 3): they are
    parsed into a `ProjectId` here, once."""

    def __init__(self, settings: Settings, encoder: Encoder | None = None,
                 fetcher: ImageFetcher | None = None, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings)
        self.journal = Journal(self.store, settings.MODEL_DIR / "spool")
        self.fetcher = fetcher or ImageFetcher(settings)
        self.version_sync = VersionSync(self.fetcher.ls_policy)
        self.inference = InferenceThread(max_batch(settings), settings.BATCH_WAIT_MS / 1000)
        self.host = EncoderHost(settings, self.inference, encoder)
        self.registry = HeadRegistry(self.store, self.host.embedding_model)
        self.heads = HeadCache(settings, self.host)
        self.projects = ProjectMemory(settings)
        self.contexts = Contexts(settings, self.heads, self.projects, self.registry)
        self.embedder = Embedder(settings, self.host, self.fetcher, self.store, self.journal)
        self.pipeline = Pipeline(settings, self.contexts, self.embedder, self.journal,
                                 self.version_sync)
        self.trainer = Trainer(self.store, self.registry, self.heads.for_config,
                               settings.ADAPT_EVERY)
        self.ingest = Ingest(settings, self.journal, self.projects, self.trainer,
                             self._embed_corrected)
        self.reviews = ReviewExports(self.store, self.host.embedding_model, self.projects,
                                     self.contexts.build)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the journal's replay and the inference thread; load the model on it, in the
        background."""
        self.journal.start()
        self.inference.start()
        self.host.start()

    async def aclose(self) -> None:
        await self.ingest.aclose()
        await self.trainer.wait_idle()
        await asyncio.to_thread(self.trainer.close)
        await asyncio.to_thread(self.inference.stop, 30.0)
        self.embedder.close()
        await self.version_sync.aclose()
        await self.fetcher.aclose()
        await asyncio.to_thread(self.journal.stop)
        self.store.close()

    async def wait_ready(self, timeout: float = LOAD_WAIT_S) -> Encoder:
        return await self.host.wait_ready(timeout)

    @property
    def status(self) -> ModelState:
        return self.host.status

    @property
    def encoder(self) -> Encoder | None:
        return self.host.encoder

    @property
    def model_label(self) -> str:
        return self.host.model_label

    @property
    def embedding_model(self) -> str:
        return self.host.embedding_model

    # --- setup and predict -------------------------------------------------------------------
    async def setup(self, label_config: str, project: str | None = None,
                    hostname: str | None = None, access_token: str | None = None) -> str:
        """Validate the config, remember how to reach Label Studio, return the model_version."""
        parsed = await asyncio.to_thread(parse_config, label_config, self.settings)
        key = project_key(project)
        if key is not None:
            self.projects.remember_config(key, label_config)
        self.host.check_not_failed()
        self.projects.remember_project(key, hostname, access_token)
        active = await asyncio.to_thread(self.contexts.active_head, key)
        return self.contexts.model_version(parsed, active)

    async def warm_up(self, label_config: str) -> None:
        """Encode a config's prompts ahead of the first /predict (called after /setup)."""
        if self.host.ready:
            await self.contexts.build(label_config)

    async def context(self, label_config: str, project: str | None = None,
                      head: str | None = None) -> ProjectContext:
        return await self.contexts.build(label_config, project_key(project), head)

    def label_studio(self, project: str | None = None) -> LabelStudioAccess | None:
        return self.projects.label_studio(project_key(project))

    async def predict(self, tasks: Sequence[Task], context: dict[str, Any] | None = None, *,
                      label_config: str, project: str | None = None, head: str | None = None,
                      background: bool = False) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order (predict/pipeline.py); `context`
        (Label Studio's interactive context) is not used."""
        return await self.pipeline.predict(tasks, label_config=label_config,
                                           project=project_key(project), head=head,
                                           background=background)

    def issued_versions(self) -> list[str]:
        return self.contexts.issued_versions()

    # --- corrections, heads, review ----------------------------------------------------------
    async def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return await self.ingest.fit(event, data)

    async def _embed_corrected(self, entries: Sequence[Entry]) -> None:
        await self.embedder.embed_corrected(entries, self.projects.label_studio)

    def heads_listing(self, project: ProjectId) -> list[Record]:
        return self.registry.listing(project)

    def active_head_id(self, project: ProjectId) -> str | None:
        return self.store.active_head(project)

    def activate_head(self, project: ProjectId, head: str) -> None:
        self.registry.activate(project, head)

    def last_run(self, project: ProjectId) -> Run | None:
        return self.trainer.runs.get(project)

    def fitting(self, project: ProjectId) -> bool:
        return self.trainer.busy(project)

    async def review_export(self, kind: str, project: ProjectId, *,
                            label_config: str | None = None, control: str | None = None,
                            **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        return await self.reviews.export(kind, project, label_config=label_config,
                                         control=control, **params)

    # --- corrections exports, gauges ---------------------------------------------------------
    def correction_rows(self, **filters: Any) -> Iterator[export.Row]:
        return export.correction_rows(self.store, **filters)

    def corrections_parquet(self, filters: dict[str, Any], embeddings: bool) -> bytes:
        buffer = io.BytesIO()
        export.export_corrections(self.store, buffer, "parquet", embeddings=embeddings,
                                  model_label=self.embedding_model, **filters)
        return buffer.getvalue()

    def dead_letters(self) -> list[Letter]:
        return self.journal.dead_letters.read()

    @property
    def spooled(self) -> int:
        """Corrections in the local spool, waiting for the store."""
        return self.journal.pending

    def update_gauges(self) -> None:
        metrics.INFERENCE_QUEUE.set(self.inference.pending)
        metrics.SPOOL_REPLAY_ALIVE.set(self.journal.alive)
