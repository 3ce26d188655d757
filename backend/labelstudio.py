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
from typing import Any
from urllib.parse import urlsplit

import httpx

from .errors import FetchError

REFRESH_MARGIN_S = 30.0
"""Refresh a PAT's access token this long before it expires."""


def project_key(project: Any) -> str | None:
    """Label Studio sends the project as "3.1700000000" in /setup and /predict, 3 or {"id": 3}
    in webhooks; all of them mean project 3."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool):
        return None
    text = str(project).split(".")[0].strip()
    return text or None


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


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
