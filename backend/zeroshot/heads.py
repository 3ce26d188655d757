"""Zero-shot heads (one per label space), built from cached prompt embeddings: `HeadCache`."""

from __future__ import annotations

import asyncio
import hashlib

import torch

from ..config import Settings
from ..labelstudio.label_config import LabelSpace, ParsedConfig, parse_label_config
from ..lru import LRU, ByIdentity
from .encoder import Encoder
from .inference import InferenceThread
from .loader import EncoderHost
from .prompts import PromptPlan, check_prompt_count, plan_prompts
from .scoring import ZeroShotHead, build_head, ensemble
from .text_embeddings import DEFAULT_MAX_PROMPTS, TextEmbeddingCache

HEAD_CACHE_SIZE = 256
HEAD_KEYS_KEPT = 256
"""Head keys remembered, one per label space object (and TEMPLATES) in use."""
PROMPTS_PER_CALL = 256
"""Prompts encoded per inference-thread call while a head is built: image batches of other
requests run between calls, so a large label set delays them by one call, not by all of it."""


def parse_config(label_config: str, settings: Settings) -> ParsedConfig:
    """The parsed config, refused (422) if it expands to more than MAX_PROMPTS_PER_CONFIG
    prompts."""
    parsed = parse_label_config(label_config)
    check_prompt_count(parsed.spaces, settings.TEMPLATES, settings.MAX_PROMPTS_PER_CONFIG)
    return parsed


class HeadCache:
    """Heads by label space and templates; concurrent requests for a new space share one build."""

    def __init__(self, settings: Settings, host: EncoderHost) -> None:
        self.settings = settings
        self.host = host
        # room for the largest config's prompts: a head never outgrows the cache
        self.texts = TextEmbeddingCache(max(DEFAULT_MAX_PROMPTS, settings.MAX_PROMPTS_PER_CONFIG))
        self._heads: LRU[str, ZeroShotHead] = LRU(HEAD_CACHE_SIZE)
        self._keys: ByIdentity[LabelSpace, str] = ByIdentity(HEAD_KEYS_KEPT)
        self._building: dict[str, asyncio.Future[ZeroShotHead]] = {}

    @property
    def inference(self) -> InferenceThread:
        return self.host.inference

    async def for_config(self, label_config: str) -> tuple[ParsedConfig, tuple[ZeroShotHead, ...]]:
        """A label config's parsed spaces and their zero-shot heads (waits for the model)."""
        parsed = await asyncio.to_thread(parse_config, label_config, self.settings)
        return parsed, await self.for_spaces(parsed)

    async def for_spaces(self, parsed: ParsedConfig) -> tuple[ZeroShotHead, ...]:
        encoder = await self.host.wait_ready()
        return tuple([await self.head(space, encoder) for space in parsed.spaces])

    async def head(self, space: LabelSpace, encoder: Encoder) -> ZeroShotHead:
        key = self.key(space)
        cached = self._heads.get(key)
        if cached is not None:
            self._heads.put(key, cached)
            return cached
        if key not in self._building:
            self._building[key] = asyncio.ensure_future(self._build(space, encoder))
        try:
            head = await asyncio.shield(self._building[key])
        finally:
            self._building.pop(key, None)
        self._heads.put(key, head)
        return head

    def key(self, space: LabelSpace) -> str:
        """The head's cache key: a digest of the space's fingerprint and TEMPLATES (a
        fingerprint holds every label and prompt, megabytes for a large set). Computed once
        per space object (parse_label_config keeps one per config text): 1,000 labels take
        0.55 ms, on the event loop, on every request otherwise."""
        templates = self.settings.TEMPLATES
        key = self._keys.get(space, templates)
        if key is None:
            key = hashlib.sha256(f"{space.fingerprint()}\x00{templates}".encode(
                "utf-8", "surrogatepass")).hexdigest()
            self._keys.put(space, templates, key)
        return key

    async def _build(self, space: LabelSpace, encoder: Encoder) -> ZeroShotHead:
        """Encode the missing prompts on the inference thread, PROMPTS_PER_CALL per call (each
        call queues behind the image work that arrived meanwhile), then ensemble each group."""
        plan = await asyncio.to_thread(plan_prompts, space, self.settings.TEMPLATES)
        absent = self.texts.missing(plan.texts)
        for start in range(0, len(absent), PROMPTS_PER_CALL):
            await self.inference.call(self.texts.add, absent[start:start + PROMPTS_PER_CALL],
                                      encoder.encode_texts)
        return await self.inference.call(self._assemble, space, plan, encoder)

    def _assemble(self, space: LabelSpace, plan: PromptPlan, encoder: Encoder) -> ZeroShotHead:
        """Runs on the inference thread: ensembles each group of the plan's prompt rows."""
        rows = self.texts.lookup(plan.texts, encoder.encode_texts)
        groups = torch.stack([ensemble(torch.stack([rows[text] for text in group]))
                              for group in plan.groups])
        return build_head(groups, plan.group_label, space, encoder.family,
                          encoder.logit_scale, encoder.logit_bias)
