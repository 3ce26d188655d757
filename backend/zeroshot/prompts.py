"""Template sets and the expansion of each label into the prompts that describe it.

A label becomes one or more *prompt groups*. Each group is encoded and ensembled the way
open_clip's `build_zero_shot_classifier` does (normalise each prompt embedding, average,
renormalise):

- every name (the choice's value, or each of its `predicted_values`) × every template: one group;
- every verbatim prompt from `model_prompts`: a group of its own.

How groups combine into one label score is the control's `pooling` (see scoring.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from ..errors import LabelConfigError
from ..labelstudio.label_config import LabelSpace

PLACEHOLDER = "{}"

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    # open_clip ships these as callables; rendering the placeholder turns them back into text.
    "simple": tuple(t(PLACEHOLDER) for t in SIMPLE_IMAGENET_TEMPLATES),
    "openai": tuple(t(PLACEHOLDER) for t in OPENAI_IMAGENET_TEMPLATES),
    "photo": ("a photo of a {}.",),
}


def resolve_templates(spec: str) -> tuple[str, ...]:
    """A set name (simple, openai, photo) or templates joined by '|', each containing '{}'."""
    spec = spec.strip()
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    templates = tuple(part.strip() for part in spec.split("|") if part.strip())
    bad = [t for t in templates if PLACEHOLDER not in t]
    if not templates or bad:
        raise LabelConfigError(
            f"Templates {spec!r} are neither a set name ({', '.join(TEMPLATE_SETS)}) nor "
            f"'|'-separated templates each containing '{{}}' (offending: {bad or spec!r})."
        )
    return templates


def fill(template: str, name: str) -> str:
    # str.replace, not str.format: label names may contain braces.
    return template.replace(PLACEHOLDER, name)


@dataclass(frozen=True)
class PromptPlan:
    """The prompts of one control: `groups[g]` is ensembled into one embedding, which belongs
    to label `group_label[g]` (an index into `space.labels`)."""

    groups: tuple[tuple[str, ...], ...]
    group_label: tuple[int, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """Every distinct prompt, in first-seen order (what the text encoder must see)."""
        return tuple(dict.fromkeys(text for group in self.groups for text in group))


def plan_prompts(space: LabelSpace, default_templates: str) -> PromptPlan:
    templates = resolve_templates(space.templates or default_templates)
    groups: list[tuple[str, ...]] = []
    owners: list[int] = []
    for index, label in enumerate(space.labels):
        for name in label.names:
            groups.append(tuple(fill(t, name) for t in templates))
            owners.append(index)
        for prompt in label.prompts:
            groups.append((prompt,))
            owners.append(index)
    return PromptPlan(tuple(groups), tuple(owners))


def prompt_count(spaces: Sequence[LabelSpace], default_templates: str) -> int:
    """Prompts the spaces expand to (names x templates + verbatim prompts), counted without
    building them."""
    total = 0
    for space in spaces:
        templates = len(resolve_templates(space.templates or default_templates))
        total += sum(len(label.names) * templates + len(label.prompts) for label in space.labels)
    return total


def check_prompt_count(spaces: Sequence[LabelSpace], default_templates: str, limit: int) -> None:
    """Refuse a config that expands to more than `limit` prompts (MAX_PROMPTS_PER_CONFIG):
    encoding them would hold the inference thread for minutes to hours."""
    count = prompt_count(spaces, default_templates)
    if count > limit:
        raise LabelConfigError(
            f"The label config expands to {count} prompts (labels x predicted_values x "
            f"templates, plus model_prompts); the limit is MAX_PROMPTS_PER_CONFIG={limit}. "
            "Use fewer labels or predicted_values, a smaller template set "
            "(model_templates=\"simple\" or \"photo\" on the control, or TEMPLATES), or raise "
            "MAX_PROMPTS_PER_CONFIG."
        )


def prompt_set_hash(plans: list[PromptPlan], spaces: tuple[LabelSpace, ...]) -> str:
    """Short hash of every prompt and scoring option: part of model_version."""
    digest = hashlib.sha256()
    for plan, space in zip(plans, spaces, strict=True):
        digest.update(space.fingerprint().encode())
        for group in plan.groups:
            digest.update("\x1f".join(group).encode() + b"\x1e")
    return digest.hexdigest()[:8]
