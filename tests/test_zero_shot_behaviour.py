"""Zero-shot behaviour of the served model, on the micro CLIP trained on synthetic shapes.

Images of colour × shape pairs the model never saw in training are served over loopback HTTP
and classified through the real /predict among all 25 labels (chance: 4 %).
"""

from __future__ import annotations

import httpx
import pytest

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

pytestmark = pytest.mark.slow
SEEN = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in UNSEEN_PAIRS]


def taxonomy_config() -> str:
    tree = "".join(f'<Choice value="{c}">' + "".join(f'<Choice value="{s}"/>' for s in SHAPES)
                   + "</Choice>" for c in COLOURS)
    return f'<View><Image name="image" value="$image"/><Taxonomy name="tax" toName="image">{tree}</Taxonomy></View>'


@pytest.fixture(scope="module")
def served(micro_clip, tmp_path_factory):
    settings = serving_settings(micro_clip, tmp_path_factory.mktemp("model-dir"), TOP_K=25)
    with BackendThread(create_app(settings)) as backend, LoopbackServer() as images:
        assert backend.wait_model()["model_state"] == "ready"
        yield backend, images


def predict(served, pairs, config, per_pair=8, seed=7):
    backend, images = served
    tasks, truth = [], []
    for i, (image, colour, shape) in enumerate(held_out_images(pairs, per_pair, seed)):
        url = images.add(f"/{seed}/{i}.png", Route(png(image), content_type="image/png"))
        tasks.append({"id": i, "data": {"image": url}})
        truth.append((colour, shape))
    response = httpx.post(backend.url + "/predict", timeout=120,
                          json={"tasks": tasks, "label_config": config, "project": "9.1"})
    assert response.status_code == 200
    return response.json()["results"], truth


def accuracy(results, truth) -> float:
    hits = [r["result"][0]["value"]["choices"][0] == f"{c} {s}" for r, (c, s) in zip(results, truth)]
    return sum(hits) / len(hits)


def test_unseen_colour_shape_pairs_are_recognised(served):
    results, truth = predict(served, sorted(UNSEEN_PAIRS), choices_config("shape"))
    unseen = accuracy(results, truth)
    print(f"\nmicro-CLIP zero-shot accuracy on unseen pairs: {unseen:.1%} (chance 4 %)")
    assert unseen >= 0.5


def test_seen_pairs_and_confidence_that_means_something(served):
    results, truth = predict(served, SEEN, choices_config("shape"), per_pair=2, seed=11)
    seen = accuracy(results, truth)
    print(f"\nmicro-CLIP zero-shot accuracy on seen pairs: {seen:.1%}")
    assert seen >= 0.9
    right = [r["score"] for r, (c, s) in zip(results, truth) if r["result"][0]["value"]["choices"][0] == f"{c} {s}"]
    wrong = [r["score"] for r, (c, s) in zip(results, truth) if r["result"][0]["value"]["choices"][0] != f"{c} {s}"]
    for result in results:
        alternatives = result["result"][0]["top_k"]
        assert len(alternatives) == 25 and sum(a["score"] for a in alternatives) == pytest.approx(1, abs=1e-4)
        assert result["score"] == alternatives[0]["score"]
    if wrong:  # confidence ranks right answers above wrong ones
        assert sum(right) / len(right) > sum(wrong) / len(wrong)


def test_multi_label_structure(served):
    results, _ = predict(served, SEEN[:4], choices_config("shape", 'choice="multiple"'), per_pair=2, seed=3)
    for result in results:
        (region,) = result["result"]
        chosen = region["value"]["choices"]
        scores = {a["label"]: a["score"] for a in region["top_k"]}
        assert chosen and set(chosen) <= set(LABELS)
        assert region["score"] == min(scores[label] for label in chosen)
        top = max(scores.values())
        assert all(scores[label] >= 0.5 * top for label in chosen)


def test_taxonomy_structure_and_accuracy(served):
    results, truth = predict(served, SEEN, taxonomy_config(), per_pair=1, seed=5)
    paths = [r["result"][0]["value"]["taxonomy"] for r in results]
    assert all(len(p) == 1 and len(p[0]) == 2 and p[0][0] in COLOURS and p[0][1] in SHAPES for p in paths)
    hits = sum(p[0] == [c, s] for p, (c, s) in zip(paths, truth))
    assert hits / len(paths) >= 0.9  # leaves are prompted as "red circle": their whole path
