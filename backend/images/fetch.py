"""Task image reference → bytes.

References are resolved the way Label Studio's SDK resolves them (label-studio-protocol.md §10),
but downloads are concurrent, bounded, size-capped and time-limited:

| reference                                 | fetched from                                      |
|-------------------------------------------|---------------------------------------------------|
| `data:image/...;base64,...`               | decoded inline                                    |
| `/data/upload/...`, `upload/...`          | Label Studio, with its token                      |
| `/data/local-files/?d=rel`                | LOCAL_FILES_DOCUMENT_ROOT/rel if present, else LS |
| other `/...` paths                        | Label Studio, with its token                      |
| `s3://`, `gs://`, `azure-blob://`, ...    | LS presign endpoint for the task, then redirect   |
| `http(s)://` on the Label Studio origin   | Label Studio, with its token                      |
| any other `http(s)://`                    | directly, never with the token                    |

Redirects are followed by hand. The token (and the trust a Label Studio host named in /setup
gets) goes only to the project's Label Studio origin, and only while every hop so far was on
it: a redirect off Label Studio drops it for good, and a foreign URL that redirects into
Label Studio never gets it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, parse_qs, quote, unquote, unquote_to_bytes, urljoin, urlsplit

import aiohttp
import httpx
import yarl

from .. import metrics
from ..config import Settings
from ..errors import FetchError, ImageRefused
from ..labelstudio.client import LabelStudioAccess, is_personal_access_token, origin
from ..netguard import (
    AddressPolicy,
    GuardedResolver,
    GuardedTransport,
    guarded_connector,
    ssl_context,
)

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "clip-prelabel-backend"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None
    source: str
    """Where the bytes came from, for error messages (never contains a token)."""


def address_policy(settings: Settings) -> AddressPolicy:
    """Which addresses task images may come from: public ones, the Label Studio host and
    IMAGE_URL_ALLOWLIST (`.for_label_studio()`: for requests to Label Studio itself)."""
    ls_hosts = [origin(settings.LABEL_STUDIO_URL)[1]] if settings.LABEL_STUDIO_URL else []
    return AddressPolicy.parse(settings.IMAGE_URL_ALLOWLIST, ls_hosts)


class ImageFetcher:
    """Downloads task images with one shared client, a concurrency cap and hard limits.

    Images come over aiohttp (about a seventh of httpx's CPU per image, measured in
    bench/data_plane.py); the Label Studio API calls a personal access token needs go over
    httpx, as every other Label Studio call does. Both connect only where the address guard
    allows (netguard)."""

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.MAX_IMAGE_BYTES
        self.deadline_s = settings.FETCH_TIMEOUT_S
        self.local_root = settings.LOCAL_FILES_DOCUMENT_ROOT
        self.settings = settings
        self._limit = asyncio.Semaphore(settings.FETCH_CONCURRENCY)
        self.policy = address_policy(settings)
        self.ls_policy = self.policy.for_label_studio()
        """For requests to a project's own Label Studio origin, and nothing else."""
        self._sessions: _Sessions | None = None
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
        self._ls_api = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.FETCH_TIMEOUT_S, connect=settings.CONNECT_TIMEOUT_S),
            follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT},
            transport=GuardedTransport(self.ls_policy, limits))

    def _open(self) -> _Sessions:
        """This event loop's sessions (made on first use: aiohttp binds them to a loop)."""
        loop = asyncio.get_running_loop()
        if self._sessions is None or self._sessions.loop is not loop:
            self._sessions = _Sessions(loop, _session(self.settings, self.policy),
                                       # Its own connection pool: a connection opened under
                                       # Label Studio trust is never reused for a URL that is
                                       # not some project's Label Studio origin.
                                       _session(self.settings, self.ls_policy))
        return self._sessions

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, None
        if sessions is not None and not sessions.loop.is_closed():
            await sessions.general.session.close()
            await sessions.label_studio.session.close()
        await self._ls_api.aclose()

    async def fetch(self, ref: str, *, task_id: int | None = None,
                    ls: LabelStudioAccess | None = None) -> Fetched:
        """Bytes of the image `ref` names. Raises ImageRefused or FetchError."""
        if not isinstance(ref, str) or not ref.strip():
            raise ImageRefused("the task's image field is empty or not a string")
        ref = ref.strip()
        if is_data_uri(ref):
            return self._inline(ref)
        async with self._limit:
            try:
                fetched = await asyncio.wait_for(self._fetch(ref, task_id, ls), self.deadline_s)
            except asyncio.TimeoutError:
                raise FetchError(f"timed out after {self.deadline_s:g} s fetching {_safe(ref)} "
                                 "(raise FETCH_TIMEOUT_S for slow storage)") from None
        metrics.IMAGES_FETCHED.inc()
        return fetched

    async def _fetch(self, ref: str, task_id: int | None, ls: LabelStudioAccess | None) -> Fetched:
        scheme = _parsed(ref).scheme.lower()
        if scheme in ("http", "https"):
            if ls is not None and ls.owns(ref):
                _check_local_files(ref)
            return await self._download(ref, ls)
        if scheme in CLOUD_SCHEMES:
            return await self._download(_presign_url(ref, task_id, _need_ls(ls, ref)), ls)
        if scheme == "" and ref.startswith(("/", "upload/")):
            local = self._local_file(ref)
            if local is not None:
                return await asyncio.to_thread(self._read_file, local, ref)
            return await self._download(_need_ls(ls, ref).absolute(ref), ls)
        raise ImageRefused(
            f"unsupported image reference {_safe(ref)}: expected http(s)://, data:, a Label "
            "Studio path (/data/upload/..., /data/local-files/?d=...) or "
            + ", ".join(CLOUD_SCHEMES)
        )

    def _inline(self, ref: str) -> Fetched:
        header, sep, payload = ref.partition(",")
        if not sep:
            raise ImageRefused("malformed data: URI (no comma)")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise FetchError(f"data: URI larger than MAX_IMAGE_BYTES={self.max_bytes}")
        try:
            data = (base64.b64decode(payload, validate=False) if header.endswith(";base64")
                    else unquote_to_bytes(payload))
        except (binascii.Error, ValueError):
            raise ImageRefused("malformed data: URI (invalid base64)") from None
        content_type = header[5:].split(";")[0] or None
        return Fetched(data, content_type, "data: URI")

    def _local_file(self, ref: str) -> Path | None:
        """The local copy of a /data/local-files/ reference, confined to the document root."""
        paths = _check_local_files(ref)
        if paths is None or self.local_root is None:
            return None
        rel = paths[-1] if paths else ""  # Label Studio (Django) reads the last d=
        root = self.local_root.resolve()
        path = (root / rel).resolve()
        if not rel or not path.is_relative_to(root):
            raise ImageRefused(f"local-files path {rel!r} escapes LOCAL_FILES_DOCUMENT_ROOT")
        return path if path.is_file() else None

    def _read_file(self, path: Path, ref: str) -> Fetched:
        size = path.stat().st_size
        if size > self.max_bytes:
            raise FetchError(f"{_safe(ref)} is {size} bytes, over MAX_IMAGE_BYTES={self.max_bytes}")
        return Fetched(path.read_bytes(), None, f"local file for {_safe(ref)}")

    async def _download(self, url: str, ls: LabelStudioAccess | None) -> Fetched:
        sessions = self._open()
        for _ in range(MAX_REDIRECTS + 1):
            if ls is not None and not ls.owns(url):
                ls = None  # off Label Studio: no token and no trust for this hop or any after it
            response = await self._get(sessions, url, ls)
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or location is None:
                return await self._read_body(response, url)
            response.release()
            url = urljoin(url, location)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects fetching {_safe(url)}")

    async def _get(self, sessions: _Sessions, url: str,
                   ls: LabelStudioAccess | None) -> aiohttp.ClientResponse:
        """GET with the Label Studio token (and trust) only if `url` is on the Label Studio
        origin; `_download` passes `ls=None` once a redirect chain has left it."""
        if ls is None or not ls.owns(url):
            return await _send(sessions.general, url, {})
        session = sessions.label_studio
        response = await _send(session, url, await ls.auth_headers(self._ls_api))
        if response.status == 401 and ls.token and is_personal_access_token(ls.token):
            response.release()  # the access token expired early: refresh once
            ls.forget_access_token()
            response = await _send(session, url, await ls.auth_headers(self._ls_api))
        return response

    async def _read_body(self, response: aiohttp.ClientResponse, url: str) -> Fetched:
        try:
            _check_status(response, url)
            declared = response.content_length or 0
            if declared > self.max_bytes:
                raise FetchError(f"{_safe(url)} is {declared} bytes, over "
                                 f"MAX_IMAGE_BYTES={self.max_bytes}")
            chunks, total = [], 0
            async for chunk in response.content.iter_any():
                total += len(chunk)
                if total > self.max_bytes:
                    raise FetchError(f"{_safe(url)} exceeds MAX_IMAGE_BYTES={self.max_bytes}")
                chunks.append(chunk)
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise FetchError(f"connection broke while reading {_safe(url)} "
                             f"({type(exc).__name__})") from None
        except BaseException:
            response.close()  # the connection is mid-body: never reuse it
            raise
        response.release()
        return Fetched(b"".join(chunks), response.headers.get("Content-Type"), _safe(url))


