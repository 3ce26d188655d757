"""Pre-label jobs without a Label Studio to talk to: every misconfiguration names its fix.
(The jobs themselves run against a real Label Studio in tests/e2e/test_prelabel_job_e2e.py.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backend.web.app import create_app

from ..support.backend_server import BackendThread
from ..support.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


def tiny_env(tiny_configs, tmp_path) -> dict[str, str]:
    return {"MODEL_CONFIG": str(tiny_configs["clip"]), "MODEL_PRETRAINED": "none",
            "MODEL_DIR": str(tmp_path / "model-dir"), "LOG_LEVEL": "WARNING"}


def test_prelabel_without_label_studio_settings_says_what_to_set(tiny_configs, tmp_path):
    done = cli("prelabel", "--project", "3", **tiny_env(tiny_configs, tmp_path))
    assert done.returncode == 2
    assert "LABEL_STUDIO_URL" in done.stderr and "LABEL_STUDIO_API_KEY" in done.stderr


def test_prelabel_with_label_studio_unreachable_names_the_setting(tiny_configs, tmp_path):
    done = cli("prelabel", "--project", "3", **tiny_env(tiny_configs, tmp_path),
               LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}", LABEL_STUDIO_API_KEY="t0ken1")
    assert done.returncode == 2
    assert "unreachable" in done.stderr and "LABEL_STUDIO_URL" in done.stderr


def test_rq_jobs_and_workers_need_redis(tiny_configs, tmp_path):
    worker = cli("worker", "--burst", **tiny_env(tiny_configs, tmp_path))
    assert worker.returncode == 2 and "REDIS_URL" in worker.stderr


@pytest.fixture
def backend(tiny_settings):
    with BackendThread(create_app(tiny_settings)) as server:
        yield server


def test_http_jobs_answer_with_the_fix_and_unknown_jobs_are_404(backend):
    started = httpx.post(backend.url + "/prelabel", json={"project": 3}, timeout=30)
    assert started.status_code == 503 and "LABEL_STUDIO_URL" in started.json()["detail"]
    assert httpx.post(backend.url + "/prelabel", json={"project": "x"}).status_code == 422
    missing = httpx.get(backend.url + "/prelabel/3-000000000000")
    assert missing.status_code == 404 and "GET /prelabel?project=" in missing.json()["detail"]
    assert httpx.get(backend.url + "/prelabel", params={"project": 3}).json()["jobs"] == []


def test_a_job_whose_process_died_reports_interrupted_with_how_to_resume(tiny_settings, tmp_path):
    from backend.jobs.prelabel import PLANNER, Prelabeler
    from backend.jobs.work import new_owner
    from backend.store.jobs import open_ledger
    from backend.store.sqlite import SqliteStore

    ledger = open_ledger(SqliteStore(tmp_path / "store.sqlite3"))
    jobs = Prelabeler(None, ledger, tiny_settings)  # type: ignore[arg-type]  # status only
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = new_owner().split(":")[0]
    for job, holder in (("1-a", f"{host}:{dead}:x"), ("1-b", new_owner()), ("1-c", None)):
        ledger.update(job, "1", {"id": job, "project": "1", "model_version": "v",
                                 "planning": "running", "executor": "local", "seen": 5})
        if holder:
            ledger.claim(job, [PLANNER], holder, 60)
    assert jobs.status("1-a")["status"] == "interrupted"
    assert "start the job again" in jobs.status("1-a")["error"]
    assert jobs.status("1-b")["status"] == "running"
    assert jobs.status("1-c")["status"] == "interrupted"
    assert [job["status"] for job in jobs.jobs("1")] == ["interrupted", "running", "interrupted"]


@pytest.mark.parametrize("hostname", ["http://169.254.170.23", "http://[fd00:ec2::254]",
                                      "http://169.254.169.254:80"])
def test_a_label_studio_named_by_setup_never_leads_jobs_to_cloud_metadata(backend, hostname):
    import asyncio

    from backend.errors import LabelStudioError
    from backend.jobs.work import label_studio_api

    config = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
              '<Choice value="a"/><Choice value="b"/></Choices></View>')
    setup = {"project": "3.1", "schema": config, "hostname": hostname, "access_token": "t0ken1"}
    assert httpx.post(backend.url + "/setup", json=setup, timeout=30).status_code == 200
    api = label_studio_api(backend.app.state.backend, "3")

    async def read_project() -> None:
        try:
            await api.project("3")
        finally:
            await api.aclose()

    with pytest.raises(LabelStudioError, match="cloud metadata address: refused even as a Label"):
        asyncio.run(read_project())


def test_a_job_ending_while_the_store_is_down_is_logged_not_raised(tiny_settings, caplog):
    """The planner claim is released best-effort: it expires by itself, and an unhandled
    StoreUnavailable here used to surface as "Task exception was never retrieved"."""
    from backend.jobs.prelabel import PLANNER_TTL_S, Prelabeler
    from backend.jobs.work import Job, JobSpec
    from backend.store.jobs import open_ledger
    from backend.store.redis import RedisStore

    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nothing listens
    jobs = Prelabeler(None, open_ledger(down), tiny_settings)  # type: ignore[arg-type]
    spec = JobSpec(id="3-abc", project="3", model_version="v", label_config="", head="zero-shot")
    state = asyncio.run(jobs._plan_and_run(Job(jobs.ledger, spec, jobs.owner), "local"))
    assert state["status"] == "unknown" and "store is unavailable" in state["error"]
    assert f"expires within {PLANNER_TTL_S:.0f} s" in caplog.text
