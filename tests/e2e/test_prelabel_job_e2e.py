"""Whole-project pre-label jobs against a real Label Studio: a crash midway and a restart, two
RQ workers sharing one job through Redis, and the HTTP endpoint re-scoring from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.label_studio import LabelStudioClient, LabelStudioError, LabelStudioServer
from tests.support.backend_process import BackendProcess
from tests.support.http_server import LoopbackServer, Route
from tests.support.microclip import COLOURS, SHAPES, ZERO_SHOT_TEMPLATES, held_out_images
from tests.support.testbed_server import choices_config, png
from tests.support.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]


@pytest.fixture
def images() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


def job_env(server: LabelStudioServer, micro_clip, model_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MODEL_CONFIG": str(micro_clip.config_path),
            "MODEL_PRETRAINED": str(micro_clip.checkpoint_path),
            "TEMPLATES": "|".join(ZERO_SHOT_TEMPLATES), "LABEL_STUDIO_URL": server.url,
            "LABEL_STUDIO_API_KEY": server.token, "IMAGE_URL_ALLOWLIST": "127.0.0.1",
            "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1", **extra}


def project_with_images(client: LabelStudioClient, images: LoopbackServer, title: str,
                        count: int, delay_s: float = 0.0) -> tuple[int, list[int]]:
    project = client.create_project(title, choices_config())
    samples = held_out_images(PAIRS, count // len(PAIRS) + 1, seed=len(title))[:count]
    tasks = [{"data": {"image": images.add(f"/{title}/{i}.png", Route(
        png(image), content_type="image/png", delay_s=delay_s))}}
        for i, (image, _, _) in enumerate(samples)]
    return project, client.import_tasks(project, tasks)


def predictions_by_task(client: LabelStudioClient, project: int) -> dict[int, list[str]]:
    """Every task's stored prediction versions, one entry per prediction."""
    found: dict[int, list[str]] = {}
    page = 1
    while True:
        try:
            body = client.request("GET", "/api/tasks/", params={
                "project": project, "page": page, "page_size": 100, "fields": "all"})
        except LabelStudioError as exc:  # LS answers 404 past the last page
            if exc.response.status_code == 404:
                return found
            raise
        if not body["tasks"]:
            return found
        for task in body["tasks"]:
            found[task["id"]] = [p["model_version"] for p in task["predictions"]]
        page += 1


def prelabel(env: dict[str, str], project: int, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project",
                             str(project), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finished(process: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


def test_a_job_killed_midway_resumes_and_every_task_gets_exactly_one_prediction(
        label_studio, micro_clip, images, tmp_path):
    server, client = label_studio
    project, ids = project_with_images(client, images, "resume", 200, delay_s=0.02)
    env = job_env(server, micro_clip, tmp_path / "model-dir", PRELABEL_ITEM_TASKS="10")

    def written() -> int:
        return sum(map(bool, predictions_by_task(client, project).values()))

    first = prelabel(env, project)
    assert eventually(lambda: written() >= 40, timeout=300, interval=0.2)
    first.kill()  # a crash: no cleanup, claims and the planner's lease left behind
    first.wait()
    before = written()
    assert 40 <= before < 200, "the job must be killed midway"

    final = finished(prelabel(env, project))
    stored = predictions_by_task(client, project)
    assert sorted(stored) == sorted(ids)
    assert {len(versions) for versions in stored.values()} == {1}
    assert {versions[0] for versions in stored.values()} == {final["model_version"]}
    assert final["status"] == "done" and final["done"] == 200 and final["failed"] == 0
    assert final["skipped"] >= before  # the restart skipped what Label Studio already had

    again = finished(prelabel(env, project))  # idempotent: nothing left to do
    assert again["skipped"] == 200 and predictions_by_task(client, project) == stored


def test_two_rq_workers_share_one_job_and_each_task_is_done_once(
        label_studio, micro_clip, images, redis_url, tmp_path):
    import redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    server, client = label_studio
    project, ids = project_with_images(client, images, "workers", 120, delay_s=0.03)
    env = job_env(server, micro_clip, tmp_path / "model-dir", REDIS_URL=redis_url,
                  PRELABEL_ITEM_TASKS="5")
    planned = finished(prelabel(env, project, "--executor", "rq", "--no-wait"))
    assert planned["status"] == "running" and planned["executor"] == "rq"

    workers = [subprocess.Popen([sys.executable, "-m", "backend", "worker", "--burst"], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]

    stored = predictions_by_task(client, project)
    assert sorted(stored) == sorted(ids)
    assert {len(versions) for versions in stored.values()} == {1}
    queue = Queue("clip-backend-prelabel", connection=redis.Redis.from_url(redis_url))
    registry = FinishedJobRegistry(queue=queue)
    names = {queue.fetch_job(job).worker_name for job in registry.get_job_ids()}
    assert len(registry.get_job_ids()) == 24 and len(names) == 2  # both worked, all items done

    final = finished(prelabel(env, project, "--executor", "rq"))  # a re-run finds nothing to do
    assert final["status"] == "done" and final["done"] == 120 and final["skipped"] == 120


def test_http_job_reports_progress_and_a_new_label_set_rescores_without_encoding(
        label_studio, micro_clip, images, tmp_path):
    server, client = label_studio
    project, ids = project_with_images(client, images, "http-job", 60)
    (broken,) = client.import_tasks(project, [{"data": {"image": images.url("/missing.png")}}])
    env = job_env(server, micro_clip, tmp_path / "model-dir", PRELABEL_ITEM_TASKS="16")
    with BackendProcess(env, tmp_path / "backend.log") as backend:
        first = run_over_http(backend, project)
        encoded = backend.counter("backend_images_encoded_total")
        config = choices_config().replace("</Choices>", '<Choice value="silver star"/></Choices>')
        client.patch_project(project, label_config=config)  # a new label: a new model_version
        # what the job reads next (eventually: a loaded Label Studio once served the old one)
        assert eventually(lambda: client.get_project(project)["label_config"] == config,
                          timeout=30, interval=0.25)
        second = run_over_http(backend, project)
        assert backend.counter("backend_images_encoded_total") == encoded  # all from the cache
    assert first["model_version"] != second["model_version"], (first, second)
    for job in (first, second):
        assert (job["status"], job["done"], job["failed"], job["total"]) == ("done", 60, 1, 61)
        assert "HTTP 404" in job["failures"][str(broken)]  # the one bad image, and why
    stored = predictions_by_task(client, project)
    assert stored.pop(broken) == []
    assert {tuple(sorted(v)) for v in stored.values()} == {
        tuple(sorted((first["model_version"], second["model_version"])))}


def run_over_http(backend: BackendProcess, project: int) -> dict:
    started = httpx.post(backend.url + "/prelabel", json={"project": project}, timeout=30)
    assert started.status_code == 202, started.text
    job = started.json()["id"]
    listing = httpx.get(backend.url + "/prelabel", params={"project": project}, timeout=10)
    assert job in [entry["id"] for entry in listing.json()["jobs"]]

    states: list[dict] = []

    def finished_job() -> bool:
        states.append(httpx.get(f"{backend.url}/prelabel/{job}", timeout=10).json())
        return states[-1]["status"] != "running"

    assert eventually(finished_job, timeout=300, interval=0.25), states[-1]
    return states[-1]
