"""Label Studio: its REST client and access rules, label configs, projects, model_version sync.

Kept light: label configs (`label_config`, which loads label-studio-sdk) are imported from
their module."""

from .client import LabelStudioAccess, LabelStudioAPI, ProjectId, project_key
from .projects import ProjectMemory

__all__ = ["LabelStudioAPI", "LabelStudioAccess", "ProjectId", "ProjectMemory", "project_key"]
