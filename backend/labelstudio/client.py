"""Access to Label Studio: which URL, which token, and the auth header that goes with it.

Label Studio accepts two kinds of API token (label-studio-protocol.md §8):
- a legacy token, sent as `Authorization: Token <key>`;
- a personal access token (PAT), a JWT *refresh* token that is exchanged at
  `POST /api/token/refresh/` for a short-lived access token sent as `Bearer <access>`.

The header is only ever attached to requests for the Label Studio origin itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, NewType
from urllib.parse import urlsplit

import httpx

from .. import metrics
from ..errors import FetchError, ImageRefused, LabelStudioError

Task = dict[str, Any]

REFRESH_MARGIN_S = 30.0
"""Refresh a PAT's access token this long before it expires."""


ProjectId = NewType("ProjectId", str)
"""A Label Studio project id as `project_key` parses it: "3", never "3.1700000000" or 3."""


def project_key(project: Any) -> ProjectId | None:
    """Label Studio sends the project as "3.1700000000" in /setup and /predict, 3 or {"id": 3}
    in webhooks; all of them mean project 3."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool):
        return None
    text = str(project).split(".")[0].strip()
    return ProjectId(text) if text else None


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`; an invalid port is -1, the origin of nothing trusted."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # "Port out of range", "Port could not be cast to integer value"
        port = -1
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def is_personal_access_token(token: str) -> bool:
    """PATs are JWTs (three base64url parts); legacy tokens are opaque hex keys."""
    return token.count(".") == 2 and token.startswith("ey")


def _jwt_expiry(token: str) -> float:
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(data["exp"])
    except (ValueError, KeyError, IndexError, TypeError):
        return time.time() + 60.0  # unknown lifetime: refresh again soon


@dataclass
class LabelStudioAccess:
    """One Label Studio instance as this backend reaches it: base URL and token."""

    url: str
    token: str | None = None
    _access: str | None = field(default=None, repr=False)
    _expires: float = field(default=0.0, repr=False)
    _lock: asyncio.Lock | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    def owns(self, url: str) -> bool:
        """True if `url` points at this Label Studio (same scheme, host and port)."""
        return origin(url) == origin(self.url)

    def absolute(self, path: str) -> str:
        return self.url + ("" if path.startswith("/") else "/") + path

    async def auth_headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        if not self.token:
            return {}
        if not is_personal_access_token(self.token):
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or time.time() > self._expires - REFRESH_MARGIN_S:
            await self._refresh(client)
        return {"Authorization": f"Bearer {self._access}"}

    def forget_access_token(self) -> None:
        """Called after a 401: the next request refreshes the PAT's access token."""
        self._access = None

    async def _refresh(self, client: httpx.AsyncClient) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._access is not None and time.time() < self._expires - REFRESH_MARGIN_S:
                return
            try:
                response = await client.post(self.absolute("/api/token/refresh/"),
                                              json={"refresh": self.token})
            except httpx.HTTPError as exc:
                raise FetchError(f"Label Studio at {self.url} unreachable while refreshing the "
                                 f"personal access token ({type(exc).__name__}).") from None
            if response.status_code != 200:
                raise FetchError(
                    f"Label Studio refused the personal access token (HTTP "
                    f"{response.status_code} from /api/token/refresh/); create a new one in "
                    "Account & Settings and set LABEL_STUDIO_API_KEY."
                )
            self._access = str(response.json()["access"])
            self._expires = _jwt_expiry(self._access)


class LabelStudioAPI:
    """The Label Studio REST calls the pre-label job makes, with explicit timeouts.

    Every call is one HTTP request bounded by `timeout_s`, so no single call holds a job (or
    Label Studio) for long; a failed call raises LabelStudioError naming the fix.
    """

    def __init__(self, access: LabelStudioAccess, *, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.access = access
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                                         trust_env=False, transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def project(self, project: str) -> dict[str, Any]:
        """The project's settings, including `label_config`."""
        result: dict[str, Any] = await self._json("GET", f"/api/projects/{int(project)}/",
                                                  call="project")
        return result

    async def task_page(self, project: str, page: int, page_size: int) -> tuple[int, list[Task]]:
        """(total tasks, one page of tasks with `id`, `data` and `predictions_model_versions`);
        an empty page past the end."""
        params = {"project": int(project), "page": page, "page_size": page_size,
                  "fields": "all", "include": "id,data,predictions_model_versions"}
        try:
            body = await self._json("GET", "/api/tasks/", params=params, call="task_page")
        except LabelStudioError as exc:
            if exc.status == 404 and page > 1:  # Label Studio answers 404 past the last page
                return 0, []
            raise
        return int(body.get("total", 0)), list(body.get("tasks", []))

    async def import_predictions(self, project: str, predictions: list[dict[str, Any]]) -> int:
        """Store predictions in one call (one database transaction in Label Studio)."""
        body = await self._json("POST", f"/api/projects/{int(project)}/import/predictions",
                                json=predictions, call="import_predictions")
        return int(body.get("created", len(predictions)))

    async def _json(self, method: str, path: str, *, call: str, **kwargs: Any) -> Any:
        """One call. Only failures to connect (nothing was sent, so nothing can have been
        stored twice) are retried, twice; an expired access token is refreshed once."""
        url = self.access.absolute(path)
        for attempt in range(3):
            try:
                headers = await self.access.auth_headers(self._client)
            except (FetchError, ImageRefused) as exc:  # the PAT could not be exchanged
                raise LabelStudioError(str(exc)) from None
            try:
                with metrics.LABEL_STUDIO_CALL_SECONDS.labels(call).time():
                    response = await self._client.request(method, url, headers=headers,
                                                          **kwargs)
            except httpx.ConnectError as exc:
                if attempt < 2:
                    await asyncio.sleep(0.5 * 2 ** attempt)
                    continue
                raise LabelStudioError(f"Label Studio at {self.access.url} is unreachable "
                                       f"({exc}); check LABEL_STUDIO_URL") from None
            except httpx.HTTPError as exc:
                raise LabelStudioError(f"{method} {path} to Label Studio failed "
                                       f"({type(exc).__name__}: {exc})") from None
            except ImageRefused as exc:  # the address guard: not a place to send the token
                raise LabelStudioError(f"{method} {path} to Label Studio refused: {exc}") from None
            if (response.status_code == 401 and attempt == 0 and self.access.token
                    and is_personal_access_token(self.access.token)):  # expired early: refresh
                self.access.forget_access_token()
                continue
            return _checked(response, method, path)
        raise LabelStudioError(f"{method} {path}: Label Studio kept refusing the token")


def _checked(response: httpx.Response, method: str, path: str) -> Any:
    status = response.status_code
    if status < 300:
        return response.json()
    hint = {401: "set LABEL_STUDIO_API_KEY to a valid token (Account & Settings)",
            403: "the token's user needs access to this project",
            404: "check the project id"}.get(status, response.text[:200])
    raise LabelStudioError(f"{method} {path}: HTTP {status} from Label Studio — {hint}", status)
