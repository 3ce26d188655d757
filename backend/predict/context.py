"""The context phase: what predicting for one label config and project needs (`ProjectContext`),
and the model_versions this process issues."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..adapt.registry import ZERO_SHOT_SERVED, HeadRegistry, ServedHead
from ..config import Settings
from ..errors import StoreUnavailable
from ..labelstudio.client import LabelStudioAccess, ProjectId
from ..labelstudio.label_config import ParsedConfig
from ..labelstudio.projects import ProjectMemory
from ..lru import LRU, ByIdentity
from ..zeroshot.heads import HeadCache, parse_config
from ..zeroshot.prompts import plan_prompts, prompt_set_hash
from ..zeroshot.scoring import ZeroShotHead

log = logging.getLogger(__name__)

MAX_VERSIONS_KEPT = 100
PROMPT_HASHES_KEPT = 64
"""Prompt-set hashes remembered, one per (parsed config, TEMPLATES) in use."""


@dataclass(frozen=True)
class ProjectContext:
    """What one request knows about its project: label spaces, heads, version, LS access."""

    parsed: ParsedConfig
    heads: tuple[ZeroShotHead, ...]
    model_version: str
    ls: LabelStudioAccess | None
    project: ProjectId | None = None
    active: ServedHead = ZERO_SHOT_SERVED


class Contexts:
    """Builds `ProjectContext`s: parsed config, zero-shot heads, the project's active adapted
    head and the model_version they make."""

    def __init__(self, settings: Settings, heads: HeadCache, projects: ProjectMemory,
                 registry: HeadRegistry) -> None:
        self.settings = settings
        self.heads = heads
        self.projects = projects
        self.registry = registry
        self.model_label = heads.host.model_label
        self._versions: LRU[str, None] = LRU(MAX_VERSIONS_KEPT)
        self._prompt_hashes: ByIdentity[ParsedConfig, str] = ByIdentity(PROMPT_HASHES_KEPT)

    async def build(self, label_config: str, project: ProjectId | None = None,
                    head: str | None = None) -> ProjectContext:
        """`head` pins a stored head (a pre-label job keeps the one it started with) instead
        of the active one."""
        parsed = await asyncio.to_thread(parse_config, label_config, self.settings)
        heads = await self.heads.for_spaces(parsed)
        ls = self.projects.label_studio(project)
        if project is not None:
            self.projects.remember_config(project, label_config)
        if head is None or project is None:
            active = await asyncio.to_thread(self.active_head, project)
        else:
            active = await asyncio.to_thread(self.registry.load, project, head)
        return ProjectContext(parsed, heads, self.model_version(parsed, active), ls, project,
                              active)

    def active_head(self, project: ProjectId | None) -> ServedHead:
        """The adapted head a project serves; zero-shot when it has none (or the store is
        down and this process never read it)."""
        if not self.settings.ADAPT:
            return ZERO_SHOT_SERVED
        try:
            return self.registry.active(project)
        except StoreUnavailable as exc:
            log.debug("active head unknown: %s", exc)
            return self.registry.last_known(project)

    def model_version(self, parsed: ParsedConfig, active: ServedHead = ZERO_SHOT_SERVED) -> str:
        """Backbone, weights, prompt-set hash and the project's adapted head if it has one,
        e.g. `ViT-B-16-SigLIP/webli:p1a2b3c4d` or `…:p1a2b3c4d:h3`."""
        version = f"{self.model_label}:p{self.prompt_hash(parsed)}"
        if active.id:
            version += f":{active.id}"
        self._versions.put(version, None)
        return version

    def prompt_hash(self, parsed: ParsedConfig) -> str:
        """`prompt_set_hash` of the config's prompts, planned once per parsed config (the same
        object for the same config text: parse_label_config keeps it) and TEMPLATES, not on
        every request (1,000 labels: 1.7 ms; 13 ms with the 80 'openai' templates)."""
        templates = self.settings.TEMPLATES
        known = self._prompt_hashes.get(parsed, templates)
        if known is not None:
            return known
        plans = [plan_prompts(space, templates) for space in parsed.spaces]
        digest = prompt_set_hash(plans, parsed.spaces)
        self._prompt_hashes.put(parsed, templates, digest)
        return digest

    def issued_versions(self) -> list[str]:
        """Model versions this process has issued, most recent last."""
        return list(self._versions)