@dataclass(frozen=True)
class _Guarded:
    """An aiohttp session and the resolver its connector uses (which checks IP literals)."""

    session: aiohttp.ClientSession
    resolver: GuardedResolver


@dataclass(frozen=True)
class _Sessions:
    loop: asyncio.AbstractEventLoop
    general: _Guarded
    label_studio: _Guarded


def _session(settings: Settings, policy: AddressPolicy) -> _Guarded:
    resolver = GuardedResolver(policy, settings.CONNECT_TIMEOUT_S)
    connector = guarded_connector(resolver, limit=settings.FETCH_CONCURRENCY * 2,
                                  ssl_context=ssl_context())
    return _Guarded(aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.CONNECT_TIMEOUT_S,
                                      sock_read=settings.FETCH_TIMEOUT_S),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        cookie_jar=aiohttp.DummyCookieJar(),  # no state carried from one task's URL to another
        trust_env=False,  # no proxies from the environment, no ~/.netrc credentials
        auto_decompress=True,  # a server may compress anyway; MAX_IMAGE_BYTES counts the result
        raise_for_status=False,
    ), resolver)


async def _send(client: _Guarded, url: str,
                headers: dict[str, str]) -> aiohttp.ClientResponse:
    target = _url(url)
    client.resolver.check_literal(target.raw_host or "")  # aiohttp skips the resolver for these
    try:
        return await client.session.get(target, headers=headers, allow_redirects=False)
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        raise FetchError(f"timed out connecting to or reading {_safe(url)}") from None
    except aiohttp.InvalidURL as exc:
        raise ImageRefused(f"malformed image URL {_safe(url)!r}: {exc}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchError(f"could not connect to {_safe(url)} ({type(exc).__name__}: "
                         f"{exc})") from None


def _url(url: str) -> yarl.URL:
    """`url` for aiohttp: sent as written when it is already a valid encoded URL (a presigned
    URL's signature covers its exact spelling), else percent-encoded by yarl."""
    try:
        target = yarl.URL(url, encoded=_ENCODED.fullmatch(url) is not None)
        target.port  # noqa: B018 - an out-of-range port raises here
    except (ValueError, TypeError) as exc:
        raise ImageRefused(f"malformed image URL {_safe(url)!r}: {exc}") from None
    if target.scheme not in ("http", "https"):  # a redirect's Location, say
        raise ImageRefused(f"unsupported image reference {_safe(url)}: only http(s) is "
                           "fetched")
    if not target.raw_host:
        raise ImageRefused(f"malformed image URL {_safe(url)!r}: no host")
    return target


_ENCODED = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
"""Only characters a URL may carry as they are, and valid percent escapes (RFC 3986)."""


def is_data_uri(ref: str) -> bool:
    """Whether `ref` carries its image inline (a data: URI): nothing to download, and no URL
    to remember."""
    return ref.lstrip().startswith("data:")


def _check_status(response: aiohttp.ClientResponse, url: str) -> None:
    status = response.status
    if status == 200:
        return
    hint = ""
    if status in (401, 403):
        hint = (" — Label Studio needs a valid token: set LABEL_STUDIO_API_KEY (legacy tokens "
                "may be disabled in your organization; personal access tokens work)")
    raise FetchError(f"HTTP {status} {response.reason or ''} from {_safe(url)}{hint}")


def _check_local_files(ref: str) -> list[str] | None:
    """The `d=` paths if `ref` names Label Studio's local-files endpoint, however spelled
    (`/data/local-files/./`, `//data/local-files/`, percent-encoded: Label Studio routes them
    all there), else None. Refuses a path with `..` in any of them."""
    parts = _parsed(ref)
    if not parts.scheme:
        parts = _parsed("http://label-studio/" + ref.lstrip("/"))
    path = posixpath.normpath(re.sub("/+", "/", "/" + unquote(parts.path)))
    if path != "/data/local-files":
        return None
    paths = parse_qs(parts.query, keep_blank_values=True).get("d", [])
    if any(".." in PurePosixPath(rel.replace("\\", "/")).parts for rel in paths):
        raise ImageRefused("a local-files path must not contain '..'")
    return paths


def _need_ls(ls: LabelStudioAccess | None, ref: str) -> LabelStudioAccess:
    if ls is None:
        raise FetchError(f"{_safe(ref)} is served by Label Studio, but its URL is unknown: set "
                         "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)")
    return ls


def _presign_url(uri: str, task_id: int | None, ls: LabelStudioAccess) -> str:
    if task_id is None:
        raise FetchError(f"{_safe(uri)} needs the task id to be presigned by Label Studio")
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    return ls.absolute(f"/tasks/{int(task_id)}/presign/?fileuri={quote(encoded)}")


def _parsed(ref: str) -> SplitResult:
    """`ref` split into its URL parts; ImageRefused if it is not a URL (`http://[..]/x`)."""
    try:
        return urlsplit(ref)
    except ValueError as exc:
        raise ImageRefused(f"malformed image URL {_safe(ref)!r}: {exc}; fix the task's image "
                           "field") from None


def _safe(url: str, limit: int = 200) -> str:
    """A URL fit for logs: no query string (presigned URLs carry credentials), bounded length."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL (e.g. `http://[..]/`): cut at the query all the same
        url = url.split("?", 1)[0] + ("?…" if "?" in url else "")
        return url if len(url) <= limit else url[:limit] + "…"
    if parts.scheme in ("http", "https") and parts.query:
        keep = parts.query if parts.path.rstrip("/") == "/data/local-files" else "…"
        url = parts._replace(query=keep).geturl()
    return url if len(url) <= limit else url[:limit] + "…"
