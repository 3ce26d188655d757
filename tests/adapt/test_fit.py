"""Adapters on synthetic embeddings: clusters around text vectors shifted by a modality gap,
with a zero-shot head that confuses some labels (as a real one does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.adapt.adapter import zero_shot_logits
from backend.adapt.fit import Examples, adapt, label_text_vectors
from backend.adapt.registry import ServedHead, adapter_document, adapter_from_document, space_digest
from backend.labelstudio.label_config import parse_label_config
from backend.zeroshot.scoring import ZeroShotHead

from ..support.vectors import unit

LABELS, DIM = 6, 32


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    text = unit(rng.normal(size=(LABELS, DIM)))
    gap = rng.normal(size=DIM) * 0.8
    # images of label c sit near text c + gap, but labels 0 and 1 are nudged toward each other's text
    centres = unit(text + gap + rng.normal(size=(LABELS, DIM)) * 0.5)
    centres[0] = unit(centres[0] + 0.6 * text[1])

    def sample(per_label, seed):
        r = np.random.default_rng(seed)
        y = np.repeat(np.arange(LABELS), per_label)
        x = unit(centres[y] + r.normal(size=(len(y), DIM)) * 0.25)
        return x, y

    head = ZeroShotHead(torch.from_numpy(text).float(), torch.arange(LABELS), LABELS, "mean", "softmax", 20.0, 0.0)
    return head, sample


def examples(x, y, labels=LABELS):
    return Examples(x, np.eye(labels)[y], np.arange(len(y), dtype=float))


def accuracy(head, adapter, x, y):
    z0 = zero_shot_logits(head, x)
    probs = adapter.probabilities(z0, x, "softmax") if adapter else z0
    return float(np.mean(probs.argmax(axis=1) == y))


def test_adapted_head_beats_zero_shot_where_it_is_weak_and_says_why(world):
    head, sample = world
    fit = adapt(head, examples(*sample(6, 1)), multiple=False)
    test_x, test_y = sample(200, 2)
    assert fit.accepted and fit.adapter.method in ("prototypes", "probe")
    assert accuracy(head, fit.adapter, test_x, test_y) > accuracy(head, None, test_x, test_y) + 0.05
    assert fit.after["accuracy"] > fit.zero_shot["accuracy"]  # held-out evidence, recorded
    assert fit.reliability["before"] and fit.reliability["after"]
    assert len(fit.per_label) == LABELS and all(row["support"] == 6 for row in fit.per_label)


def test_random_labels_are_rejected_and_zero_shot_keeps_its_decisions(world):
    head, sample = world
    x, _ = sample(6, 3)
    noise = np.random.default_rng(4).integers(0, LABELS, len(x))
    fit = adapt(head, examples(x, noise), multiple=False)
    test_x, test_y = sample(100, 5)
    assert not fit.accepted and fit.adapter.residual is None
    assert accuracy(head, fit.adapter, test_x, test_y) == accuracy(head, None, test_x, test_y)


def test_the_current_head_is_kept_when_it_does_better_on_what_it_never_saw(world):
    head, sample = world
    x, y = sample(6, 6)
    current = adapt(head, examples(x, y), multiple=False).adapter
    later_x, later_y = sample(3, 7)
    wrong = (later_y + 1) % LABELS  # newer corrections that contradict everything before
    both = Examples(np.vstack([x, later_x]), np.eye(LABELS)[np.concatenate([y, wrong])],
                    np.concatenate([np.zeros(len(y)), np.ones(len(wrong))]))
    fit = adapt(head, both, multiple=False, current=current, fitted_until=0.5)
    assert fit.compared_with_current["compared"] and fit.compared_with_current["fresh"] == len(wrong)


def test_multi_label_gets_calibration_and_thresholds(world):
    head, sample = world
    x, y = sample(12, 8)
    targets = np.eye(LABELS)[y]
    targets[::3, (y[::3] + 1) % LABELS] = 1  # every third image also shows the next label
    sig = ZeroShotHead(head.weights, head.group_label, LABELS, "mean", "sigmoid", 20.0, -8.0)
    fit = adapt(sig, Examples(x, targets, np.zeros(len(x))), multiple=True)
    assert "f1" in fit.after and fit.examples == len(x)
    if fit.accepted:
        assert fit.adapter.platt is not None and fit.adapter.thresholds.shape == (LABELS,)


def test_text_vectors_pool_prompt_groups_per_label():
    groups = unit(np.random.default_rng(9).normal(size=(3, DIM)))
    head = ZeroShotHead(torch.from_numpy(groups).float(), torch.tensor([0, 0, 1]), 2, "max", "softmax", 10.0, 0.0)
    vectors = label_text_vectors(head)
    assert np.allclose(vectors[0], unit(groups[0] + groups[1]), atol=1e-6)
    assert np.allclose(vectors[1], groups[2], atol=1e-6)


def test_adapters_survive_storage_and_apply_only_to_the_control_they_were_fitted_for(world):
    head, sample = world
    fit = adapt(head, examples(*sample(4, 10)), multiple=False)
    restored = adapter_from_document(adapter_document(fit.adapter))
    x, _ = sample(5, 11)
    z0 = zero_shot_logits(head, x)
    assert np.allclose(restored.probabilities(z0, x, "softmax"),
                       fit.adapter.probabilities(z0, x, "softmax"), atol=1e-5)
    config = ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">{}</Choices></View>')
    space = parse_label_config(config.format('<Choice value="a"/><Choice value="b"/>')).spaces[0]
    grown = parse_label_config(config.format('<Choice value="a"/><Choice value="b"/><Choice value="new"/>')).spaces[0]
    active = ServedHead("h1", {"c": (space_digest(space), restored)})
    assert active.adapter_for(space) is restored
    assert active.adapter_for(grown) is None  # labels changed: zero-shot until the next fit
