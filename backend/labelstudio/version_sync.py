"""Keep each Label Studio project's `model_version` equal to the version this backend emits.

Label Studio fills the Data Manager's "Prediction score" column (and sorts by it, and runs
uncertainty sampling) only from predictions whose `model_version` equals the *project's*
`model_version`, which defaults to the ML backend's title (label-studio-protocol.md §6). After
predicting for a project, the backend PATCHes the project's `model_version` to what it emitted,
once per new version, in the background, with the token it already has. This is Label Studio's
"stored predictions" mode: the Label Stream shows stored predictions rather than asking the
backend live. SYNC_MODEL_VERSION=false leaves the project alone.

Label Studio accepts a project `model_version` only once a stored prediction carries it, and it
stores the predictions after `/predict` answers: a 400 is retried with growing pauses.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from ..errors import FetchError, ImageRefused
from ..netguard import AddressPolicy, GuardedTransport
from .client import LabelStudioAccess

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
"""Pauses between attempts while Label Studio has not stored the predictions yet (~30 s)."""


class VersionSync:
    def __init__(self, policy: AddressPolicy) -> None:
        self._client = httpx.AsyncClient(
            timeout=TIMEOUT_S, follow_redirects=False, trust_env=False,
            transport=GuardedTransport(policy, httpx.Limits(max_connections=4)))
        self._synced: dict[str, str] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def after_predict(self, project: str | None, version: str,
                      ls: LabelStudioAccess | None) -> None:
        """Schedule the PATCH if this project has not been told this version yet."""
        if project is None or not project.isdigit() or ls is None or not ls.token:
            return
        if self._synced.get(project) == version:
            return
        self._synced[project] = version  # one attempt per version; a failure is logged
        task = asyncio.ensure_future(self._patch(project, version, ls))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def wait(self) -> None:
        """Wait for PATCHes in flight (tests and shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _patch(self, project: str, version: str, ls: LabelStudioAccess) -> None:
        url = ls.absolute(f"/api/projects/{project}/")
        try:
            response = await self._send(url, version, ls)
            for pause in RETRY_PAUSES_S:
                if response.status_code == 401 and ls.token and "." in ls.token:
                    ls.forget_access_token()  # a personal access token's access token expired
                elif response.status_code != 400 or self._synced.get(project) != version:
                    break  # done, refused for good, or a newer version took over
                await asyncio.sleep(pause)
                response = await self._send(url, version, ls)
        except (httpx.HTTPError, FetchError, ImageRefused) as exc:
            log.warning("project %s: could not set model_version in Label Studio (%s); the "
                        "prediction score column stays empty until it is", project, exc)
            self._synced.pop(project, None)
            return
        if response.is_success:
            log.info("project %s: model_version set to %s in Label Studio", project, version)
            return
        if self._synced.get(project) == version:
            self._synced.pop(project)  # the next prediction for the project tries again
        log.warning("project %s: Label Studio answered HTTP %d to setting model_version (%s); "
                    "give LABEL_STUDIO_API_KEY a user who can edit the project, or set "
                    "SYNC_MODEL_VERSION=false", project, response.status_code,
                    response.text[:200])

    async def _send(self, url: str, version: str, ls: LabelStudioAccess) -> httpx.Response:
        headers = await ls.auth_headers(self._client)
        return await self._client.patch(url, json={"model_version": version}, headers=headers)

    async def aclose(self) -> None:
        await self.wait()
        await self._client.aclose()
