"""Drive a real Label Studio server from end-to-end tests.

`LabelStudioServer` runs `label-studio start` on 127.0.0.1 with a throw-away data directory
and every outbound service switched off; `LabelStudioClient` wraps the REST calls the tests
need (see /work/shared/docs/label-studio-protocol.md §12).

Personal access tokens (LS >= 1.22): `POST /api/token/` creates a JWT refresh token for the
calling user and answers `{"token": "<PAT>"}` (409 if the user already holds one). Exchange it
with `POST /api/token/refresh/` `{"refresh": PAT}` -> `{"access": JWT}` and send
`Authorization: Bearer <JWT>`. Access JWTs live 5 minutes (simplejwt default).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_VENV = Path.home() / ".cache" / "clip-backend" / "label-studio-venv"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "e2e-admin-password"

# Host variables passed through to the server; everything else is dropped so that a
# developer's LABEL_STUDIO_*, DJANGO_DB, REDIS_* or proxy settings cannot leak in.
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")

OFFLINE_ENV: dict[str, str] = {
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    # Community settings default both DSNs to HumanSignal's Sentry projects.
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
    # Otherwise LS queries pypi.org when core.utils.common is imported.
    "LATEST_VERSION_CHECK": "false",
    # LaunchDarkly: the bundled flag file is read with send_events=False; without it, offline mode.
    "FEATURE_FLAGS_OFFLINE": "true",
    "GOOGLE_LOGGING_ENABLED": "false",
    "LOCAL_FILES_SERVING_ENABLED": "true",
    "PYTHONUNBUFFERED": "1",
    "LOG_LEVEL": "INFO",
}

_CLIENT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)

OUTBOUND_MARKER = "E2E-BLOCKED-OUTBOUND"

# Installed as sitecustomize in the server's interpreter: refuses (and logs) any connection
# or name lookup that does not stay on loopback, so a forgotten phone-home fails loudly.
_NETWORK_GUARD = f"""
import ipaddress, socket, sys

def _local(host):
    if host in (None, "", "localhost") or str(host).endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False

