"""Setting the project's model_version in Label Studio, against a loopback stand-in for its API."""

from __future__ import annotations

import asyncio
import json

from backend.labelstudio.client import LabelStudioAccess
from backend.labelstudio.version_sync import VersionSync
from backend.netguard import AddressPolicy

from ..support.http_server import LoopbackServer, Route


def run(server: LoopbackServer, *calls: tuple[str, str]) -> None:
    async def go() -> None:
        sync = VersionSync(AddressPolicy.parse("127.0.0.1", []))
        ls = LabelStudioAccess(server.base, "legacy-token")
        for project, version in calls:
            sync.after_predict(project, version, ls)
        await sync.aclose()
    asyncio.run(go())


def test_the_version_is_set_once_retrying_until_label_studio_has_the_predictions(monkeypatch):
    monkeypatch.setattr("backend.labelstudio.version_sync.RETRY_PAUSES_S", (0.01,) * 5)
    answers = iter([400, 400, 200])
    with LoopbackServer() as server:
        server.add("/api/projects/7/", lambda _: Route(b"{}", next(answers, 200), "application/json"))
        run(server, ("7", "m:p1"), ("7", "m:p1"))
        patches = [r for r in server.requests if r.method == "PATCH"]
    assert len(patches) == 3  # two refusals (predictions not stored yet), then accepted; once
    assert json.loads(patches[-1].body) == {"model_version": "m:p1"}
    assert patches[-1].headers["Authorization"] == "Token legacy-token"


def test_no_token_or_no_numeric_project_means_no_request_and_refusals_do_not_raise(monkeypatch, caplog):
    monkeypatch.setattr("backend.labelstudio.version_sync.RETRY_PAUSES_S", (0.01,))
    with LoopbackServer() as server:
        server.add("/api/projects/8/", Route(b'{"detail": "forbidden"}', 403, "application/json"))
        run(server, ("not-a-number", "m:p1"), ("8", "m:p1"))
        assert [r.path for r in server.requests] == ["/api/projects/8/"]
    assert "SYNC_MODEL_VERSION=false" in caplog.text
