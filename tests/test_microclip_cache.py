"""The micro-CLIP testbed's cache: a stale, corrupt or foreign cached model is trained again,
never handed to the tests (where every test using it would error)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from .support import microclip
from .support.microclip import MicroClip, Recipe, ensure_micro_clip, load_micro_clip
from .support.microclip_cache import cache_problem, ensure_usable_micro_clip

# The real recipe trains for minutes; this one takes seconds and runs the same code.
TINY = Recipe(pool_per_pair=1, off_palette_per_shape=1, steps=1, batch_size=4, text_width=64)

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroClip]:
    """A cache holding a (tiny) trained testbed; the tiny recipe stays in force."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(microclip.DEFAULT_RECIPES, "clip", TINY)
        yield ensure_micro_clip(tmp_path_factory.mktemp("testbed"), "clip")


@pytest.fixture
def cache(trained: MicroClip, tmp_path: Path) -> MicroClip:
    """A copy of the trained cache, for this test to damage."""
    for path in (trained.config_path, trained.checkpoint_path):
        shutil.copy(path, tmp_path / path.name)
    return MicroClip(trained.model_name, tmp_path / trained.config_path.name,
                     tmp_path / trained.checkpoint_path.name, trained.family)


def load_state(mc: MicroClip) -> State:
    return torch.load(mc.checkpoint_path, map_location="cpu", weights_only=True)


def usable(mc: MicroClip) -> bool:
    return cache_problem(mc) is None


def without_a_tensor(state: State) -> State:
    """A partial checkpoint, or one of another architecture: it still has a logit_scale."""
    return {k: v for k, v in state.items() if k != "text_projection"}


def resized(state: State) -> State:
    return {**state, "text_projection": torch.zeros(3, 3)}


def not_finite(state: State) -> State:
    return {**state, "text_projection": torch.full_like(state["text_projection"], float("nan"))}


@pytest.mark.parametrize("corrupt", [without_a_tensor, resized, not_finite])
def test_a_checkpoint_the_tests_could_not_use_is_not_accepted(
        cache: MicroClip, corrupt: Callable[[State], State]) -> None:
    assert usable(cache)
    torch.save(corrupt(load_state(cache)), cache.checkpoint_path)

    assert not usable(cache)


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint", None])
def test_a_truncated_or_garbled_checkpoint_is_not_accepted(
        cache: MicroClip, damage: bytes | None) -> None:
    data = cache.checkpoint_path.read_bytes()
    cache.checkpoint_path.write_bytes(data[: len(data) // 2] if damage is None else damage)

    assert not usable(cache)


def test_a_config_of_another_recipe_is_not_accepted(cache: MicroClip) -> None:
    cache.config_path.write_text(cache.config_path.read_text().replace("64", "65", 1))

    assert not usable(cache)


def test_an_unusable_cache_is_trained_again(trained: MicroClip, cache: MicroClip) -> None:
    torch.save(without_a_tensor(load_state(cache)), cache.checkpoint_path)

    again = ensure_usable_micro_clip(cache.checkpoint_path.parent, "clip")

    assert again == cache
    load_micro_clip(again)  # what every test using the testbed does
    assert load_state(again).keys() == load_state(trained).keys()
