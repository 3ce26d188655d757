"""Learning from corrections, end to end on the micro CLIP: /predict → webhooks → START_TRAINING
→ a new head → /predict, measured on held-out images (unseen colour × shape pairs included).

Run with `-s` to see the table per shot count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from backend.adapt.calibration import expected_calibration_error
from backend.web.app import create_app

from .support.backend_server import BackendThread
from .support.http_server import LoopbackServer, Route
from .support.microclip import (
    COLOURS,
    LABELS,
    SHAPES,
    UNSEEN_PAIRS,
    held_out_images,
)
from .support.testbed_server import choices_config, png, serving_settings
from .support.waiting import eventually
from .support.webhooks import annotation_event, choice_result

pytestmark = pytest.mark.slow
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
CONFIG = choices_config()
ids = itertools.count(1000)


@pytest.fixture(scope="module")
def served(micro_clip, tmp_path_factory):
    settings = serving_settings(micro_clip, tmp_path_factory.mktemp("model-dir"), ADAPT_EVERY=0)
    with BackendThread(create_app(settings)) as backend, LoopbackServer() as images:
        assert backend.wait_model()["model_state"] == "ready"
        yield backend, images


@dataclass
class Items:
    urls: list[str]
    truth: list[str]


def host(images: LoopbackServer, pairs, per_pair: int, seed: int) -> Items:
    urls, truth = [], []
    for image, colour, shape in held_out_images(pairs, per_pair, seed):
        path = f"/adapt/{next(ids)}.png"
        urls.append(images.add(path, Route(png(image), content_type="image/png")))
        truth.append(f"{colour} {shape}")
    return Items(urls, truth)


@dataclass
class Project:
    backend: BackendThread
    id: int
    clock: itertools.count = field(default_factory=lambda: itertools.count(1))

    def predict(self, urls: list[str]) -> tuple[list[dict], list[int]]:
        task_ids = [next(ids) for _ in urls]
        tasks = [{"id": t, "data": {"image": url}} for t, url in zip(task_ids, urls)]
        response = httpx.post(self.backend.url + "/predict", timeout=300, json={
            "tasks": tasks, "label_config": CONFIG, "project": f"{self.id}.1"})
        assert response.status_code == 200, response.text
        return response.json()["results"], task_ids

    def correct(self, urls: list[str], labels: list[str]) -> None:
        """Predict the tasks (as Label Studio would), then annotate them through /webhook."""
        _, task_ids = self.predict(urls)
        for task_id, url, label in zip(task_ids, urls, labels):
            stamp = f"2026-11-28T12:{next(self.clock) // 60:02d}:{next(self.clock) % 60:02d}.000000Z"
            event = annotation_event(next(ids), task_id, choice_result(label), project_id=self.id,
                                     image=url, label_config=CONFIG, updated_at=stamp)
            assert httpx.post(self.backend.url + "/webhook", json=event, timeout=30).status_code == 200

    def train(self) -> dict:
        event = {"action": "START_TRAINING", "project": {"id": self.id, "label_config": CONFIG}}
        answer = httpx.post(self.backend.url + "/webhook", json=event, timeout=30).json()
        assert "job" in answer
        assert eventually(lambda: (self.heads()["last_run"] or {}).get("finished"), timeout=300)
        return self.heads()

    def heads(self) -> dict:
        return httpx.get(self.backend.url + "/heads", params={"project": self.id}, timeout=30).json()

    def evaluate(self, items: Items) -> dict:
        results, _ = self.predict(items.urls)
        chosen = [r["result"][0]["value"]["choices"][0] for r in results]
        correct = np.array([c == t for c, t in zip(chosen, items.truth)], dtype=float)
        scores = np.array([r["result"][0]["score"] for r in results])
        return {"accuracy": correct.mean(), "ece": expected_calibration_error(scores, correct),
                "version": results[0]["model_version"], "correct": correct}


def shot_pool(images, seed: int, shots: int) -> list[Items]:
    """`shots` rounds of one image per label."""
    pool = host(images, ALL_PAIRS, shots, seed)
    return [Items(pool.urls[k::shots], pool.truth[k::shots]) for k in range(shots)]


def test_accuracy_rises_with_corrections_never_below_zero_shot_and_calibrates(served):
    backend, images = served
    project = Project(backend, 501)
    unseen = host(images, sorted(UNSEEN_PAIRS), 20, seed=202)
    everything = host(images, ALL_PAIRS, 6, seed=203)
    zero = {"unseen": project.evaluate(unseen), "all": project.evaluate(everything)}
    rounds = shot_pool(images, seed=101, shots=8)
    rows = [("zero-shot", 0, zero["unseen"]["accuracy"], zero["all"]["accuracy"], zero["all"]["ece"], "-")]
    done = 0
    for shots in (1, 2, 4, 8):
        for k in range(done, shots):
            project.correct(rounds[k].urls, rounds[k].truth)
        done = shots
        heads = project.train()
        now = {"unseen": project.evaluate(unseen), "all": project.evaluate(everything)}
        rows.append((f"{shots}/label", shots, now["unseen"]["accuracy"], now["all"]["accuracy"],
                     now["all"]["ece"], heads["active"] or "zero-shot"))
        assert now["unseen"]["accuracy"] >= zero["unseen"]["accuracy"], rows
        assert now["all"]["accuracy"] >= zero["all"]["accuracy"], rows
        if shots >= 4:
            assert now["unseen"]["accuracy"] >= 0.9, rows
    print("\nshots  unseen-pair acc  all-pair acc  ECE    head")
    for name, _, acc_unseen, acc_all, ece, head in rows:
        print(f"{name:10s} {acc_unseen:8.1%} {acc_all:12.1%} {ece:8.3f}  {head}")
    run = heads["heads"][-1] if heads["heads"] else None
    if run:
        control = run["controls"]["choice"]
        print("fit:", run["seconds"], "s;", control["reason"], control["before"], control["after"])
    assert rows[-1][4] <= 0.5 * rows[0][4], rows  # calibrated: ECE at most half of zero-shot's
    assert heads["active"], "after 8 corrections per label a head is served"
    assert project.evaluate(unseen)["version"].endswith(":" + heads["active"])


def test_labels_without_corrections_stay_predictable(served):
    backend, images = served
    project = Project(backend, 502)
    diagonal = sorted(UNSEEN_PAIRS)
    corrected = diagonal + [p for p in ALL_PAIRS if p not in UNSEEN_PAIRS][::3]
    others = [p for p in ALL_PAIRS if p not in corrected]
    items = {"corrected": host(images, corrected, 16, seed=301),
             "others": host(images, others, 16, seed=301)}
    before = {side: project.evaluate(its)["accuracy"] for side, its in items.items()}
    pool = host(images, corrected, 8, seed=102)
    project.correct(pool.urls, pool.truth)
    heads = project.train()
    print(heads["last_run"])
    after = {side: project.evaluate(its)["accuracy"] for side, its in items.items()}

    def harmonic(acc):
        return 2 * acc["corrected"] * acc["others"] / (acc["corrected"] + acc["others"])

    print(f"\nGZSL ({len(corrected)} labels corrected, {len(others)} never): before {before} "
          f"H={harmonic(before):.3f}; after {after} H={harmonic(after):.3f}")
    assert after["others"] >= before["others"] - 0.02
    assert harmonic(after) > harmonic(before)


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_noisy_or_adversarial_corrections_never_make_it_worse(served, noise):
    backend, images = served
    project = Project(backend, 503 + int(noise * 10))
    evaluation = host(images, ALL_PAIRS, 4, seed=204)
    zero = project.evaluate(evaluation)
    pool = host(images, ALL_PAIRS, 4, seed=103)
    rng = np.random.default_rng(5)
    labels = [rng.choice(LABELS) if rng.random() < noise else t for t in pool.truth]
    project.correct(pool.urls, labels)
    heads = project.train()
    after = project.evaluate(evaluation)
    print(f"\n{noise:.0%} wrong labels: zero-shot {zero['accuracy']:.1%}, after {after['accuracy']:.1%}, "
          f"head {heads['active'] or 'zero-shot'}")
    assert after["accuracy"] >= zero["accuracy"]
    if noise == 1.0:
        assert heads["active"] is None and after["version"] == zero["version"]


def test_rollback_to_zero_shot_and_back(served):
    backend, images = served
    project = Project(backend, 510)
    pool = host(images, ALL_PAIRS, 2, seed=104)
    project.correct(pool.urls, pool.truth)
    heads = project.train()
    head = heads["active"]
    assert head and heads["heads"][-1]["controls"]["choice"]["learning_curve"]

    def setup_version() -> str:
        return httpx.post(backend.url + "/setup", json={"project": f"{project.id}.1", "label_config": CONFIG},
                          timeout=30).json()["model_version"]

    assert setup_version().endswith(":" + head)
    answer = httpx.post(backend.url + "/heads/activate", json={"project": str(project.id), "head": "zero-shot"})
    assert answer.status_code == 200
    assert eventually(lambda: ":h" not in setup_version(), timeout=10)
    assert httpx.post(backend.url + "/heads/activate", json={"project": str(project.id), "head": head}).status_code == 200
    assert eventually(lambda: setup_version().endswith(":" + head), timeout=10)
    missing = httpx.post(backend.url + "/heads/activate", json={"project": str(project.id), "head": "h99"})
    assert missing.status_code == 404 and "GET /heads" in missing.json()["detail"]
