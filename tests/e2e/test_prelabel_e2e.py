"""End to end: a real Label Studio connects to the real backend (`python -m backend serve`)
serving the micro CLIP, retrieves predictions for URL-imported and uploaded images, and sends
the backend its webhooks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lxml import etree

from backend.config import load_settings
from backend.images.fetch import ImageFetcher
from backend.labelstudio.client import LabelStudioAccess
from tests.e2e.label_studio import (
    LabelStudioClient,
    LabelStudioServer,
    create_personal_access_token,
)
from tests.support.backend_process import BackendProcess
from tests.support.http_server import LoopbackServer, Route
from tests.support.microclip import (
    COLOURS,
    LABELS,
    SHAPES,
    UNSEEN_PAIRS,
    ZERO_SHOT_TEMPLATES,
    held_out_images,
)
from tests.support.testbed_server import png
from tests.support.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SEEN = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in UNSEEN_PAIRS]


def config_with_testbed_labels(example: str) -> str:
    """An example config from label_config/, its <Choice>s swapped for the testbed's labels."""
    root = etree.fromstring((REPO / "label_config" / example).read_bytes())
    (choices,) = root.iter("Choices")
    for child in list(choices):
        choices.remove(child)
    for label in LABELS:
        etree.SubElement(choices, "Choice", value=label)
    return etree.tostring(root, encoding="unicode")


@pytest.fixture(scope="module")
def pat(label_studio: tuple[LabelStudioServer, LabelStudioClient]) -> str:
    return create_personal_access_token(label_studio[1])


@pytest.fixture(scope="module")
def backend(label_studio, micro_clip, pat, tmp_path_factory) -> Iterator[BackendProcess]:
    server, _ = label_studio
    env = {"MODEL_CONFIG": str(micro_clip.config_path),
           "MODEL_PRETRAINED": str(micro_clip.checkpoint_path),
           "TEMPLATES": "|".join(ZERO_SHOT_TEMPLATES),
           "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": pat,
           "IMAGE_URL_ALLOWLIST": "127.0.0.1",  # the test's image server; LS is allowed anyway
           "MODEL_DIR": str(tmp_path_factory.mktemp("model-dir"))}
    with BackendProcess(env, tmp_path_factory.mktemp("logs") / "backend.log") as process:
        yield process


def test_label_studio_retrieves_correct_predictions_and_sends_webhooks(label_studio, backend, tmp_path):
    _, client = label_studio
    config = config_with_testbed_labels("choices_single.xml")
    project = client.create_project("clip-e2e", config)
    samples = held_out_images(SEEN[::2], 1, seed=21)  # 10 images of seen pairs
    expected: dict[str, str] = {}
    with LoopbackServer() as images:
        url_tasks = []
        for i, (image, colour, shape) in enumerate(samples[:5]):
            url = images.add(f"/e2e/{i}.png", Route(png(image), content_type="image/png"))
            url_tasks.append({"data": {"image": url}})
            expected[url] = f"{colour} {shape}"
        client.import_tasks(project, url_tasks)
        paths = []
        for i, (image, colour, shape) in enumerate(samples[5:]):
            path = tmp_path / f"upload_{i}.png"
            image.save(path)
            paths.append(path)
            expected[f"upload_{i}.png"] = f"{colour} {shape}"
        client.upload_images(project, paths)

        ml_id = client.add_ml_backend(project, backend.url, title="clip")
        assert client.get_ml_backend(ml_id)["state"] == "CO"  # connected: /health and /setup answered
        version = httpx.post(backend.url + "/setup", json={"project": f"{project}.0", "schema": config}).json()["model_version"]
        client.retrieve_predictions(project)
        tasks = client.list_tasks(project)

    assert len(tasks) == 10
    uploads = [t for t in tasks if t["data"]["image"].startswith("/data/upload/")]
    assert len(uploads) == 5  # fetched by the backend from LS with the personal access token
    hits = 0
    for task in tasks:
        (prediction,) = [p for p in task["predictions"] if p["model_version"] == version]
        (region,) = prediction["result"]
        assert 0.0 <= prediction["score"] <= 1.0 and region["score"] == prediction["score"]
        assert region["top_k"][0]["label"] == region["value"]["choices"][0]  # LS kept top_k
        ref = task["data"]["image"]
        key = ref if ref in expected else ref.rsplit("-", 1)[-1]  # /data/upload/<p>/<hex>-upload_3.png
        hits += region["value"]["choices"][0] == expected[key]
    assert hits >= 9, f"{hits}/10 predictions match the image's label"

    annotate_and_export(client, backend, project, tasks, version)
    client.train(ml_id)
    assert eventually(lambda: backend.counter("backend_webhook_events_total", action="START_TRAINING") >= 1)


