"""Selection and review exports for a project's control, under the head it serves now."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..adapt.adapter import score
from ..errors import ReviewError
from ..labelstudio.client import ProjectId
from ..labelstudio.projects import ProjectMemory
from ..predict.context import ProjectContext
from ..store import Store
from .queues import project_view, review, selection

Rows = list[dict[str, Any]]
ContextFor = Callable[[str, ProjectId], Awaitable[ProjectContext]]
"""(label config, project) → the project's context (heads, active head, model_version)."""


class ReviewExports:
    """Builds selection (`kind="selection"`) and review-queue rows from stored predictions."""

    def __init__(self, store: Store, embedding_model: str, projects: ProjectMemory,
                 context: ContextFor) -> None:
        self.store = store
        self.embedding_model = embedding_model
        self.projects = projects
        self.context = context

    async def export(self, kind: str, project: ProjectId, *, label_config: str | None = None,
                     control: str | None = None, **params: Any
                     ) -> tuple[Rows, dict[str, Any], str]:
        """The rows, their header (strategy, parameters, model_version) and the image field's
        name."""
        config = self.projects.config(project, label_config)
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

        def compute() -> tuple[Rows, dict[str, Any]]:
            view = project_view(self.store, project, space, self.embedding_model)
            probs = score(head, view.vectors, adapter).probs
            if kind == "selection":
                return selection(view, probs, **params)
            return review(view, probs, head, **params)

        rows, header = await asyncio.to_thread(compute)
        header.update(project=project, model_version=ctx.model_version)
        return rows, header, space.data_key
