"""The export routes: the corrections dataset (JSONL, CSV streamed with a trailer; Parquet
whole), its summary, dead letters, and the selection and review queues."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Query, Response
from fastapi.responses import StreamingResponse

from ..corrections import export
from ..corrections.summary import summary
from ..errors import ExportError
from ..formats import EXTENSIONS, MEDIA_TYPES, jsonl_chunks, streamed
from ..labelstudio.client import project_key
from ..review.queues import write
from ..runtime import Backend
from .schemas import project_id


def add_export_routes(app: FastAPI, backend: Backend) -> None:
    """The corrections dataset and its summary, read from the store off the event loop."""

    @app.get("/export/corrections")
    async def export_rows(fmt: str = Query("jsonl", alias="format"), project: str | None = None,
                          since: str | None = None, only_changed: bool = False,
                          include_deleted: bool = False, embeddings: bool = False,
                          trailer: bool = True) -> Response:
        """JSONL and CSV are streamed and end with a trailer record (`trailer=false`: none on
        success); Parquet is built whole, so it is complete or an error status."""
        export.check_format(fmt)
        export.parse_since(since)  # a bad value is a 422 now, not a broken stream later
        headers = {"Content-Disposition": f'attachment; filename="{_filename(project, fmt)}"'}
        filters: dict[str, Any] = {"project": project, "since": since,
                                   "only_changed": only_changed,
                                   "include_deleted": include_deleted}
        if fmt == "parquet":
            body = await asyncio.to_thread(backend.corrections_parquet, filters, embeddings)
            return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)
        if embeddings:
            raise ExportError("embeddings=true is supported only with format=parquet "
                                     "over HTTP (JSONL and CSV carry them in a separate .npy: "
                                     "use the CLI)")
        rows = await asyncio.to_thread(_started, backend.correction_rows(**filters))
        return StreamingResponse(streamed(rows, fmt, export.COLUMNS, trailer),
                                 media_type=MEDIA_TYPES[fmt], headers=headers)

    @app.get("/export/selection")
    async def export_selection(
            project: str, strategy: str = "uncertainty", budget: int = Query(50, ge=1, le=100_000),
            seed: int = 0, uncertainty: str = "margin",
            random_fraction: float = Query(0.1, ge=0.0, le=1.0), control: str | None = None,
            fmt: str = Query("jsonl", alias="format")) -> Response:
        """Tasks to label next: strategy uncertainty | coreset | uncertain_diverse |
        cold_start | random; format jsonl | csv | labelstudio (tasks to import)."""
        rows, header, data_key = await backend.review_export(
            "selection", project_id(project), control=control, strategy=strategy,
            budget=budget, seed=seed, uncertainty=uncertainty, random_fraction=random_fraction)
        return _review_response(rows, header, fmt, "selection", data_key, project)

    @app.get("/export/review")
    async def export_review(project: str, target_precision: float = Query(0.95, gt=0.0, le=1.0),
                            control: str | None = None,
                            fmt: str = Query("jsonl", alias="format")) -> Response:
        """Tasks a human should check: likely label errors, model–annotator disagreements,
        and predictions below the confidence that reaches `target_precision`."""
        rows, header, data_key = await backend.review_export(
            "review", project_id(project), control=control, target_precision=target_precision)
        return _review_response(rows, header, fmt, "review", data_key, project)

    @app.get("/export/dead-letters")
    async def export_dead_letters() -> Response:
        """Log entries the store could never apply, each with why (JSONL): fix their `entry`
        and apply them with `python -m backend replay dead-letters --input FILE`."""
        letters = await asyncio.to_thread(backend.dead_letters)
        return Response(b"".join(jsonl_chunks(letters)),
                        media_type=MEDIA_TYPES["jsonl"], headers={
                            "Content-Disposition": 'attachment; filename="dead-letters.jsonl"'})

    @app.get("/export/summary")
    async def export_summary(project: str | None = None,
                             since: str | None = None) -> dict[str, Any]:
        export.parse_since(since)
        rows = backend.correction_rows(project=project, since=since)
        return await asyncio.to_thread(summary, rows)


def _review_response(rows: list[dict[str, Any]], header: dict[str, Any], fmt: str, kind: str,
                     data_key: str, project: str) -> Response:
    body = b"".join(write(rows, header, fmt, kind, data_key))
    suffix = EXTENSIONS[fmt]
    name = f"{kind}-project-{project}.{suffix}" if project.isdigit() else f"{kind}.{suffix}"
    return Response(body, media_type=MEDIA_TYPES[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _started(rows: Iterator[export.Row]) -> Iterator[export.Row]:
    """Read the first row now, so a store that is down is a 503, not a truncated download."""
    first = list(itertools.islice(rows, 1))
    return itertools.chain(first, rows)


def _filename(project: str | None, fmt: str) -> str:
    key = project_key(project)
    suffix = f"-project-{key}" if key and key.isascii() and key.isdigit() else ""
    return f"corrections{suffix}.{fmt}"
