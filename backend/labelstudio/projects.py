"""What this process remembers per project: how to reach its Label Studio (the /setup trust
record) and its last label config (for Train and review exports)."""

from __future__ import annotations

import logging

from ..config import Settings
from ..lru import LRU
from .client import LabelStudioAccess, ProjectId

log = logging.getLogger(__name__)

REMEMBERED_PROJECTS = 256
"""Projects whose label config is kept (the least recently used are forgotten beyond it)."""
REMEMBERED_CONFIG_CHARS = 64 * 1024 * 1024
"""Label-config text kept for projects, in characters: the least recently used projects'
configs are forgotten beyond it (the newest is always kept)."""


class ProjectMemory:
    """Per-project Label Studio access and label configs, for this process's lifetime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._access: dict[ProjectId, LabelStudioAccess] = {}
        """Per project, the Label Studio host and token its last /setup named: used only for
        that project, and the token only ever goes to that host."""
        self.configs: LRU[ProjectId, str] = LRU(REMEMBERED_PROJECTS,
                                                max_weight=REMEMBERED_CONFIG_CHARS, weight=len)

    def remember_config(self, project: ProjectId, label_config: str) -> None:
        self.configs.put(project, label_config)

    def config(self, project: ProjectId, given: str | None = None) -> str | None:
        """`given`, else the project's last label config seen (None if none was)."""
        return given or self.configs.get(project)

    def remember_project(self, project: ProjectId | None, hostname: str | None,
                         token: str | None) -> None:
        """Keep the host and token a /setup named, as this project's trust record: its
        token is only ever sent to its own origin, and nothing in it reaches other projects."""
        if project is None or not hostname or not hostname.startswith(("http://", "https://")):
            return
        record = LabelStudioAccess(hostname, token or None)
        previous = self._access.get(project)
        self._access[project] = record
        configured = self.settings.LABEL_STUDIO_URL
        if (configured and not self.settings.LABEL_STUDIO_API_KEY and record.token
                and not record.owns(configured)
                and (previous is None or previous.url != record.url)):
            log.warning("project %s: /setup names Label Studio at %s, not LABEL_STUDIO_URL=%s, "
                        "so its token is not sent to LABEL_STUDIO_URL; set LABEL_STUDIO_API_KEY",
                        project, record.url, configured)

    def label_studio(self, project: ProjectId | None) -> LabelStudioAccess | None:
        """Settings first (they know the URL as this backend sees it), then what /setup said.
        The configured key goes only to LABEL_STUDIO_URL; a /setup token only to its own
        origin (to LABEL_STUDIO_URL, then, only when they are the same)."""
        remembered = self._access.get(project) if project is not None else None
        url, token = self.settings.LABEL_STUDIO_URL, self.settings.LABEL_STUDIO_API_KEY
        if not url:
            return remembered
        if token is None and remembered is not None and remembered.owns(url):
            token = remembered.token
        return LabelStudioAccess(url, token)
