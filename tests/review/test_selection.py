"""Selection strategies and uncertainty measures on synthetic embeddings (and, for label-error
detection, on the micro CLIP's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.adapt.adapter import zero_shot_logits
from backend.adapt.fit import Examples, adapt
from backend.review.selection import cold_start, k_center, likely_label_errors, select
from backend.zeroshot.scoring import ZeroShotHead
from backend.zeroshot.uncertainty import entropy, margin, measures, priority

from ..support.vectors import softmax, unit

LABELS, DIM = 8, 24


@pytest.fixture(scope="module")
def pool():
    """Clusters of uneven size; the text vectors sit off the clusters, so zero-shot is weak."""
    rng = np.random.default_rng(0)
    text = unit(rng.normal(size=(LABELS, DIM)))
    centres = unit(text + rng.normal(size=DIM) + rng.normal(size=(LABELS, DIM)) * 0.9)
    sizes = rng.integers(20, 80, LABELS)
    y = np.repeat(np.arange(LABELS), sizes)
    x = unit(centres[y] + rng.normal(size=(len(y), DIM)) * 0.15)
    head = ZeroShotHead(torch.from_numpy(text).float(), torch.arange(LABELS), LABELS, "mean", "softmax", 30.0, 0.0)
    return x, y, head


def test_measures_rank_a_coin_flip_above_a_sure_thing():
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.49, 0.01], [1 / 3, 1 / 3, 1 / 3]])
    assert np.argsort(margin(probs)).tolist() == [2, 1, 0]
    assert entropy(probs)[2] == pytest.approx(1.0) and entropy(probs)[0] < 0.15
    assert priority(probs, "least_confidence").argmax() == 2
    multi = measures(np.array([[0.9, 0.52, 0.1]]), multiple=True, thresholds=np.array([0.5, 0.5, 0.5]))
    assert multi["threshold_distance"][0] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="use margin, entropy"):
        priority(probs, "vibes")


def test_random_slice_is_set_aside_and_everything_is_deterministic(pool):
    x, y, head = pool
    probs = softmax(zero_shot_logits(head, x))
    first = select("uncertainty", 40, x, probs, seed=3)
    again = select("uncertainty", 40, x, probs, seed=3)
    assert first.index.tolist() == again.index.tolist()
    assert first.reasons.count("random slice") == 4 and len(set(first.index.tolist())) == 40
    assert select("uncertainty", 40, x, probs, seed=4).index.tolist() != first.index.tolist()
    labelled = first.index[:10]
    assert not set(select("coreset", 20, x, labelled=labelled).index.tolist()) & set(labelled.tolist())
    with pytest.raises(ValueError, match="needs the current head"):
        select("uncertainty", 5, x)


def test_cold_start_covers_every_class_in_its_first_batch(pool):
    x, y, _ = pool
    perfect_guess = y  # class-balanced by the (here perfect) zero-shot guess
    chosen = cold_start(x, np.arange(len(x)), perfect_guess, LABELS, np.random.default_rng(0))
    assert sorted(set(y[chosen].tolist())) == list(range(LABELS))
    # without guesses, typical items of k clusters still cover most classes
    unguided = select("cold_start", LABELS, x, random_fraction=0.0).index
    assert len(set(y[unguided].tolist())) >= LABELS - 2


def test_k_center_spreads_its_picks(pool):
    x, y, _ = pool
    picked = k_center(x, np.arange(len(x)), np.array([], dtype=np.int64), LABELS * 2)
    assert len(set(y[picked].tolist())) >= LABELS - 1  # far apart means across clusters


def test_margin_sampling_reaches_random_sampling_accuracy_with_fewer_labels(pool):
    x, y, head = pool
    rng = np.random.default_rng(1)
    test = rng.permutation(len(x))[: len(x) // 3]
    train = np.setdiff1d(np.arange(len(x)), test)

    def run(strategy: str) -> list[tuple[int, float]]:
        labelled = train[select("cold_start", LABELS, x[train], softmax(zero_shot_logits(head, x[train])),
                                random_fraction=0.0).index]
        curve = []
        while len(labelled) <= 72:
            ex = Examples(x[labelled], np.eye(LABELS)[y[labelled]], np.zeros(len(labelled)))
            adapter = adapt(head, ex, multiple=False).adapter
            probs = adapter.probabilities(zero_shot_logits(head, x), x, "softmax")
            curve.append((len(labelled), float(np.mean(probs[test].argmax(axis=1) == y[test]))))
            position = {int(t): i for i, t in enumerate(train)}
            done = np.array([position[int(i)] for i in labelled])
            pick = select(strategy, 8, x[train], probs[train], labelled=done, random_fraction=0.0, seed=len(labelled))
            labelled = np.concatenate([labelled, train[pick.index]])
        return curve

    random_curve, margin_curve = run("random"), run("uncertainty")
    target = random_curve[-1][1]
    needed = next(n for n, acc in margin_curve if acc >= target - 1e-9)
    print(f"\nrandom reaches {target:.1%} with {random_curve[-1][0]} labels; margin with {needed}")
    assert needed < random_curve[-1][0]


def test_flipped_labels_top_the_label_error_queue(micro_clip):
    from tests.support.microclip import LABELS as NAMES
    from tests.support.microclip import SEEN_PAIRS, held_out_images, load_micro_clip

    model, preprocess, tokenizer = load_micro_clip(micro_clip)
    images = held_out_images(SEEN_PAIRS, 10, seed=55)
    with torch.no_grad():
        x = model.encode_image(torch.stack([preprocess(i) for i, _, _ in images]), normalize=True).double().numpy()
        text = model.encode_text(tokenizer([f"a photo of a {n}." for n in NAMES]), normalize=True)
    head = ZeroShotHead(text.float(), torch.arange(len(NAMES)), len(NAMES), "mean", "softmax",
                float(model.logit_scale.detach().exp()), 0.0)
    truth = np.array([NAMES.index(f"{c} {s}") for _, c, s in images])
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(truth), size=len(truth) // 10, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, len(NAMES), len(flipped))) % len(NAMES)
    scores = likely_label_errors(softmax(zero_shot_logits(head, x)), given)
    top = np.argsort(-scores)[: len(flipped)]
    recall = len(set(top.tolist()) & set(flipped.tolist())) / len(flipped)
    print(f"\nlabel errors: {recall:.0%} of the {len(flipped)} flipped labels in the top 10 %")
    assert recall >= 0.7


def test_on_the_micro_clip_margin_sampling_needs_fewer_labels_than_random(micro_clip):
    """Labels named by codes ("item A0", …) carry no meaning for the text tower, so zero-shot is
    at chance and the head is learnt from corrections alone: where active learning matters."""
    from tests.support.microclip import COLOURS, SHAPES, held_out_images, load_micro_clip

    model, preprocess, tokenizer = load_micro_clip(micro_clip)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    codes = [f"item {chr(65 + i // 5)}{i % 5}" for i in range(len(pairs))]

    def embed(images):
        with torch.no_grad():
            batch = torch.stack([preprocess(image) for image, _, _ in images])
            return model.encode_image(batch, normalize=True).double().numpy()

    pool_images, test_images = held_out_images(pairs, 12, seed=71), held_out_images(pairs, 16, seed=72)
    x, x_test = embed(pool_images), embed(test_images)
    y = np.array([pairs.index((c, s)) for _, c, s in pool_images])
    y_test = np.array([pairs.index((c, s)) for _, c, s in test_images])
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {code}." for code in codes]), normalize=True)
    head = ZeroShotHead(text.float(), torch.arange(len(codes)), len(codes), "mean", "softmax",
                float(model.logit_scale.detach().exp()), 0.0)
    labels = len(codes)

    def run(strategy: str) -> list[tuple[int, float]]:
        labelled = select("cold_start", 10, x, softmax(zero_shot_logits(head, x)), random_fraction=0.0, seed=1).index
        curve = []
        while len(labelled) <= 130:
            adapter = adapt(head, Examples(x[labelled], np.eye(labels)[y[labelled]], np.zeros(len(labelled))),
                            multiple=False).adapter
            curve.append((len(labelled), float(np.mean(adapter.probabilities(
                zero_shot_logits(head, x_test), x_test, "softmax").argmax(axis=1) == y_test))))
            probs = adapter.probabilities(zero_shot_logits(head, x), x, "softmax")
            pick = select(strategy, 10, x, probs, labelled=labelled, random_fraction=0.0, seed=len(labelled))
            labelled = np.concatenate([labelled, pick.index])
        return curve

    random_curve, margin_curve = run("random"), run("uncertainty")
    zero = float(np.mean(zero_shot_logits(head, x_test).argmax(axis=1) == y_test))
    target = random_curve[-1][1]
    needed = next(n for n, acc in margin_curve if acc >= target)
    print(f"\nmicro CLIP, code-named labels: zero-shot {zero:.1%}; random reaches {target:.1%} with "
          f"{random_curve[-1][0]} labels, margin with {needed}")
    print("labels  random  margin\n" + "\n".join(f"{n:6d} {r:7.1%} {m:7.1%}" for (n, r), (_, m)
                                                  in zip(random_curve, margin_curve)))
    assert needed < random_curve[-1][0]
