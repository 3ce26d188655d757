"""Corrections → an adapted, calibrated head for one control, or the reason to keep zero-shot.

Served logits keep the zero-shot head and add a residual: `z = z0(x) + x · Rᵀ + c`, then
calibrate (temperature for softmax, Platt for sigmoid). The residual comes from one of:

- `prototypes` (training-free): each label's prototype is the mean of its corrected images,
  shrunk toward a stand-in made from its text embedding plus the image–text gap measured on the
  corrected labels. Labels nobody corrected keep that stand-in, so they compete on the same
  footing as corrected ones (a residual for corrected labels only would pull every image
  toward them: the seen-class bias of generalised zero-shot). `R = α · scale · prototypes`.
- `probe`: a linear residual fitted by L-BFGS on centred features, pulled toward zero (i.e.
  toward the text vectors), only when every label has a few corrections.

Hyperparameters (α, shrinkage) are chosen by cross-validation on the corrections, and the whole
procedure — selection included — is evaluated by an outer cross-validation, so every reported
number is on corrections the evaluated head never saw. The guard serves the adapted head only if
it beats calibrated zero-shot there (accuracy, then NLL); otherwise it serves calibrated
zero-shot. Multi-label controls get calibration and per-label thresholds only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..zeroshot.scoring import ZeroShotHead
from .adapter import Adapter, calibrated, softmax, zero_shot_logits
from .calibration import (
    Platt,
    Scores,
    fit_platt,
    fit_temperature,
    fit_thresholds,
    multi_label_scores,
    reliability,
    single_label_scores,
)

Array = npt.NDArray[np.float64]
MIN_EXAMPLES = 8
"""Below this many usable corrections in a control, nothing is fitted."""
OUTER_FOLDS = 5
INNER_FOLDS = 3
ALPHAS = (0.25, 0.5, 1.0, 2.0)
SHRINKAGE = (0.0, 2.0)
"""Pseudo-count of the text stand-in in each prototype: 0 trusts the images alone."""
SIGNIFICANT_Z = 1.645
"""One-sided 5 % level of the paired test a new head must pass to replace the served one."""
MIN_FRESH = 5
"""Corrections the current head never saw, needed to compare it with a new one."""
PROBE_MIN_PER_LABEL = 2
PROBE_PULL = 1e-2
PROBE_STEPS = 25
SELECTION_CALIBRATION_ITEMS = 500
"""Candidates are compared at a temperature fitted on about this many of their scores."""
SEED = 0


@dataclass(frozen=True)
class Examples:
    """The corrected items of one control: image embeddings and what annotators chose."""

    vectors: Array  # (N, D), L2-normalised
    targets: Array  # (N, L), 0/1; one 1 per row for single-label controls
    updated: Array  # (N,), when each annotation was last saved (epoch seconds)

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        return np.asarray(self.targets.argmax(axis=1), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.vectors)

    def subset(self, index: npt.NDArray[np.int64]) -> Examples:
        return Examples(self.vectors[index], self.targets[index], self.updated[index])


@dataclass(frozen=True)
class Fit:
    """An adapter and the evidence for serving it."""

    adapter: Adapter
    accepted: bool
    reason: str
    before: dict[str, float]  # raw zero-shot (no calibration), on the corrections
    zero_shot: dict[str, float]  # zero-shot + calibration, held out
    after: dict[str, float]  # the served adapter, held out
    candidate: dict[str, float]  # the best adapted head, held out (even if rejected)
    examples: int
    per_label: list[dict[str, Any]]
    seconds: float
    reliability: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    compared_with_current: dict[str, Any] | None = None
    held_out_probs: Array | None = field(default=None, repr=False)


def label_text_vectors(head: ZeroShotHead) -> Array:
    """One normalised text vector per label (the mean of its prompt groups)."""
    weights = head.weights.double().numpy()
    owners = head.group_label.numpy()
    vectors = np.zeros((head.n_labels, weights.shape[1]))
    np.add.at(vectors, owners, weights)
    return normalise_rows(vectors)


# --- the whole procedure -----------------------------------------------------------------------
def adapt(head: ZeroShotHead, examples: Examples, multiple: bool, current: Adapter | None = None,
          fitted_until: float | None = None) -> Fit:
    """Choose, evaluate and calibrate an adapter for one control from its corrections.

    `current`: the adapter served now, fitted on corrections saved up to `fitted_until`; the
    new one must also beat it on the corrections saved since (which it never saw)."""
    started = time.perf_counter()
    z0 = zero_shot_logits(head, examples.vectors)
    text = label_text_vectors(head)
    if multiple:
        fit = _adapt_multi(head, examples, z0)
    else:
        fit = _adapt_single(head, examples, z0, text)
        if current is not None and fitted_until is not None:
            fit = _against_current(fit, head.scoring, examples, z0, current, fitted_until)
    return replace(fit, seconds=round(time.perf_counter() - started, 3))


def _adapt_single(head: ZeroShotHead, ex: Examples, z0: Array, text: Array) -> Fit:
    scoring = head.scoring
    folds = _folds(ex.labels, OUTER_FOLDS)
    held_out = np.zeros_like(z0)
    for train, test in folds:  # selection happens inside each fold: held-out stays held out
        builder = _select(head, ex.subset(train), z0[train], text)
        held_out[test] = builder(ex.subset(train), z0[train]).logits(z0[test], ex.vectors[test])
    candidate_cal = _fit_calibration(held_out, ex, scoring)
    zs_cal = _fit_calibration(z0, ex, scoring)
    judged = {"before": calibrated(z0, scoring, 1.0, None),
              "zero_shot": calibrated(z0, scoring, *zs_cal),
              "candidate": calibrated(held_out, scoring, *candidate_cal)}
    scores = {name: _score(probs, ex, scoring) for name, probs in judged.items()}
    better = (_beats(judged["candidate"], judged["zero_shot"], ex, scoring)
              and _score(judged["candidate"], ex, scoring).accuracy > _counts_accuracy(ex, folds))
    if better:
        final = _select(head, ex, z0, text)(ex, z0)
        adapter = Adapter(final.method, final.residual, final.bias, *candidate_cal,
                          params=final.params)
        served = scores["candidate"]
        reason = f"{final.method} beats zero-shot on held-out corrections"
        probs = judged["candidate"]
    else:
        adapter = Adapter("zero-shot", None, None, *zs_cal)
        served, reason = scores["zero_shot"], ("no adapted head beat zero-shot on held-out "
                                                "corrections: calibrated zero-shot")
        probs = judged["zero_shot"]
    bins = {"before": _bins(judged["before"], ex), "after": _bins(probs, ex)}
    return Fit(adapter, better, reason, scores["before"].as_dict(), scores["zero_shot"].as_dict(),
               served.as_dict(), scores["candidate"].as_dict(), len(ex),
               _per_label(probs, ex), 0.0, bins, held_out_probs=probs)


def _against_current(fit: Fit, scoring: str, ex: Examples, z0: Array, current: Adapter,
                     fitted_until: float) -> Fit:
    """Keep the current head if it does better on the corrections it never saw."""
    fresh = np.flatnonzero(ex.updated > fitted_until)
    if len(fresh) < MIN_FRESH or fit.held_out_probs is None:
        return replace(fit, compared_with_current={"fresh": int(len(fresh)), "compared": False})
    subset = ex.subset(fresh)
    theirs = current.probabilities(z0[fresh], ex.vectors[fresh], scoring)
    ours = fit.held_out_probs[fresh]
    comparison = {"fresh": int(len(fresh)), "compared": True,
                  "current": _score(theirs, subset, scoring).as_dict(),
                  "new": _score(ours, subset, scoring).as_dict()}
    if _beats(theirs, ours, subset, scoring):
        return replace(fit, adapter=current, accepted=False, compared_with_current=comparison,
                       reason=f"the current head does better on the {len(fresh)} corrections "
                              "saved since it was fitted: kept")
    return replace(fit, compared_with_current=comparison)


def _adapt_multi(head: ZeroShotHead, ex: Examples, z0: Array) -> Fit:
    """Calibration and thresholds only; judged on held-out folds like the rest."""
    held_out = np.zeros_like(z0)
    decisions = np.zeros_like(z0)
    for train, test in _folds(ex.targets.argmax(axis=1), OUTER_FOLDS):
        platt = fit_platt(z0[train], ex.targets[train])
        thresholds = fit_thresholds(platt.apply(z0[train]), ex.targets[train])
        held_out[test] = platt.apply(z0[test])
        decisions[test] = held_out[test] >= thresholds
    platt = fit_platt(z0, ex.targets)
    thresholds = fit_thresholds(platt.apply(z0), ex.targets)
    raw = calibrated(z0, head.scoring, 1.0, None)
    before, after = multi_label_scores(raw, ex.targets), multi_label_scores(held_out, ex.targets)
    f1_before = _micro_f1(_relative_decisions(raw), ex.targets)
    f1_after = _micro_f1(decisions, ex.targets)
    accepted = after.nll < before.nll and f1_after >= f1_before
    summary = {**after.as_dict(), "f1": round(f1_after, 4)}
    adapter = (Adapter("zero-shot", platt=platt, thresholds=thresholds) if accepted
               else Adapter("zero-shot"))
    reason = ("calibrated per label, thresholds from corrections" if accepted else
              "calibration did not improve held-out NLL and F1: unchanged")
    unchanged = {**before.as_dict(), "f1": round(f1_before, 4)}
    bins = {"before": reliability(raw.ravel(), ex.targets.ravel()),
            "after": reliability(held_out.ravel(), ex.targets.ravel())}
    return Fit(adapter, accepted, reason, unchanged, unchanged,
               summary if accepted else unchanged, summary, len(ex),
               _per_label_multi(decisions, ex), 0.0, bins)


def learning_curve(head: ZeroShotHead, ex: Examples, shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
                   ) -> list[dict[str, float]]:
    """Accuracy after k corrections per label (training-free candidates, chosen by CV on those
    k), on the remaining corrections, beside zero-shot on the same items."""
    z0 = zero_shot_logits(head, ex.vectors)
    text = label_text_vectors(head)
    labels = ex.labels
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(ex))
    rows = []
    for k in shots:
        train = np.array([i for label in np.unique(labels)
                          for i in order[labels[order] == label][:k]], dtype=np.int64)
        test = np.setdiff1d(np.arange(len(ex)), train)
        if len(test) < len(np.unique(labels)) or len(train) < 2:
            break
        sub = ex.subset(train)
        build = _select(head, sub, z0[train], text, prototypes_only=True)
        adapted = build(sub, z0[train]).logits(z0[test], ex.vectors[test])
        rows.append({"shots": k, "train": len(train), "test": len(test),
                     "zero_shot": float(np.mean(z0[test].argmax(axis=1) == labels[test])),
                     "adapted": float(np.mean(adapted.argmax(axis=1) == labels[test]))})
    return rows


def _bins(probs: Array, ex: Examples) -> list[dict[str, float]]:
    top = probs.argmax(axis=1)
    return reliability(probs[np.arange(len(top)), top], (top == ex.labels).astype(float))


# --- candidates --------------------------------------------------------------------------------
Builder = Callable[[Examples, Array], Adapter]


def _candidates(head: ZeroShotHead, ex: Examples, text: Array, prototypes_only: bool = False
                ) -> list[Builder]:
    found = [_prototype_builder(head, text, alpha, kappa)
             for alpha in ALPHAS for kappa in SHRINKAGE]
    counts = ex.targets.sum(axis=0)
    enough = counts.min() >= PROBE_MIN_PER_LABEL * (INNER_FOLDS + 1) / INNER_FOLDS
    if enough and not prototypes_only:
        found.append(lambda e, z: _probe(head, e, z))
    return found


def _prototype_builder(head: ZeroShotHead, text: Array, alpha: float, kappa: float) -> Builder:
    return lambda ex, _z0: _prototypes(head, ex, text, alpha, kappa)


def _select(head: ZeroShotHead, ex: Examples, z0: Array, text: Array,
            prototypes_only: bool = False) -> Builder:
    """The candidate with the best inner cross-validated accuracy, then NLL."""
    candidates = _candidates(head, ex, text, prototypes_only)
    folds = _folds(ex.labels, INNER_FOLDS)
    best, best_key = candidates[0], (-1.0, 0.0)
    for build in candidates:
        held_out = np.zeros_like(z0)
        for train, test in folds:
            held_out[test] = build(ex.subset(train), z0[train]).logits(z0[test], ex.vectors[test])
        sample = slice(0, None, max(1, len(ex) // SELECTION_CALIBRATION_ITEMS))
        temperature = fit_temperature(held_out[sample], ex.labels[sample])
        scores = single_label_scores(softmax(held_out / temperature), ex.labels)
        key = (scores.accuracy, -scores.nll)
        if key > best_key:
            best, best_key = build, key
    return best


def _prototypes(head: ZeroShotHead, ex: Examples, text: Array, alpha: float,
                kappa: float) -> Adapter:
    targets, vectors = ex.targets, ex.vectors
    counts = targets.sum(axis=0)
    sums = targets.T @ vectors
    seen = counts > 0
    means = sums[seen] / counts[seen, None]
    gap = (means - text[seen]).mean(axis=0) if seen.any() else np.zeros(text.shape[1])
    stand_in = normalise_rows(text + gap)
    prototypes = normalise_rows(sums + kappa * stand_in) if kappa else np.where(
        seen[:, None], normalise_rows(sums), stand_in)
    scale = alpha * head.logit_scale
    return Adapter("prototypes", scale * prototypes, None,
                   params={"alpha": alpha, "shrinkage": kappa})


def _probe(head: ZeroShotHead, ex: Examples, z0: Array) -> Adapter:
    """Linear residual on centred features, L2-pulled to zero (the zero-shot head)."""
    centre = ex.vectors.mean(axis=0)
    x = torch.from_numpy(ex.vectors - centre).float()
    z = torch.from_numpy(z0).float()
    y = torch.from_numpy(ex.labels)
    weights = torch.zeros(ex.targets.shape[1], x.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")
    scale = head.logit_scale

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z + scale * x @ weights.T, y) \
            + PROBE_PULL * (weights ** 2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    residual = scale * weights.detach().double().numpy()
    return Adapter("probe", residual, -(residual @ centre), params={"pull": PROBE_PULL})


# --- helpers -----------------------------------------------------------------------------------
def _folds(labels: npt.NDArray[np.int64], k: int) -> list[tuple[npt.NDArray[np.int64],
                                                                npt.NDArray[np.int64]]]:
    """Stratified k folds (fewer when there are few items), deterministic."""
    k = max(2, min(k, len(labels)))
    rng = np.random.default_rng(SEED)
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        assignment[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return [(np.flatnonzero(assignment != f), np.flatnonzero(assignment == f)) for f in range(k)
            if (assignment == f).any()]


def _counts_accuracy(ex: Examples, folds: list[tuple[npt.NDArray[np.int64],
                                                     npt.NDArray[np.int64]]]) -> float:
    """Held-out accuracy of answering every item with the label chosen most often in the other
    folds: what the label counts alone achieve. A head must do better than this, or a head
    fitted to noise (labels chosen at random, with uneven counts) wins the sign test against a
    zero-shot that agrees with nobody, by learning the counts."""
    labels = ex.labels
    hits = 0
    for train, test in folds:
        majority = np.bincount(labels[train], minlength=ex.targets.shape[1]).argmax()
        hits += int((labels[test] == majority).sum())
    return hits / max(len(labels), 1)


def _fit_calibration(logits: Array, ex: Examples, scoring: str) -> tuple[float, Platt | None]:
    if scoring == "softmax":
        return fit_temperature(logits, ex.labels), None
    return 1.0, fit_platt(logits, ex.targets)


def _score(probs: Array, ex: Examples, scoring: str) -> Scores:
    if scoring == "sigmoid":  # independent scores of exclusive labels: judge the top label
        top = probs / probs.sum(axis=1, keepdims=True)
        scores = single_label_scores(top, ex.labels)
        confidence = multi_label_scores(probs, ex.targets)
        return Scores(scores.n, scores.accuracy, confidence.nll, confidence.ece, confidence.brier)
    return single_label_scores(probs, ex.labels)


def _beats(new: Array, old: Array, ex: Examples, scoring: str) -> bool:
    """`new` beats `old` on the same held-out items: no lower accuracy, a lower mean NLL, and
    lower per-item NLL on more items than chance allows (one-sided sign test; log-losses are
    too heavy-tailed for a t-test). Without the test, a head fitted to noise wins about half
    of the coin flips."""
    if _score(new, ex, scoring).accuracy < _score(old, ex, scoring).accuracy:
        return False
    gain = _item_nll(old, ex, scoring) - _item_nll(new, ex, scoring)
    wins, losses = int((gain > 0).sum()), int((gain < 0).sum())
    trials = wins + losses
    if gain.mean() <= 0 or trials == 0:
        return False
    return bool((wins - trials / 2) / np.sqrt(trials / 4) > SIGNIFICANT_Z)


def _item_nll(probs: Array, ex: Examples, scoring: str) -> Array:
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    if scoring == "sigmoid":
        loss: Array = -(ex.targets * np.log(p) + (1 - ex.targets) * np.log(1 - p)).sum(axis=1)
        return loss
    return np.asarray(-np.log(p[np.arange(len(p)), ex.labels]), dtype=np.float64)


def _per_label(probs: Array, ex: Examples) -> list[dict[str, Any]]:
    picked = probs.argmax(axis=1)
    return _precision_recall(np.eye(probs.shape[1])[picked], ex.targets)


def _per_label_multi(decisions: Array, ex: Examples) -> list[dict[str, Any]]:
    return _precision_recall(decisions, ex.targets)


def _precision_recall(decided: Array, truth: Array) -> list[dict[str, Any]]:
    rows = []
    for label in range(truth.shape[1]):
        hits = float((decided[:, label] * truth[:, label]).sum())
        chosen, actual = float(decided[:, label].sum()), float(truth[:, label].sum())
        rows.append({"label": label, "support": int(actual),
                     "precision": round(hits / chosen, 4) if chosen else None,
                     "recall": round(hits / actual, 4) if actual else None})
    return rows


def _relative_decisions(probs: Array) -> Array:
    return np.asarray(probs >= 0.5 * probs.max(axis=1, keepdims=True), dtype=np.float64)


def _micro_f1(decided: Array, truth: Array) -> float:
    hits = float((decided * truth).sum())
    total = float(decided.sum() + truth.sum())
    return 2 * hits / total if total else 0.0


def normalise_rows(rows: Array) -> Array:
    """Rows scaled to unit length (zero rows stay zero)."""
    result: Array = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return result
