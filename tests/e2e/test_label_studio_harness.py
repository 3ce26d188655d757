"""Prove the Label Studio harness against a real LS server, and record what LS sends.

The ML-backend test points LS at an in-process recording server and saves the /setup,
/predict and webhook bodies under tests/e2e/recorded/ (when missing, or with
LS_E2E_RECORD=1); otherwise it checks that live LS still sends the recorded shapes.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.label_studio import (
    LabelStudioClient,
    LabelStudioNotInstalled,
    LabelStudioServer,
    create_personal_access_token,
    exchange_personal_access_token,
    find_label_studio,
)

RECORDED_DIR = Path(__file__).parent / "recorded"
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="choice" toName="image">'
    '<Choice value="Cat"/><Choice value="Dog"/>'
    "</Choices></View>"
)
PREDICT_REPLY = {"results": [{"result": [], "score": 0.5, "model_version": "x"}]}


def choice(label: str) -> list[dict[str, Any]]:
    return [
        {
            "from_name": "choice",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


def png_bytes(color: str, size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- a loopback stand-in for an ML backend that records what LS sends -------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class RecordingBackend:
    """Answers /health, /setup, /predict and /webhook like an ML backend; serves /images/*."""

    images: dict[str, bytes] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def bodies(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path.split("?")[0] == path]

    def webhooks(self, action: str) -> list[dict[str, Any]]:
        return [body for body in self.bodies("/webhook") if body.get("action") == action]

    def reply(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method == "GET" and path.startswith("/images/") and path[8:] in self.images:
            return 200, "image/png", self.images[path[8:]]
        answers: dict[str, Any] = {
            "/health": {"status": "UP"},
            "/setup": {"model_version": "x"},
            "/predict": PREDICT_REPLY,
            "/webhook": {},
        }
        if path in answers:
            return 200, "application/json", json.dumps(answers[path]).encode()
        return 404, "application/json", b"{}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                path = self.path.split("?")[0]
                backend.requests.append(Recorded(self.command, path, dict(self.headers), body))
                status, content_type, payload = backend.reply(self.command, path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(label_studio: tuple[LabelStudioServer, LabelStudioClient]) -> LabelStudioServer:
    return label_studio[0]


@pytest.fixture(scope="module")
def client(label_studio: tuple[LabelStudioServer, LabelStudioClient]) -> LabelStudioClient:
    return label_studio[1]


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingBackend]:
    backend = RecordingBackend(
        images={"cat.png": png_bytes("orange"), "dog.png": png_bytes("brown")}
    )
    backend.start()
    yield backend
    backend.stop()


@dataclass
class UploadedProject:
    project_id: int
    task_id: int
    image_url: str
    image_bytes: bytes


@pytest.fixture(scope="module")
def uploaded(
    client: LabelStudioClient, tmp_path_factory: pytest.TempPathFactory
) -> UploadedProject:
    """A project without ML backend holding one uploaded PNG."""
    project_id = client.create_project("harness-upload", LABEL_CONFIG)
    image = tmp_path_factory.mktemp("upload") / "red square.png"
    image.write_bytes(png_bytes("red"))
    (task_id,) = client.upload_images(project_id, [image])
    image_url = client.get_task(task_id)["data"]["image"]
    return UploadedProject(project_id, task_id, image_url, image.read_bytes())


@pytest.fixture(scope="module")
def access_jwt(server: LabelStudioServer, client: LabelStudioClient) -> str:
    return exchange_personal_access_token(server.url, create_personal_access_token(client))


# --- harness and LS basics --------------------------------------------------------------


def test_missing_label_studio_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    venv = tmp_path / "no-venv"
    monkeypatch.setenv("LABEL_STUDIO_VENV", str(venv))
    with pytest.raises(LabelStudioNotInstalled) as error:
        find_label_studio()
    assert f"python3 -m venv {venv} && {venv}/bin/pip install label-studio==1.23.2" in str(
        error.value
    )


@pytest.mark.e2e
def test_server_is_isolated_and_offline(
    server: LabelStudioServer, client: LabelStudioClient
) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert server.data_dir.is_dir() and server.local_files_root.is_dir()
    assert (server.data_dir / "label_studio.sqlite3").is_file()
    assert client.get_project(client.create_project("harness-offline", LABEL_CONFIG))["title"]
    assert server.blocked_outbound_attempts() == [], (
        f"outbound calls attempted, see {server.log_path}"
    )


@pytest.mark.e2e
def test_import_http_tasks(client: LabelStudioClient, recorder: RecordingBackend) -> None:
    project_id = client.create_project("harness-import", LABEL_CONFIG)
    urls = [f"{recorder.url}/images/cat.png", f"{recorder.url}/images/dog.png"]
    task_ids = client.import_tasks(project_id, [{"data": {"image": url}} for url in urls])

    tasks = client.list_tasks(project_id, page_size=1)  # forces pagination

    assert [task["id"] for task in tasks] == task_ids
    assert [task["data"]["image"] for task in tasks] == urls
    assert all(task["predictions"] == [] and task["annotations"] == [] for task in tasks)


@pytest.mark.e2e
def test_upload_gets_data_upload_url(uploaded: UploadedProject) -> None:
    # /data/upload/<project id>/<8 hex chars>-<file name, Django-sanitised: spaces -> "_">
    pattern = rf"/data/upload/{uploaded.project_id}/[0-9a-f]{{8}}-red_square\.png"
    assert re.fullmatch(pattern, uploaded.image_url), uploaded.image_url


@pytest.mark.e2e
def test_upload_served_with_legacy_token(
    client: LabelStudioClient, uploaded: UploadedProject
) -> None:
    response = client.fetch(uploaded.image_url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == uploaded.image_bytes


@pytest.mark.e2e
def test_upload_served_with_pat_bearer(
    server: LabelStudioServer, uploaded: UploadedProject, access_jwt: str
) -> None:
    response = httpx.get(
        server.url + uploaded.image_url,
        headers={"Authorization": f"Bearer {access_jwt}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.content == uploaded.image_bytes


@pytest.mark.e2e
def test_pat_itself_is_not_a_credential(
    server: LabelStudioServer, client: LabelStudioClient
) -> None:
    pat = create_personal_access_token(client)  # replaces the previous PAT
    for scheme in ("Bearer", "Token"):
        response = httpx.get(
            f"{server.url}/api/projects/", headers={"Authorization": f"{scheme} {pat}"}, timeout=30
        )
        assert response.status_code == 401, scheme
    access = exchange_personal_access_token(server.url, pat)
    with LabelStudioClient(server.url, access, auth_scheme="Bearer") as bearer_client:
        assert bearer_client.request("GET", "/api/projects/")["count"] >= 1


@pytest.mark.e2e
def test_upload_refused_without_auth(server: LabelStudioServer, uploaded: UploadedProject) -> None:
    for headers in ({}, {"Authorization": "Token not-the-right-token"}):
        response = httpx.get(server.url + uploaded.image_url, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.content != uploaded.image_bytes


@pytest.mark.e2e
def test_storage_data_endpoint_needs_nginx(
    client: LabelStudioClient, uploaded: UploadedProject
) -> None:
    # The SDK tries this first; plain `label-studio start` (USE_NGINX_FOR_UPLOADS default) says 400.
    filepath = uploaded.image_url.removeprefix("/data/")
    response = client.http.get("/storage-data/uploaded/", params={"filepath": filepath})
    assert response.status_code == 400
    assert "NGINX" in response.json()["detail"]


@pytest.mark.e2e
def test_local_files_served_with_token(
    server: LabelStudioServer, client: LabelStudioClient, uploaded: UploadedProject
) -> None:
    folder = server.local_files_root / "dataset1"
    folder.mkdir()
    image_bytes = png_bytes("blue")
    (folder / "blue.png").write_bytes(image_bytes)
    url = "/data/local-files/?d=dataset1/blue.png"

    assert client.fetch(url).status_code == 404  # no Local Storage covers the folder yet
    client.add_local_storage(uploaded.project_id, folder)
    response = client.fetch(url)

    assert response.status_code == 200
    assert response.content == image_bytes
    assert httpx.get(server.url + url, timeout=30).status_code == 401


@pytest.mark.e2e
def test_presign_cloud_uri_without_storage_is_404(
    server: LabelStudioServer, client: LabelStudioClient, uploaded: UploadedProject
) -> None:
    response = client.presign(uploaded.task_id, "s3://bucket/x.jpg")
    assert response.status_code == 404
    assert response.content == b""
    assert server.blocked_outbound_attempts() == []


@pytest.mark.e2e
def test_create_annotation(client: LabelStudioClient, uploaded: UploadedProject) -> None:
    annotation = client.create_annotation(uploaded.task_id, choice("Dog"), lead_time=1.5)

    assert annotation["task"] == uploaded.task_id
    assert annotation["result"] == choice("Dog")
    assert annotation["completed_by"] == 1
    task = client.get_task(uploaded.task_id)
    assert [a["id"] for a in task["annotations"]] == [annotation["id"]]
    assert task["is_labeled"] is True


# --- ML backend protocol, recorded ------------------------------------------------------


@dataclass
class MLScenario:
    project_id: int
    ml_id: int
    backend_state: dict[str, Any]
    upload_task: int
    http_task: int
    tasks_after_predict: list[dict[str, Any]]


@pytest.fixture(scope="module")
def ml_scenario(
    client: LabelStudioClient, recorder: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> MLScenario:
    """Drive every LS -> backend call once, in the order a real project would."""
    project_id = client.create_project("harness-ml", LABEL_CONFIG)
    ml_id = client.add_ml_backend(project_id, recorder.url, title="clip")
    backend_state = client.get_ml_backend(ml_id)
    image = tmp_path_factory.mktemp("ml") / "green.png"
    image.write_bytes(png_bytes("green"))
    (upload_task,) = client.upload_images(project_id, [image])
    (http_task,) = client.import_tasks(
        project_id, [{"data": {"image": f"{recorder.url}/images/cat.png"}}]
    )
    # Not get_task(): with show_collab_predictions on, opening a task calls /predict itself.
    client.retrieve_predictions(project_id, [upload_task])
    tasks = client.list_tasks(project_id)
    annotation = client.create_annotation(upload_task, choice("Dog"))
    client.update_annotation(annotation["id"], result=choice("Cat"))
    client.delete_annotation(annotation["id"])
    client.train(ml_id)
    client.patch_project(project_id, model_version="x")
    client.delete_tasks(project_id, [http_task])
    return MLScenario(project_id, ml_id, backend_state, upload_task, http_task, tasks)


@pytest.mark.e2e
def test_ml_backend_connects_and_gets_webhook(
    client: LabelStudioClient, recorder: RecordingBackend, ml_scenario: MLScenario
) -> None:
    assert ml_scenario.backend_state["state"] == "CO"
    assert ml_scenario.backend_state["model_version"] == "x"
    assert client.get_project(ml_scenario.project_id)["model_version"] == "x"  # after the PATCH
    (webhook,) = client.list_webhooks(ml_scenario.project_id)
    assert webhook["url"] == f"{recorder.url}/webhook"
    assert webhook["send_payload"] is True and webhook["send_for_all_actions"] is True
    assert webhook["headers"] == {}


@pytest.mark.e2e
def test_setup_request(
    server: LabelStudioServer, recorder: RecordingBackend, ml_scenario: MLScenario
) -> None:
    setup = recorder.bodies("/setup")[0]
    assert set(setup) == {"project", "schema", "hostname", "access_token", "extra_params"}
    assert re.fullmatch(rf"{ml_scenario.project_id}\.\d+", setup["project"])
    assert setup["schema"] == LABEL_CONFIG
    assert setup["hostname"] == server.url  # LABEL_STUDIO_HOST
    assert setup["access_token"] == server.token  # the creator's legacy token
    assert setup["extra_params"] is None
    health = [r for r in recorder.requests if r.path == "/health"]
    assert health and health[0].method == "GET"
    assert health[0].headers["User-Agent"].startswith("heartex/1.23.2")


@pytest.mark.e2e
def test_predict_request_and_stored_prediction(
    recorder: RecordingBackend, ml_scenario: MLScenario
) -> None:
    (predict,) = recorder.bodies("/predict")
    assert set(predict) == {"tasks", "project", "label_config", "params"}
    assert predict["params"] == {"login": None, "password": None, "context": None}
    (task,) = predict["tasks"]
    assert task["id"] == ml_scenario.upload_task
    assert task["data"]["image"].startswith("/data/upload/")
    # LS stores a prediction even when its `result` list is empty.
    by_id = {t["id"]: t for t in ml_scenario.tasks_after_predict}
    (prediction,) = by_id[ml_scenario.upload_task]["predictions"]
    assert (prediction["result"], prediction["score"], prediction["model_version"]) == (
        [],
        0.5,
        "x",
    )
    assert by_id[ml_scenario.http_task]["predictions"] == []


@pytest.mark.e2e
def test_webhook_bodies(recorder: RecordingBackend, ml_scenario: MLScenario) -> None:
    actions = [body["action"] for body in recorder.bodies("/webhook")]
    assert actions == [
        "TASKS_CREATED",
        "TASKS_CREATED",
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "START_TRAINING",
        "PROJECT_UPDATED",
        "TASKS_DELETED",
    ]
    created = recorder.webhooks("ANNOTATION_CREATED")[0]
    assert set(created) == {"action", "annotation", "task", "project"}
    assert created["task"]["id"] == ml_scenario.upload_task
    assert created["annotation"]["completed_by"] == 1
    assert created["annotation"]["result"] == choice("Dog")
    deleted = recorder.webhooks("ANNOTATIONS_DELETED")[0]
    assert set(deleted) == {"action", "annotations", "project"}
    assert set(recorder.webhooks("START_TRAINING")[0]) == {"action", "project"}
    assert recorder.webhooks("TASKS_DELETED")[0]["tasks"] == [{"id": ml_scenario.http_task}]
    assert all("Authorization" not in r.headers for r in recorder.requests)


@pytest.mark.e2e
def test_recordings_match_fixtures(
    server: LabelStudioServer, recorder: RecordingBackend, ml_scenario: MLScenario
) -> None:
    live = recorded_bodies(recorder)
    record = os.environ.get("LS_E2E_RECORD") == "1"
    RECORDED_DIR.mkdir(exist_ok=True)
    for name, body in live.items():
        path = RECORDED_DIR / name
        redacted = redact(body, server.token)
        if record or not path.exists():
            path.write_text(json.dumps(redacted, indent=2, sort_keys=True) + "\n")
        saved = json.loads(path.read_text())
        assert shape(saved) == shape(redacted), (
            f"LS now sends a different {name}; rerun with LS_E2E_RECORD=1"
        )
    assert server.token not in "".join(p.read_text() for p in RECORDED_DIR.glob("*.json"))


def recorded_bodies(recorder: RecordingBackend) -> dict[str, Any]:
    bodies: dict[str, Any] = {
        "setup.json": recorder.bodies("/setup")[0],
        "predict.json": recorder.bodies("/predict")[0],
    }
    for action in dict.fromkeys(body["action"] for body in recorder.bodies("/webhook")):
        # The first TASKS_CREATED is the upload, with its /data/upload URL.
        bodies[f"webhook_{action.lower()}.json"] = recorder.webhooks(action)[0]
    return bodies


def redact(value: Any, token: str) -> Any:
    """Replace the LS token, and the project's own invite token, with "REDACTED"."""
    if isinstance(value, dict):
        return {
            key: "REDACTED" if key in {"access_token", "token"} and item else redact(item, token)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item, token) for item in value]
    if isinstance(value, str) and token in value:
        return value.replace(token, "REDACTED")
    return value


def shape(value: Any) -> Any:
    """The key structure, recursively (lists by their first item); leaf values ignored."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "*"