def _guard(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _local(address[0]):
            print("{OUTBOUND_MARKER} connect", address, file=sys.stderr, flush=True)
            raise ConnectionRefusedError("e2e network guard: outbound connection blocked")
    elif event == "socket.getaddrinfo" and not _local(args[0]):
        print("{OUTBOUND_MARKER} getaddrinfo", args[0], file=sys.stderr, flush=True)
        raise socket.gaierror(socket.EAI_NONAME, "e2e network guard: lookup blocked")

sys.addaudithook(_guard)
"""


def label_studio_venv() -> Path:
    """The virtualenv holding Label Studio: `$LABEL_STUDIO_VENV`, else the default path."""
    configured = os.environ.get("LABEL_STUDIO_VENV")
    return Path(configured).expanduser() if configured else DEFAULT_VENV


def install_hint(venv: Path | None = None) -> str:
    venv = venv or label_studio_venv()
    return (
        f"Label Studio {LABEL_STUDIO_VERSION} is not installed at {venv}. Install it with:\n"
        f"  python3 -m venv {venv} && {venv}/bin/pip install label-studio=={LABEL_STUDIO_VERSION}\n"
        "(set LABEL_STUDIO_VENV to use another location, or SKIP_E2E=1 to skip e2e tests)"
    )


class LabelStudioNotInstalled(RuntimeError):
    """The `label-studio` executable is missing from the configured virtualenv."""


def find_label_studio() -> Path:
    """Path of the `label-studio` executable in `$LABEL_STUDIO_VENV/bin`."""
    venv = label_studio_venv()
    executable = venv / "bin" / "label-studio"
    if not (executable.is_file() and os.access(executable, os.X_OK)):
        raise LabelStudioNotInstalled(install_hint(venv))
    return executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabelStudioStartupError(RuntimeError):
    pass


class PortTakenError(LabelStudioStartupError):
    pass


class LabelStudioServer:
    """A `label-studio start` process on 127.0.0.1 with a fresh data dir; a context manager."""

    def __init__(
        self,
        *,
        token: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 300.0,
        executable: Path | None = None,
        keep_files: bool = False,
        block_outbound: bool = True,
    ) -> None:
        self.token = token or secrets.token_hex(20)
        if len(self.token) <= 5:
            raise ValueError("LS silently ignores --user-token values of 5 characters or fewer")
        self.username = ADMIN_EMAIL
        self.password = ADMIN_PASSWORD
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.keep_files = keep_files
        self.block_outbound = block_outbound
        self.executable = executable or find_label_studio()
        self.work_dir = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
        self.data_dir = self.work_dir / "data"
        self.local_files_root = self.work_dir / "local-files"
        self.log_path = self.work_dir / "label-studio.log"
        self.port = 0
        self.url = ""
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        env = {key: os.environ[key] for key in _PASSTHROUGH_ENV if key in os.environ}
        env.update(OFFLINE_ENV)
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LOCAL_FILES_DOCUMENT_ROOT=str(self.local_files_root),
            LABEL_STUDIO_HOST=self.url,
        )
        if self.block_outbound:
            env["PYTHONPATH"] = str(self._write_network_guard())
        env.update(self.extra_env)
        return env

    def _write_network_guard(self) -> Path:
        guard_dir = self.work_dir / "network-guard"
        guard_dir.mkdir(exist_ok=True)
        (guard_dir / "sitecustomize.py").write_text(_NETWORK_GUARD)
        return guard_dir

    def blocked_outbound_attempts(self) -> list[str]:
        """Log lines of connections/lookups the network guard refused."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if OUTBOUND_MARKER in line]

    def command(self) -> list[str]:
        return [
            str(self.executable), "start",
            "--no-browser",
            "--internal-host", "127.0.0.1",
            "--port", str(self.port),
            "--username", self.username,
            "--password", self.password,
            "--user-token", self.token,
        ]  # fmt: skip

    def start(self, attempts: int = 3) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.local_files_root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                break
            except PortTakenError:
                if attempt == attempts:
                    raise
        self.startup_seconds = time.monotonic() - started

    def _start_once(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.command(),
            cwd=self.work_dir,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so stop() reaches runserver's children
        )
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        headers = {"Authorization": f"Token {self.token}"}
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(5.0), headers=headers) as http:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    # An authenticated call proves it is our server, migrated and with the user.
                    if http.get("/api/projects/").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise LabelStudioStartupError(
            f"Label Studio not ready at {self.url} after {self.startup_timeout:.0f}s; "
            f"log: {self.log_path}"
        )

    def _check_alive(self) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            raise LabelStudioStartupError(
                f"Label Studio exited with code {self._process.returncode} during startup; "
                f"log: {self.log_path}\n{self.log_tail()}"
            )
        # LS moves to the next port instead of failing when ours was taken meanwhile.
        if f"Port {self.port} is in use" in self.log_tail(4000):
            raise PortTakenError(f"port {self.port} was taken; log: {self.log_path}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - size))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        self._terminate()
        if not self.keep_files:
            shutil.rmtree(self.work_dir, ignore_errors=True)


class LabelStudioError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        request = response.request
        super().__init__(
            f"{request.method} {request.url} -> {response.status_code}: {response.text[:2000]}"
        )
        self.response = response


class LabelStudioClient:
    """Minimal typed wrapper of the Label Studio REST API (legacy `Token` auth)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: httpx.Timeout = _CLIENT_TIMEOUT,
        auth_scheme: str = "Token",
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers={"Authorization": f"{auth_scheme} {token}"},
            follow_redirects=False,
        )

    @classmethod
    def for_server(cls, server: LabelStudioServer) -> LabelStudioClient:
        return cls(server.url, server.token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; raise `LabelStudioError` on non-2xx; return parsed JSON or None."""
        response = self.http.request(method, path, **kwargs)
        if not response.is_success:
            raise LabelStudioError(response)
        if not response.content:
            return None
        return response.json()

    # projects

    def create_project(self, title: str, label_config: str, **fields: Any) -> int:
        body = {"title": title, "label_config": label_config, **fields}
        return int(self.request("POST", "/api/projects/", json=body)["id"])

    def get_project(self, project_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/projects/{project_id}/"))

    def patch_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/api/projects/{project_id}/", json=fields))

    # tasks

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        reply = self.request(
            "POST",
            f"/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        return [int(task_id) for task_id in reply["task_ids"]]

    def upload_images(self, project_id: int, paths: Iterable[Path]) -> list[int]:
        """Multipart file import: each image becomes a task with a `/data/upload/...` URL."""
        handles = [path.open("rb") for path in paths]
        try:
            # one form field per file: LS reads request.FILES per key, so a shared key keeps one
            files = [(f"file_{i}", (Path(h.name).name, h, _image_mime(Path(h.name))))
                     for i, h in enumerate(handles)]
            reply = self.request(
                "POST",
                f"/api/projects/{project_id}/import",
                params={"return_task_ids": "true"},
                files=files,
            )
        finally:
            for handle in handles:
                handle.close()
        return [int(task_id) for task_id in reply["task_ids"]]

    def list_tasks(self, project_id: int, *, page_size: int = 100) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            params = {"project": project_id, "fields": "all", "page": page, "page_size": page_size}
            reply = self.request("GET", "/api/tasks/", params=params)
            tasks.extend(reply["tasks"])
            if not reply["tasks"] or len(tasks) >= int(reply["total"]):
                return tasks
            page += 1

    def get_task(self, task_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/tasks/{task_id}/"))

    def delete_tasks(self, project_id: int, task_ids: list[int]) -> Any:
        return self.run_action(project_id, "delete_tasks", _selection(task_ids))

    # annotations

    def create_annotation(
        self, task_id: int, result: list[dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        body = {"result": result, **extra}
        return dict(self.request("POST", f"/api/tasks/{task_id}/annotations/", json=body))

    def update_annotation(self, annotation_id: int, **fields: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/api/annotations/{annotation_id}/", json=fields))

    def delete_annotation(self, annotation_id: int) -> None:
        self.request("DELETE", f"/api/annotations/{annotation_id}/")

    # ML backends and predictions

    def add_ml_backend(self, project_id: int, url: str, title: str = "clip", **fields: Any) -> int:
        """Register a backend; LS calls its /health and /setup before answering."""
        body = {"url": url, "project": project_id, "title": title, **fields}
        return int(self.request("POST", "/api/ml/", json=body)["id"])

    def get_ml_backend(self, ml_id: int) -> dict[str, Any]:
        """Backend state (`state`, `model_version`, ...); LS re-runs /health and /setup here."""
        return dict(self.request("GET", f"/api/ml/{ml_id}"))

    def train(self, ml_id: int) -> Any:
        return self.request("POST", f"/api/ml/{ml_id}/train")

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> Any:
        """Data Manager action: one /predict call for the selected tasks (all when None)."""
        return self.run_action(project_id, "retrieve_tasks_predictions", _selection(task_ids))

    def run_action(self, project_id: int, action: str, selection: dict[str, Any]) -> Any:
        params = {"id": action, "project": project_id}
        return self.request(
            "POST", "/api/dm/actions/", params=params, json={"selectedItems": selection}
        )

    def list_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/webhooks/", params={"project": project_id}))

    # storage

    def add_local_storage(
        self, project_id: int, path: Path, title: str = "local", **fields: Any
    ) -> int:
        """Local Files import storage; required for `/data/local-files/?d=...` to be served.

        `path` must be a directory strictly below LOCAL_FILES_DOCUMENT_ROOT.
        """
        body = {
            "project": project_id,
            "path": str(path),
            "title": title,
            "use_blob_urls": True,
            **fields,
        }
        return int(self.request("POST", "/api/storages/localfiles/", json=body)["id"])

    # raw file access

    def fetch(
        self, path_or_url: str, *, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """GET a media URL (relative or absolute) with this client's auth, no redirects."""
        return self.http.get(path_or_url, headers=headers)

    def presign(self, task_id: int, uri: str) -> httpx.Response:
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self.http.get(f"/tasks/{task_id}/presign/", params={"fileuri": fileuri})


def create_personal_access_token(
    client: LabelStudioClient, *, replace_existing: bool = True
) -> str:
    """Return a new Personal Access Token (JWT refresh token) for the client's user.

    Needs `api_tokens_enabled` in the organization's JWT settings (on by default for
    organizations LS creates; switched on here if not). A user may hold one PAT: with
    `replace_existing`, existing ones are blacklisted first (LS lists them truncated,
    which its blacklist endpoint accepts).
    """
    settings = client.request("GET", "/api/jwt/settings")
    if not settings["api_tokens_enabled"]:
        client.request("POST", "/api/jwt/settings", json={**settings, "api_tokens_enabled": True})
    if replace_existing:
        for existing in client.request("GET", "/api/token/"):
            client.request("POST", "/api/token/blacklist/", json={"refresh": existing["token"]})
    return str(client.request("POST", "/api/token/")["token"])


def exchange_personal_access_token(url: str, pat: str, *, timeout: float = 30.0) -> str:
    """`POST /api/token/refresh/` {"refresh": PAT} -> the access JWT for `Bearer` auth."""
    response = httpx.post(
        f"{url.rstrip('/')}/api/token/refresh/", json={"refresh": pat}, timeout=timeout
    )
    if not response.is_success:
        raise LabelStudioError(response)
    return str(response.json()["access"])


def _selection(task_ids: list[int] | None) -> dict[str, Any]:
    if task_ids is None:
        return {"all": True, "excluded": []}
    return {"all": False, "included": list(task_ids)}


def _image_mime(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg"}.get(suffix, f"image/{suffix or 'png'}")
