"""The prompt-embedding cache: bounded, and never the cause of a failed head."""

from __future__ import annotations

import asyncio

import torch

from backend.runtime import Backend
from backend.zeroshot.text_embeddings import TextEmbeddingCache

CONFIG = ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
          '<Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>')


def encode(texts):
    return torch.stack([torch.full((4,), float(len(text))) for text in texts])


def test_lookup_returns_every_row_even_when_the_cache_is_smaller_than_the_request():
    cache = TextEmbeddingCache(max_prompts=3)
    texts = [f"prompt {'x' * i}" for i in range(6)]
    cache.fill(texts[:2], encode)
    rows = cache.lookup(texts, encode)
    assert sorted(rows) == sorted(texts) and len(cache) == 3
    assert rows[texts[5]][0].item() == len(texts[5])


def test_a_head_larger_than_the_text_cache_is_built_not_a_key_error(tiny_settings):
    """800,000 prompts once overflowed the 500,000-prompt cache; here, 21 overflow 5."""
    async def run():
        model = Backend(tiny_settings)
        model.start()
        try:
            model.heads.texts.max_prompts = 5
            context = await model.context(CONFIG)  # 3 labels x 7 templates
            return context.heads[0]
        finally:
            await model.aclose()

    head = asyncio.run(run())
    assert head is not None


def test_the_text_cache_holds_at_least_the_largest_config_allowed(tiny_settings):
    settings = tiny_settings.model_copy(update={"MAX_PROMPTS_PER_CONFIG": 900_000})
    assert Backend(settings).heads.texts.max_prompts >= 900_000


def test_label_configs_remembered_for_projects_are_bounded_in_total_size(tiny_settings,
                                                                         monkeypatch):
    """256 projects' configs of up to 64 MiB each were kept: about 16 GiB at worst."""
    from backend.labelstudio import projects

    monkeypatch.setattr(projects, "REMEMBERED_CONFIG_CHARS", 30_000, raising=False)
    model = Backend(tiny_settings)
    for project in ("1", "2", "3", "4"):
        model.projects.remember_config(project, CONFIG + " " * 10_001)
    assert list(model.projects.configs) == ["3", "4"]  # the oldest forgotten, not all 256 kept
    model.projects.remember_config("5", CONFIG + " " * 60_000)
    assert list(model.projects.configs) == ["5"]  # the newest is always kept
