"""Selection and review exports over HTTP, on the micro CLIP: predicted tasks, annotations
through /webhook (10 % of them wrong on purpose), then /export/selection and /export/review."""

from __future__ import annotations

import csv
import itertools
import json

import httpx
import numpy as np
import pytest

from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.http_server import LoopbackServer, Route
from ..support.microclip import COLOURS, LABELS, SHAPES, ZERO_SHOT_TEMPLATES, held_out_images
from ..support.testbed_server import choices_config, png, serving_settings
from ..support.webhooks import annotation_event, choice_result

pytestmark = pytest.mark.slow
CONFIG = choices_config()
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
ids = itertools.count(5000)


@pytest.fixture(scope="module")
def served(micro_clip, tmp_path_factory):
    settings = serving_settings(micro_clip, tmp_path_factory.mktemp("model-dir"), ADAPT_EVERY=0)
    app = create_app(settings)
    with BackendThread(app) as backend, LoopbackServer() as images:
        assert backend.wait_model()["model_state"] == "ready"
        yield backend, images, app.state.backend


def predict_pool(backend, images, project: int, per_pair: int, seed: int) -> dict[str, str]:
    """Predict tasks for images of every label; return task id → true label."""
    truth, tasks = {}, []
    for image, colour, shape in held_out_images(ALL_PAIRS, per_pair, seed):
        task = next(ids)
        url = images.add(f"/review/{task}.png", Route(png(image), content_type="image/png"))
        tasks.append({"id": task, "data": {"image": url}})
        truth[str(task)] = f"{colour} {shape}"
    response = httpx.post(backend.url + "/predict", timeout=300,
                          json={"tasks": tasks, "label_config": CONFIG, "project": f"{project}.1"})
    assert response.status_code == 200
    return truth


def export(backend, kind: str, **params) -> httpx.Response:
    return httpx.get(f"{backend.url}/export/{kind}", params=params, timeout=120)


def jsonl(response: httpx.Response) -> tuple[dict, list[dict]]:
    header, *rows = [json.loads(line) for line in response.text.splitlines()]
    return header["header"], rows


def test_issued_predictions_carry_their_uncertainty(served):
    backend, images, model = served
    truth = predict_pool(backend, images, 601, 1, seed=61)
    record = model.store.prediction("601", next(iter(truth)))
    measured = record["controls"]["choice"]["uncertainty"]
    assert set(measured) == {"least_confidence", "margin", "entropy"}
    assert 0 <= measured["entropy"] <= 1 and 0 <= measured["margin"] <= 1


def test_cold_start_covers_every_class_and_strategies_are_deterministic(served):
    backend, images, _ = served
    truth = predict_pool(backend, images, 602, 6, seed=62)
    header, rows = jsonl(export(backend, "selection", project=602, strategy="cold_start",
                                budget=25, random_fraction=0))
    assert header["strategy"] == "cold_start" and header["budget"] == 25 and header["model_version"]
    assert {truth[row["task"]] for row in rows} == set(LABELS)  # every class in the first batch
    again = jsonl(export(backend, "selection", project=602, strategy="cold_start", budget=25,
                         random_fraction=0))[1]
    assert [r["task"] for r in again] == [r["task"] for r in rows]
    _, uncertain = jsonl(export(backend, "selection", project=602, strategy="uncertainty", budget=10))
    assert uncertain[0]["reason"] == "random slice" and len(uncertain) == 10
    ranked = [r["margin"] for r in uncertain if r["reason"] != "random slice"]
    assert ranked == sorted(ranked)  # smallest margin first


def test_flipped_labels_lead_the_review_queue(served):
    backend, images, _ = served
    truth = predict_pool(backend, images, 603, 4, seed=63)
    rng = np.random.default_rng(3)
    tasks = sorted(truth)
    flipped = set(rng.choice(tasks, size=len(tasks) // 10, replace=False).tolist())
    for task in tasks:
        label = truth[task]
        if task in flipped:
            label = LABELS[(LABELS.index(label) + int(rng.integers(1, len(LABELS)))) % len(LABELS)]
        event = annotation_event(next(ids), int(task), choice_result(label), project_id=603,
                                 image=f"{images.base}/review/{task}.png", label_config=CONFIG)
        assert httpx.post(backend.url + "/webhook", json=event, timeout=30).status_code == 200
    header, rows = jsonl(export(backend, "review", project=603))
    top = [row["task"] for row in rows[: len(flipped)]]
    found = len(set(top) & flipped) / len(flipped)
    print(f"\nreview queue: {found:.0%} of the {len(flipped)} flipped labels in its top {len(flipped)}; "
          f"threshold {header['confidence_threshold']} from {header['threshold_from']}")
    assert found >= 0.7
    assert all(row["queue"] == "label_error" for row in rows[: len(flipped)])
    assert header["annotated"] == len(tasks) and header["threshold_from"] == "annotations"


def test_exports_in_csv_and_label_studio_import_form(served):
    backend, images, _ = served
    predict_pool(backend, images, 604, 1, seed=64)
    response = export(backend, "selection", project=604, strategy="coreset", budget=5, format="csv")
    first, *lines = response.text.splitlines()
    assert first.startswith("# ") and json.loads(first[2:])["strategy"] == "coreset"
    assert len(list(csv.DictReader(lines))) == 5
    tasks = export(backend, "selection", project=604, strategy="coreset", budget=5,
                   format="labelstudio").json()
    assert len(tasks) == 5 and tasks[0]["data"]["image"].startswith("http://127.0.0.1")
    assert {"al_priority", "al_rank", "al_reason", "al_source_task", "al_strategy"} <= set(tasks[0]["data"])
    bad = export(backend, "selection", project=604, strategy="vibes", budget=5)
    assert bad.status_code == 422 and "choose one of" in bad.json()["detail"]
    unknown = export(backend, "review", project=999)
    assert unknown.status_code == 422 and "no label config known" in unknown.json()["detail"]


def test_the_command_line_gives_the_same_selection(served, micro_clip, monkeypatch, tmp_path, capsys):
    backend, images, model = served
    predict_pool(backend, images, 605, 1, seed=65)
    over_http = jsonl(export(backend, "selection", project=605, strategy="coreset", budget=8))[1]
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    for name, value in {"MODEL_CONFIG": str(micro_clip.config_path),
                        "MODEL_PRETRAINED": str(micro_clip.checkpoint_path),
                        "TEMPLATES": "|".join(ZERO_SHOT_TEMPLATES),
                        "MODEL_DIR": str(model.settings.MODEL_DIR)}.items():
        monkeypatch.setenv(name, value)
    from backend.cli import main

    assert main(["export", "selection", "--project", "605", "--label-config", str(config),
                 "--strategy", "coreset", "--budget", "8"]) == 0
    header, *rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in rows] == [r["task"] for r in over_http]
    assert main(["export", "review", "--project", "605", "--label-config", str(tmp_path / "missing.xml")]) == 2
    assert "cannot read --label-config" in capsys.readouterr().err
