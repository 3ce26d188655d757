"""When and on what heads are refitted: corrections in the store → examples → a published head.

Runs in the background, never inside a request: Label Studio's Train button (START_TRAINING)
and every ADAPT_EVERY new corrections of a project queue a run; a project has at most one run
in flight and one queued behind it. The fitting itself (fit.py) runs on a thread of its own, on
the examples examples.py collects from cached image embeddings: no image is fetched or encoded
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..corrections.records import updated_ts
from ..errors import BackendError
from ..labelstudio.label_config import LabelSpace, ParsedConfig
from ..store import Record, Store
from ..zeroshot.scoring import ZeroShotHead
from .examples import collect_examples
from .fit import MIN_EXAMPLES, Examples, Fit, adapt, learning_curve
from .registry import HeadId, HeadRegistry, adapter_document, space_digest

log = logging.getLogger(__name__)

EVIDENCE = ("accepted", "reason", "examples", "skipped", "before", "zero_shot", "after",
            "candidate", "compared_with_current", "seconds")
HeadsFor = Callable[[str], Awaitable[tuple[ParsedConfig, tuple[ZeroShotHead, ...]]]]
"""label config → its parsed spaces and zero-shot heads, built on the inference thread (the
runtime passes `zeroshot.heads.HeadCache.for_config`: a lower layer, never the predict path)."""


@dataclass
class Run:
    project: str
    trigger: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    head: HeadId | None = None  # the head published (the field name is in GET /heads)
    outcome: str = "running"
    evidence: dict[str, Any] | None = None  # per control: decision and held-out numbers


# --- one run -----------------------------------------------------------------------------------
def fit_project(store: Store, registry: HeadRegistry, project: str, parsed: ParsedConfig,
                heads: tuple[ZeroShotHead, ...], trigger: str) -> tuple[HeadId | None, Record]:
    """Fit every control of a project; publish a head if any control gained something."""
    started = time.perf_counter()
    records = list(store.corrections(project))  # read once; later ones are unseen by this fit
    current = registry.active(project)
    controls: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for space, head in zip(parsed.spaces, heads):
        examples, skipped = collect_examples(store, records, space, registry.model)
        count = len(examples) if examples is not None else 0
        if examples is None or count < MIN_EXAMPLES:
            notes[space.name] = {"examples": count, "skipped": skipped,
                                 "outcome": f"fewer than {MIN_EXAMPLES} usable corrections"}
            continue
        fit = adapt(head, examples, space.multiple, current.adapter_for(space),
                    current.fitted_until)
        controls[space.name] = _control_record(space, head, examples, fit, skipped)
    record: Record = {
        "project": project, "model": registry.model, "trigger": trigger,
        "created_at": time.time(), "seconds": round(time.perf_counter() - started, 3),
        "controls": controls, "not_fitted": notes,
        "fitted_until": max(map(updated_ts, records), default=0.0),
    }
    if not any(control["accepted"] for control in controls.values()):
        return None, record
    _carry_over(store, project, current.id, parsed, controls)
    return registry.publish(project, record), record


def _carry_over(store: Store, project: str, head_id: HeadId | None, parsed: ParsedConfig,
                controls: dict[str, Any]) -> None:
    """Controls not refitted this time keep what the current head serves for them."""
    previous = (next((r for r in store.heads(project) if r["id"] == head_id), None)
                if head_id else None)
    for space in parsed.spaces:
        kept = (previous or {}).get("controls", {}).get(space.name)
        if space.name not in controls and kept and kept["space"] == space_digest(space):
            controls[space.name] = {**kept, "accepted": False, "carried_over_from": head_id}


def _control_record(space: LabelSpace, head: ZeroShotHead, examples: Examples, fit: Fit,
                    skipped: dict[str, int]) -> Record:
    names = [label.path[-1] if space.kind != "taxonomy" else "/".join(label.path)
             for label in space.labels]
    per_label = [{**row, "label": names[row["label"]]} for row in fit.per_label]
    curve = learning_curve(head, examples) if not space.multiple else []
    return {
        "space": space_digest(space), "labels": names, "adapter": adapter_document(fit.adapter),
        "accepted": fit.accepted, "reason": fit.reason, "examples": fit.examples,
        "skipped": skipped, "before": fit.before, "zero_shot": fit.zero_shot,
        "after": fit.after, "candidate": fit.candidate, "per_label": per_label,
        "reliability": fit.reliability, "learning_curve": curve, "seconds": fit.seconds,
        "compared_with_current": fit.compared_with_current,
    }


# --- scheduling --------------------------------------------------------------------------------
class Trainer:
    """Queues and runs fits in the background, one at a time per project."""

    def __init__(self, store: Store, registry: HeadRegistry, heads_for: HeadsFor,
                 every: int) -> None:
        self.store = store
        self.registry = registry
        self.heads_for = heads_for
        self.every = every
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="adapt")
        self.runs: dict[str, Run] = {}
        self._queued: dict[str, tuple[str, str]] = {}  # project → (label config, trigger)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._since_fit: dict[str, int] = {}

    def corrections_logged(self, project: str, count: int, label_config: str | None) -> None:
        """Count new corrections; queue a run every `every` of them."""
        if not self.every or not count:
            return
        self._since_fit[project] = self._since_fit.get(project, 0) + count
        if self._since_fit[project] >= self.every and label_config:
            self.request(project, label_config, "auto")

    def request(self, project: str, label_config: str, trigger: str) -> str:
        """Queue a run (coalesced with one already queued); returns the run's state."""
        self._queued[project] = (label_config, trigger)
        if project not in self._running:
            self._running[project] = asyncio.ensure_future(self._drain(project))
            return "started"
        return "queued"

    def busy(self, project: str) -> bool:
        """Whether a fit of the project is running or queued."""
        return project in self._running

    async def wait_idle(self, project: str | None = None) -> None:
        """Wait for the runs in flight (tests and shutdown)."""
        while tasks := [t for p, t in self._running.items() if project in (None, p)]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, project: str) -> None:
        try:
            while project in self._queued:
                label_config, trigger = self._queued.pop(project)
                self._since_fit[project] = 0
                await self._run(project, label_config, trigger)
        finally:
            self._running.pop(project, None)

    async def _run(self, project: str, label_config: str, trigger: str) -> None:
        run = self.runs[project] = Run(project, trigger)
        try:
            parsed, heads = await self.heads_for(label_config)
            loop = asyncio.get_running_loop()
            head_id, record = await loop.run_in_executor(
                self.pool, fit_project, self.store, self.registry, project, parsed, heads, trigger)
        except Exception as exc:  # noqa: BLE001 - a failed run is logged; the next one retries
            run.outcome = f"failed: {type(exc).__name__}: {exc}"
            metrics.HEAD_FITS.labels("failed").inc()
            log.error("project %s: fitting a head failed: %s", project, exc,
                      exc_info=not isinstance(exc, BackendError))
        else:
            run.head = head_id
            run.evidence = {name: {k: control[k] for k in EVIDENCE if k in control}
                            for name, control in record["controls"].items()}
            run.evidence.update(record["not_fitted"])
            run.outcome = f"published {head_id}" if head_id else "kept the current head"
            metrics.HEAD_FITS.labels("published" if head_id else "kept").inc()
            metrics.HEAD_FIT_SECONDS.observe(record["seconds"])
            log.info("project %s: %s (%s, %.1f s)", project, run.outcome, trigger,
                     record["seconds"])
        finally:
            run.finished = time.time()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

