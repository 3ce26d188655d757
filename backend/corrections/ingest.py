"""Webhook ingest: a Label Studio event → log entries, durable before the webhook answers →
counted towards the next fit, and corrected images embedded in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from .. import metrics
from ..config import Settings
from ..errors import LimitExceeded
from ..labelstudio.client import ProjectId, project_key
from ..labelstudio.projects import ProjectMemory
from ..store.entry import Entry
from .entries import entries_from_webhook
from .journal import Journal

log = logging.getLogger(__name__)


class Training(Protocol):
    """What ingest asks of the trainer (adapt.trainer.Trainer)."""

    def corrections_logged(self, project: str, count: int, label_config: str | None) -> None: ...

    def request(self, project: str, label_config: str, trigger: str) -> str: ...


class Ingest:
    """Receives webhooks on the event loop; only the journal write runs on a thread."""

    def __init__(self, settings: Settings, journal: Journal, projects: ProjectMemory,
                 training: Training,
                 embed_images: Callable[[Sequence[Entry]], Awaitable[None]]) -> None:
        self.settings = settings
        self.journal = journal
        self.projects = projects
        self.training = training
        self.embed_images = embed_images
        self._background: set[asyncio.Task[None]] = set()

    async def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Annotation events go to the corrections log, durably (in the store, or spooled)
        before this returns; START_TRAINING answers with the fit it queued."""
        metrics.WEBHOOKS.labels(metrics.webhook_action(event)).inc()
        entries = await asyncio.to_thread(self._record, data)
        corrections = sum(entry.kind == "annotation" for entry in entries)
        metrics.CORRECTIONS.inc(corrections)
        project = project_key(data.get("project"))
        log.info("event %s for project %s: %d log entries", event, project, len(entries))
        answer: dict[str, Any] = {"status": "ok", "event": event, "recorded": len(entries)}
        if entries:
            self._spawn(self._embed(entries))
        if self.settings.ADAPT and project is not None:
            config = self.projects.config(project, _label_config(data))
            if event == "START_TRAINING":
                answer["job"] = self.train(project, config, event)
            elif corrections:
                self.training.corrections_logged(project, corrections, config)
        return answer

    def _record(self, data: dict[str, Any]) -> list[Entry]:
        """Parse, check and write the event's entries (blocking: call it on a thread)."""
        entries = entries_from_webhook(data)
        self._check_sizes(entries)
        self.journal.write(entries)
        return entries

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

    def train(self, project: ProjectId, label_config: str | None, trigger: str) -> str:
        """Queue a fit of the project's head (it runs in the background)."""
        config = self.projects.config(project, label_config)
        if not config:
            return ("not started: no label config known for this project yet (send /setup or "
                    "/predict first)")
        return f"{self.training.request(project, config, trigger)}: project {project}"

    async def _embed(self, entries: Sequence[Entry]) -> None:
        await self.embed_images(entries)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop the background embedding still queued (it is best effort)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def _label_config(event: dict[str, Any]) -> str | None:
    project = event.get("project")
    config = project.get("label_config") if isinstance(project, dict) else None
    return config if isinstance(config, str) and config else None
