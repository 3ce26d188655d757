"""The predict pipeline: context → embed → score → format → record, one phase per function."""

from .context import Contexts, ProjectContext
from .embed import Embedded, Embedder
from .pipeline import Pipeline, format_task, score_task

__all__ = ["Contexts", "Embedded", "Embedder", "Pipeline", "ProjectContext", "format_task",
           "score_task"]
