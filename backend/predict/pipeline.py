"""The predict path, phase by phase (each a plain function, runnable without the web app):

    context  label config + project → parsed spaces, heads, model_version   (context.py)
    embed    tasks → distinct image refs → embeddings, batched               (embed.py)
    score    embedding × head (zero-shot, or the project's adapted head) → probabilities
    format   probabilities → Label Studio prediction JSON                    (predictions.py)
    record   what was proposed, per task and control → the corrections journal
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..adapt.adapter import score
from ..config import Settings
from ..corrections.entries import prediction_entry
from ..corrections.journal import Journal
from ..errors import BackendError, Overloaded, TaskError
from ..labelstudio.client import ProjectId
from ..labelstudio.label_config import LabelSpace, Scoring
from ..labelstudio.version_sync import VersionSync
from ..zeroshot.inference import BACKGROUND, FOREGROUND
from ..zeroshot.scoring import Probs
from ..zeroshot.uncertainty import measures
from .context import Contexts, ProjectContext
from .embed import Embedded, Embedder, Embeddings, Task, image_ref, task_id
from .predictions import ControlOutcome, decide, empty_prediction, region_id, task_prediction

log = logging.getLogger(__name__)

Uncertainty = dict[str, dict[str, float]]
"""Control name → its uncertainty measures (margin, entropy, …) for one task."""


@dataclass(frozen=True)
class ControlScores:
    space: LabelSpace
    scoring: Scoring
    probs: Probs
    thresholds: Probs | None
    uncertainty: dict[str, float]


@dataclass
class TaskScores:
    """One task's scores per control, and the controls that could not be scored, by reason."""

    task_id: int | None
    controls: list[ControlScores] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def uncertainty(self) -> Uncertainty:
        return {control.space.name: control.uncertainty for control in self.controls}


class Admission:
    """Shed a request up front, rather than queue work that will not finish in time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending_tasks = 0

    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        if self.pending_tasks and self.pending_tasks + count > self.limit:
            raise Overloaded(f"{self.pending_tasks} tasks are being predicted already "
                             f"(MAX_PENDING_TASKS={self.limit}); retry in a few seconds")
        self.pending_tasks += count
        try:
            yield
        finally:
            self.pending_tasks -= count


class Pipeline:
    """Runs the phases for one request; holds only what they share."""

    def __init__(self, settings: Settings, contexts: Contexts, embedder: Embedder,
                 journal: Journal, version_sync: VersionSync) -> None:
        self.settings = settings
        self.contexts = contexts
        self.embedder = embedder
        self.journal = journal
        self.version_sync = version_sync
        self.admission = Admission(settings.MAX_PENDING_TASKS)

    async def predict(self, tasks: Sequence[Task], *, label_config: str,
                      project: ProjectId | None = None, head: str | None = None,
                      background: bool = False) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order. A failing task gets an empty one.
        `background` work (pre-label jobs) waits for Label Studio's requests at every step."""
        priority = BACKGROUND if background else FOREGROUND
        with self.admission.admitted(len(tasks)):
            ctx = await self.contexts.build(label_config, project, head)
            embeddings = await self.embedder.embed_tasks(tasks, ctx.parsed.spaces, ctx.ls,
                                                         priority)
            scores = [score_task(task, embeddings, ctx) for task in tasks]
            results = [format_task(s, ctx.model_version, self.settings.TOP_K) for s in scores]
            await record(self.journal, tasks, results, embeddings, ctx,
                         [s.uncertainty for s in scores])
        if self.settings.SYNC_MODEL_VERSION and any("result" in r for r in results):
            self.version_sync.after_predict(ctx.project, ctx.model_version, ctx.ls)
        return results


# --- score ---------------------------------------------------------------------------------------
def score_task(task: Task, embeddings: Embeddings, ctx: ProjectContext) -> TaskScores:
    """Probabilities and uncertainty per control of one task (or why a control has none)."""
    scores = TaskScores(task_id(task))
    for space, head in zip(ctx.parsed.spaces, ctx.heads):
        ref = image_ref(task, space)
        found = embeddings.get(ref) if isinstance(ref, str) else ref
        if not isinstance(found, Embedded):
            scores.failed.setdefault(_reason(scores.task_id, found), []).append(space.name)
            continue
        # one row at a time: a batched float32 product could differ in the last bits
        scored = score(head, found.vector.unsqueeze(0).float().numpy(),
                       ctx.active.adapter_for(space))
        probs, thresholds = scored.probs[0], scored.thresholds
        uncertainty = {name: round(float(values[0]), 6) for name, values in measures(
            probs[None, :], space.multiple, thresholds).items()}
        scores.controls.append(ControlScores(space, head.scoring, probs, thresholds,
                                             uncertainty))
    return scores


def _reason(task: int | None, error: Any) -> str:
    if not isinstance(error, BaseException):
        error = TaskError("no embedding was computed")
    kind = type(error).__name__
    metrics.TASK_FAILURES.labels(kind).inc()
    if not isinstance(error, BackendError):
        log.error("task %s: unexpected %s", task, kind, exc_info=error)
    return f"{kind}: {error}"


# --- format --------------------------------------------------------------------------------------
def format_task(scores: TaskScores, model_version: str, top_k: int) -> dict[str, Any]:
    """The task's Label Studio prediction; an empty one, with the reasons, if no control
    could be scored."""
    outcomes: list[ControlOutcome] = [
        decide(c.space, c.probs, c.scoring, top_k,
               region_id(scores.task_id, c.space.name, model_version), c.thresholds)
        for c in scores.controls]
    reasons = [f"task {scores.task_id}: {why} (controls: {', '.join(names)})"
               for why, names in scores.failed.items()]
    for line in reasons:
        log.warning("%s", line)
    if not outcomes:
        metrics.TASKS.labels("failed").inc()
        return empty_prediction(model_version, "; ".join(reasons))
    metrics.TASKS.labels("partial" if reasons else "ok").inc()
    return task_prediction(outcomes, model_version)


# --- record --------------------------------------------------------------------------------------
async def record(journal: Journal, tasks: Sequence[Task], results: list[dict[str, Any]],
                 embeddings: Embeddings, ctx: ProjectContext,
                 uncertainty: list[Uncertainty]) -> None:
    """Log what was proposed per task and control, for the corrections that follow."""
    if ctx.project is None:
        return
    entries = []
    for task, result, measured in zip(tasks, results, uncertainty):
        if "result" not in result:
            continue
        images: dict[str, dict[str, Any]] = {}
        for space in ctx.parsed.spaces:
            ref = image_ref(task, space)
            found = embeddings.get(ref) if isinstance(ref, str) else None
            if isinstance(ref, str) and isinstance(found, Embedded):
                images[space.name] = {"image_ref": ref, "embedding_key": found.key,
                                      "uncertainty": measured.get(space.name)}
        entries.append(prediction_entry(ctx.project, task_id(task), result, images))
    await asyncio.to_thread(journal.write, entries)