def choice(label: str) -> list[dict]:
    return [{"from_name": "animal", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def annotate_and_export(client, backend: BackendProcess, project: int, tasks: list[dict], version: str) -> None:
    """One annotator accepts a proposal, one changes it, one annotates and then deletes."""
    proposed = {t["id"]: t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks}
    accept, change, delete = (t["id"] for t in tasks[:3])
    different = next(label for label in LABELS if label != proposed[change])
    before = backend.counter("backend_corrections_logged_total")
    client.create_annotation(accept, choice(proposed[accept]))
    client.create_annotation(change, choice(different))
    doomed = client.create_annotation(delete, choice(proposed[delete]))
    client.delete_annotation(doomed["id"])
    assert eventually(lambda: backend.counter("backend_corrections_logged_total") == before + 3)

    def export(**params) -> list[dict]:
        response = httpx.get(backend.url + "/export/corrections", timeout=30,
                             params={"format": "jsonl", "project": project,
                                     "trailer": "false", **params})
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line]

    assert eventually(lambda: len(export(include_deleted="true")) == 3)
    rows = {row["task"]: row for row in export()}
    assert set(rows) == {str(accept), str(change)}  # the deleted annotation is not exported
    assert rows[str(accept)]["status"] == "accepted" and rows[str(accept)]["final"] == [proposed[accept]]
    assert rows[str(change)]["status"] == "changed"
    assert rows[str(change)]["predicted"] == [proposed[change]] and rows[str(change)]["final"] == [different]
    for row in rows.values():
        assert row["model_version"] == version and row["annotator"] == 1 and row["control"] == "animal"
        assert row["top_k"] and row["image_ref"] and row["embedding_key"]
    (gone,) = [r for r in export(include_deleted="true") if r["task"] == str(delete)]
    assert gone["deleted_at"] is not None


def test_uploaded_images_fetch_with_legacy_token_and_personal_access_token(label_studio, pat, tmp_path):
    server, client = label_studio
    project = client.create_project("clip-tokens", config_with_testbed_labels("choices_single.xml"))
    image, _, _ = held_out_images(SEEN[:1], 1, seed=2)[0]
    image.save(tmp_path / "token-check.png")
    (task_id,) = client.upload_images(project, [tmp_path / "token-check.png"])
    ref = client.get_task(task_id)["data"]["image"]

    async def fetch(token: str) -> bytes:
        fetcher = ImageFetcher(load_settings())
        try:
            return (await fetcher.fetch(ref, task_id=task_id, ls=LabelStudioAccess(server.url, token))).data
        finally:
            await fetcher.aclose()

    legacy, personal = asyncio.run(fetch(server.token)), asyncio.run(fetch(pat))
    assert legacy == personal == (tmp_path / "token-check.png").read_bytes()


def test_train_button_publishes_a_head_and_label_studio_predicts_with_it(label_studio, backend):
    """Annotate, press Train through the API: /setup answers a new model_version and
    Retrieve predictions stores predictions carrying it."""
    _, client = label_studio
    config = config_with_testbed_labels("choices_single.xml")
    project = client.create_project("clip-e2e-train", config)
    # the pairs zero-shot finds hardest (never seen in the micro CLIP's training): there,
    # eight corrections per label carry enough evidence for the guard
    samples = held_out_images(sorted(UNSEEN_PAIRS), 8, seed=31)
    with LoopbackServer() as images:
        tasks = []
        for i, (image, colour, shape) in enumerate(samples):
            url = images.add(f"/train/{i}.png", Route(png(image), content_type="image/png"))
            tasks.append({"data": {"image": url, "truth": f"{colour} {shape}"}})
        client.import_tasks(project, tasks)
        ml_id = client.add_ml_backend(project, backend.url, title="clip")
        zero_shot = client.get_ml_backend(ml_id)["model_version"]
        client.retrieve_predictions(project)  # embeds every image once
        listed = client.list_tasks(project)
        before = backend.counter("backend_corrections_logged_total")
        for task in listed:
            client.create_annotation(task["id"], choice(task["data"]["truth"]))
        assert eventually(lambda: backend.counter("backend_corrections_logged_total") == before + len(listed))
        client.train(ml_id)

        def settled() -> dict | None:
            # ADAPT_EVERY (20) fits run too: wait until no fit is running or queued
            heads = httpx.get(backend.url + "/heads", params={"project": project}).json()
            return None if heads["fitting"] or not heads["active"] else heads

        assert eventually(settled, timeout=120), json.dumps(httpx.get(
            backend.url + "/heads", params={"project": project}).json()["last_run"])
        adapted = client.get_ml_backend(ml_id)["model_version"]  # LS re-runs /setup here
        assert adapted == f"{zero_shot}:{settled()['active']}"
        client.retrieve_predictions(project)
        after = client.list_tasks(project)
    for task in after:
        versions = {p["model_version"] for p in task["predictions"]}
        assert adapted in versions, versions


def test_prediction_scores_sort_in_label_studio_and_the_review_export_imports(label_studio, backend):
    """The backend sets the project's model_version, so Label Studio's prediction score is
    filled and sortable; a selection export imports into Label Studio with its fields."""
    _, client = label_studio
    config = config_with_testbed_labels("choices_single.xml")
    project = client.create_project("clip-e2e-scores", config)
    samples = held_out_images(sorted(UNSEEN_PAIRS) + SEEN[:5], 2, seed=41)  # mixed confidence
    with LoopbackServer() as images:
        tasks = [{"data": {"image": images.add(f"/scores/{i}.png", Route(png(image),
                                                                      content_type="image/png"))}}
                 for i, (image, _, _) in enumerate(samples)]
        client.import_tasks(project, tasks)
        ml_id = client.add_ml_backend(project, backend.url, title="clip")
        client.retrieve_predictions(project)
        version = client.get_ml_backend(ml_id)["model_version"]
        assert eventually(lambda: client.get_project(project)["model_version"] == version, timeout=30)
        query = json.dumps({"ordering": ["tasks:predictions_score"]})
        listed = client.request("GET", "/api/tasks/", params={"project": project, "query": query,
                                                             "page_size": 100})["tasks"]
        scores = [task["predictions_score"] for task in listed]
        assert len(scores) == len(samples) and None not in scores
        assert scores == sorted(scores) and scores[0] < scores[-1]

        response = httpx.get(backend.url + "/export/selection", timeout=60, params={
            "project": project, "strategy": "uncertainty", "budget": 6, "format": "labelstudio"})
        assert response.status_code == 200, response.text
        review_project = client.create_project("clip-e2e-review", config)
        client.import_tasks(review_project, response.json())
        imported = client.list_tasks(review_project)
    assert len(imported) == 6
    for task in imported:
        assert {"al_priority", "al_rank", "al_reason", "al_source_task"} <= set(task["data"])
        assert task["data"]["image"].startswith("http://127.0.0.1")
