"""Fetching task images from real HTTP servers on 127.0.0.1, the way Label Studio serves them."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
from pathlib import Path

import pytest

from backend.config import load_settings
from backend.errors import FetchError, ImageRefused
from backend.images.fetch import ImageFetcher
from backend.labelstudio.client import LabelStudioAccess

from ..support.http_server import LoopbackServer, Recorded, Route

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def fetch(ref: str, *, ls: LabelStudioAccess | None = None, task_id: int | None = None,
          **overrides) -> bytes:
    async def run() -> bytes:
        fetcher = ImageFetcher(load_settings(**overrides))
        try:
            return (await fetcher.fetch(ref, task_id=task_id, ls=ls)).data
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def fake_jwt(exp: float) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256'})}.{part({'exp': exp})}.sig"


def test_plain_url_never_carries_the_token(loopback: LoopbackServer):
    url = loopback.add("/a.png", Route(PNG, content_type="image/png"))
    with LoopbackServer() as label_studio:
        ls = LabelStudioAccess(label_studio.base, LEGACY)
        assert fetch(url, ls=ls) == PNG
    assert "Authorization" not in loopback.requests[0].headers


def test_upload_path_goes_to_label_studio_with_legacy_token(loopback: LoopbackServer):
    loopback.add("/data/upload/3/abc-cat.png",
                 Route(PNG, require_header=("Authorization", f"Token {LEGACY}")))
    ls = LabelStudioAccess(loopback.base + "/", LEGACY)
    assert fetch("/data/upload/3/abc-cat.png", ls=ls) == PNG
    assert fetch(loopback.url("/data/upload/3/abc-cat.png"), ls=ls) == PNG  # absolute LS URL


def test_personal_access_token_is_exchanged_and_refreshed(loopback: LoopbackServer):
    pat = fake_jwt(time.time() + 86400 * 365)
    issued: list[str] = []

    def refresh(request: Recorded) -> Route:
        assert json.loads(request.body) == {"refresh": pat}
        issued.append(fake_jwt(time.time() + 300))
        return Route(json.dumps({"access": issued[-1]}).encode(), content_type="application/json")

    def image(request: Recorded) -> Route:
        given = request.headers.get("Authorization")
        if given == f"Bearer {issued[0]}":
            return Route(b"expired", 401)  # the first access token dies early
        return Route(PNG) if given == f"Bearer {issued[-1]}" else Route(b"no", 401)

    loopback.add("/api/token/refresh/", refresh)
    loopback.add("/data/upload/1/x.png", image)
    assert fetch("/data/upload/1/x.png", ls=LabelStudioAccess(loopback.base, pat)) == PNG
    assert len(issued) == 2  # rejected once → refreshed once → served


def test_redirect_off_label_studio_drops_the_token(loopback: LoopbackServer):
    with LoopbackServer() as bucket:
        target = bucket.add("/signed/x.png", Route(PNG))
        loopback.add("/data/upload/1/x.png", Route(status=302, headers={"Location": target}))
        assert fetch("/data/upload/1/x.png", ls=LabelStudioAccess(loopback.base, LEGACY)) == PNG
        assert loopback.requests[0].headers["Authorization"] == f"Token {LEGACY}"
        assert "Authorization" not in bucket.requests[0].headers


def test_cloud_uri_is_presigned_through_label_studio(loopback: LoopbackServer):
    uri = "s3://bucket/images/cat.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    with LoopbackServer() as bucket:
        signed = bucket.add("/cat.png", Route(PNG))
        loopback.add("/tasks/7/presign/", Route(status=303, headers={"Location": signed},
                                                 require_header=("Authorization", f"Token {LEGACY}")))
        assert fetch(uri, ls=LabelStudioAccess(loopback.base, LEGACY), task_id=7) == PNG
    assert loopback.requests[0].path == f"/tasks/7/presign/?fileuri={encoded.replace('=', '%3D')}"


def test_local_files_are_read_from_the_document_root(loopback: LoopbackServer, tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(PNG)
    ls = LabelStudioAccess(loopback.base, LEGACY)
    ref = "/data/local-files/?d=sub/a.png"
    assert fetch(ref, ls=ls, LOCAL_FILES_DOCUMENT_ROOT=tmp_path) == PNG
    assert loopback.requests == []  # read from disk, not over HTTP
    with pytest.raises(ImageRefused, match="must not contain '..'"):
        fetch("/data/local-files/?d=../../etc/passwd", ls=ls, LOCAL_FILES_DOCUMENT_ROOT=tmp_path)
    with pytest.raises(ImageRefused, match="must not contain '..'"):  # nor asks LS for it
        fetch("/data/local-files/?d=sub/../../x.png", ls=ls)
    (tmp_path / "sub" / "escape.png").symlink_to("/etc/hostname")
    with pytest.raises(ImageRefused, match="escapes LOCAL_FILES_DOCUMENT_ROOT"):
        fetch("/data/local-files/?d=sub/escape.png", ls=ls, LOCAL_FILES_DOCUMENT_ROOT=tmp_path)
    # not on this disk: ask Label Studio, with the token
    loopback.add("/data/local-files/", Route(PNG, require_header=("Authorization", f"Token {LEGACY}")))
    assert fetch("/data/local-files/?d=elsewhere/b.png", ls=ls, LOCAL_FILES_DOCUMENT_ROOT=tmp_path) == PNG


def test_data_uris():
    assert fetch("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    with pytest.raises(FetchError, match="MAX_IMAGE_BYTES"):
        fetch("data:image/png;base64," + "A" * 2000, MAX_IMAGE_BYTES=1000)
    with pytest.raises(ImageRefused, match="no comma"):
        fetch("data:image/png;base64")


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (Route(b"missing", 404), "HTTP 404 Not Found from http://127.0.0.1:"),
        (Route(b"no", 403), "set LABEL_STUDIO_API_KEY"),
        (Route(b"x" * 5000), "is 5000 bytes, over MAX_IMAGE_BYTES=4096"),
        (Route(b"x" * 5000, chunked=True), "exceeds MAX_IMAGE_BYTES=4096"),
        (Route(PNG, delay_s=3), "timed out"),
        (Route(b"x" * 4000, drip_s=0.4), "timed out"),
    ],
)
def test_fetch_failures_say_what_happened(loopback: LoopbackServer, route: Route, message: str):
    url = loopback.add("/img.png?sig=SECRET", route)
    with pytest.raises(FetchError) as caught:
        fetch(url, MAX_IMAGE_BYTES=4096, FETCH_TIMEOUT_S=1.0)
    assert message in str(caught.value)
    assert "SECRET" not in str(caught.value)  # query strings (presigned credentials) never logged


def test_unreachable_host_and_unsupported_references():
    with pytest.raises(FetchError, match="could not connect to http://127.0.0.1:9/x.png"):
        fetch("http://127.0.0.1:9/x.png")
    for ref in ("file:///etc/passwd", "ftp://host/x.png", "just-a-name.png"):
        with pytest.raises(ImageRefused, match="unsupported image reference"):
            fetch(ref)
    with pytest.raises(FetchError, match="set LABEL_STUDIO_URL"):
        fetch("/data/upload/1/x.png")
    with pytest.raises(ImageRefused, match="empty"):
        fetch("  ")


@pytest.mark.parametrize(("ref", "why"), [
    ("http://[..]/x.png", "does not appear to be an IPv4 or IPv6 address"),  # urllib's ValueError
    ("http://[::1/x.png", "Invalid IPv6 URL"),
    ("http://host:abc/x.png", "port"),  # yarl's ValueError
])
def test_a_malformed_url_is_refused_with_why(ref: str, why: str):
    with pytest.raises(ImageRefused, match=re.escape(f"malformed image URL {ref!r}: ") + ".*" + why):
        fetch(ref)


def test_downloads_are_concurrent_but_bounded(loopback: LoopbackServer):
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(_: Recorded) -> Route:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return Route(PNG)

    urls = [loopback.add(f"/{i}.png", slow) for i in range(8)]

    async def run() -> None:
        fetcher = ImageFetcher(load_settings(FETCH_CONCURRENCY=3))
        try:
            await asyncio.gather(*(fetcher.fetch(url) for url in urls))
        finally:
            await fetcher.aclose()

    asyncio.run(run())
    assert peak[0] == 3


def test_a_foreign_url_redirecting_into_label_studio_gets_no_token(loopback: LoopbackServer):
    """The confused deputy: a task URL elsewhere answers with a redirect to a Label Studio
    path; following it must not make an authenticated request there."""
    loopback.add("/api/projects/", Route(b"secret", require_header=("Authorization", f"Token {LEGACY}")))
    with LoopbackServer() as attacker:
        lure = attacker.add("/cat.png", Route(status=302, headers={"Location": loopback.url("/api/projects/")}))
        with pytest.raises(FetchError, match="HTTP 401"):
            fetch(lure, ls=LabelStudioAccess(loopback.base, LEGACY))
    assert [r.path for r in loopback.requests] == ["/api/projects/"]
    assert "Authorization" not in loopback.requests[0].headers


def test_the_token_does_not_come_back_after_a_redirect_chain_left_label_studio(loopback: LoopbackServer):
    loopback.add("/api/projects/", Route(b"secret", require_header=("Authorization", f"Token {LEGACY}")))
    with LoopbackServer() as elsewhere:
        back = elsewhere.add("/bounce", Route(status=302, headers={"Location": loopback.url("/api/projects/")}))
        loopback.add("/data/upload/1/x.png", Route(status=302, headers={"Location": back}))
        with pytest.raises(FetchError, match="HTTP 401"):
            fetch("/data/upload/1/x.png", ls=LabelStudioAccess(loopback.base, LEGACY))
    first, back_in = loopback.requests
    assert first.headers["Authorization"] == f"Token {LEGACY}"  # the image path itself: yes
    assert "Authorization" not in elsewhere.requests[0].headers
    assert back_in.path == "/api/projects/" and "Authorization" not in back_in.headers


@pytest.mark.parametrize("ref", [
    "/data/local-files/./?d=../x.png",
    "//data/local-files/?d=../x.png",
    "/data//local-files/?d=../x.png",
    "/data/local-files/%2e/?d=../x.png",
    "/data/%6cocal-files/?d=../x.png",
    "/data/upload/../local-files/?d=../x.png",
    "/data/local-files/?d=ok.png&d=../x.png",  # Label Studio reads the last one
    "/data/local-files/?d=sub%2F..%2F..%2Fx.png",
    "{ls}/data/local-files/./?d=../x.png",  # an absolute URL on the Label Studio origin
])
def test_local_files_paths_are_normalised_before_the_dotdot_check(loopback: LoopbackServer, ref: str):
    loopback.add("/data/local-files/", Route(PNG))
    with pytest.raises(ImageRefused, match="must not contain '..'"):
        fetch(ref.format(ls=loopback.base), ls=LabelStudioAccess(loopback.base, LEGACY))
    assert loopback.requests == []  # Label Studio was never asked, with or without the token


def test_local_files_spelled_differently_are_still_read_from_the_document_root(loopback: LoopbackServer,
                                                                               tmp_path: Path):
    (tmp_path / "a.png").write_bytes(PNG)
    for ref in ("/data/local-files/./?d=a.png", "//data/local-files/?d=a.png"):
        assert fetch(ref, ls=LabelStudioAccess(loopback.base, LEGACY), LOCAL_FILES_DOCUMENT_ROOT=tmp_path) == PNG
    assert loopback.requests == []


def test_a_url_with_an_invalid_port_is_a_task_error_even_next_to_label_studio(loopback: LoopbackServer):
    with pytest.raises((ImageRefused, FetchError)):  # not a ValueError from the origin check
        fetch("http://127.0.0.1:99999/x.png", ls=LabelStudioAccess(loopback.base, LEGACY),
              IMAGE_URL_ALLOWLIST="")


def test_urls_are_sent_as_written_unless_they_need_encoding(loopback: LoopbackServer):
    """A presigned URL's signature covers its exact spelling: valid escapes go out unchanged;
    a space or a stray % is percent-encoded (as a browser would)."""
    for path in ("/a%2Fb.png?X-Amz-Signature=ab%2Bcd", "/100%25.png"):
        loopback.add(path.split("?")[0], Route(b"ok"))
        assert fetch(loopback.base + path) == b"ok"
        assert loopback.requests[-1].path == path
    loopback.add("/my%20file%25.png", Route(b"spaced"))
    assert fetch(loopback.base + "/my file%.png") == b"spaced"


def test_a_redirect_to_another_scheme_is_refused(loopback: LoopbackServer):
    url = loopback.add("/hop", Route(status=302, headers={"Location": "file:///etc/passwd"}))
    with pytest.raises(ImageRefused, match="only http"):
        fetch(url)
