"""What a human should look at next: tasks to label and review queues, as JSONL, CSV or LS tasks."""

from .queues import FORMATS, ProjectView, project_view, review, selection, write
from .selection import STRATEGIES, Pick, select

__all__ = ["FORMATS", "STRATEGIES", "Pick", "ProjectView", "project_view", "review", "select",
           "selection", "write"]
