"""model_version's prompt-set hash and the zero-shot head's cache key: computed once per parsed
config (or label space) and template set, the same strings as computing them every time."""

from __future__ import annotations

import hashlib

import pytest

from backend.config import Settings
from backend.labelstudio.label_config import LabelSpace, ParsedConfig, parse_label_config
from backend.predict import context
from backend.runtime import Backend
from backend.zeroshot.prompts import plan_prompts, prompt_set_hash


def config(labels: list[str], templates: str | None = None) -> str:
    attribute = f' model_templates="{templates}"' if templates else ""
    choices = "".join(f'<Choice value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/><Choices name="c" toName="image"'
            f'{attribute}>{choices}</Choices></View>')


def planned_every_time(settings: Settings, parsed: ParsedConfig) -> str:
    """What model_version was before the cache: every prompt planned again."""
    plans = [plan_prompts(space, settings.TEMPLATES) for space in parsed.spaces]
    return f"tiny-test-clip/none:p{prompt_set_hash(plans, parsed.spaces)}"


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The controls plan_prompts is called for, by model_version."""
    calls: list[str] = []

    def spy(space, default_templates):  # type: ignore[no-untyped-def]
        calls.append(space.name)
        return plan_prompts(space, default_templates)

    monkeypatch.setattr(context, "plan_prompts", spy)
    return calls


def test_model_version_plans_prompts_once_per_config(tiny_settings: Settings,
                                                     planned: list[str]) -> None:
    contexts = Backend(tiny_settings).contexts
    parsed = parse_label_config(config([f"label {i}" for i in range(50)]))
    version = contexts.model_version(parsed)
    assert version == planned_every_time(tiny_settings, parsed)
    assert planned == ["c"]
    for _ in range(5):
        assert contexts.model_version(parsed) == version
    assert planned == ["c"]  # the hash was remembered, not planned again
    other = parse_label_config(config([f"label {i}" for i in range(49)]))
    assert contexts.model_version(other) not in ("", version)
    assert contexts.model_version(other) == planned_every_time(tiny_settings, other)
    assert planned == ["c", "c"]
    assert contexts.model_version(parsed) == version and planned == ["c", "c"]


def test_another_template_set_is_another_version(tiny_settings: Settings,
                                                 planned: list[str]) -> None:
    parsed = parse_label_config(config(["cat", "dog"]))
    versions = set()
    for templates in ("simple", "openai", "photo", "a {}.|an image of a {}"):
        settings = tiny_settings.model_copy(update={"TEMPLATES": templates})
        contexts = Backend(settings).contexts
        version = contexts.model_version(parsed)
        assert version == planned_every_time(settings, parsed)
        versions.add(version)
    assert len(versions) == 4
    # the config's own model_templates (a new parsed config) is another version as well
    pinned = parse_label_config(config(["cat", "dog"], templates="photo"))
    contexts = Backend(tiny_settings).contexts
    assert contexts.model_version(pinned) not in versions
    assert contexts.model_version(pinned) == planned_every_time(tiny_settings, pinned)


def test_the_same_contexts_keys_by_templates_too(tiny_settings: Settings,
                                                 planned: list[str]) -> None:
    """TEMPLATES is part of the key: settings changed under the same Contexts miss."""
    contexts = Backend(tiny_settings).contexts
    parsed = parse_label_config(config(["cat", "dog"]))
    simple = contexts.model_version(parsed)
    contexts.settings = tiny_settings.model_copy(update={"TEMPLATES": "photo"})
    photo = contexts.model_version(parsed)
    assert photo != simple and len(planned) == 2
    assert photo == planned_every_time(contexts.settings, parsed)


def test_a_parsed_config_that_died_is_not_mistaken_for_a_new_one(tiny_settings: Settings,
                                                                 planned: list[str]) -> None:
    """An entry is checked through a weak reference: an object at a reused address misses."""
    contexts = Backend(tiny_settings).contexts
    parsed = parse_label_config(config(["cat", "dog"]))
    copies = [ParsedConfig(parsed.spaces, parsed.skipped) for _ in range(3)]
    versions = {contexts.model_version(copy) for copy in copies}
    assert len(versions) == 1 and len(planned) == 3
    del copies
    other = parse_label_config(config(["cat", "bird"]))
    fresh = [ParsedConfig(other.spaces, other.skipped) for _ in range(10)]
    for copy in fresh:  # some may sit where the dead copies were
        assert contexts.model_version(copy) == planned_every_time(tiny_settings, other)
    assert len(contexts._prompt_hashes) <= context.PROMPT_HASHES_KEPT


def test_head_key_is_the_fingerprint_digest_computed_once(tiny_settings: Settings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fingerprints: list[str] = []
    fingerprint = LabelSpace.fingerprint

    def spy(space: LabelSpace) -> str:
        fingerprints.append(space.name)
        return fingerprint(space)

    monkeypatch.setattr(LabelSpace, "fingerprint", spy)
    heads = Backend(tiny_settings).contexts.heads
    (space,) = parse_label_config(config([f"label {i}" for i in range(50)])).spaces
    expected = hashlib.sha256(f"{fingerprint(space)}\x00{tiny_settings.TEMPLATES}".encode(
        "utf-8", "surrogatepass")).hexdigest()
    assert [heads.key(space) for _ in range(4)] == [expected] * 4
    assert fingerprints == ["c"]
    (other,) = parse_label_config(config(["cat", "dog"])).spaces
    assert heads.key(other) != expected and fingerprints == ["c", "c"]
    heads.settings = tiny_settings.model_copy(update={"TEMPLATES": "photo"})
    assert heads.key(space) == hashlib.sha256(f"{fingerprint(space)}\x00photo".encode(
        "utf-8", "surrogatepass")).hexdigest()
