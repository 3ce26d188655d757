"""The bad-input corpus: every case generated here, sent through the real HTTP API, gets its
documented outcome — a per-task error naming the cause, or a 4xx naming the limit — and never a
500; the process's memory stays bounded while it all goes through."""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.config import load_settings
from backend.web.app import create_app

from .images.test_decode import zero_png
from .support.backend_server import BackendThread
from .support.http_server import LoopbackServer, Route
from .support.webhooks import CONFIG, annotation_event, choice_result

ALLOWED = "127.0.0.3"  # the only address task URLs may reach in these tests


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(mode: str = "RGB", size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode) if mode != "RGB" else image


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8
    return encoded(photo(), "JPEG", exif=exif)


def palette_png() -> bytes:
    image = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    return encoded(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "PNG")


JPEG = encoded(photo(), "JPEG")
SERVED: dict[str, tuple[Route, str | None]] = {
    # path: (what the server sends, expected error — None means a prediction)
    "/bomb.png": (Route(encoded(Image.new("1", (20_000, 20_000)), "PNG")), "exceeds MAX_IMAGE_PIXELS"),
    "/deep.png": (Route(zero_png(4000, 4000, 16, 0)), "decodes to 32000000 bytes, over MAX_DECODE_BYTES"),
    "/photo.tga": (Route(encoded(photo(), "TGA")), "accepted formats: IMAGE_FORMATS=JPEG,PNG,WEBP"),
    "/truncated.jpg": (Route(JPEG[: len(JPEG) // 2]), "corrupt or truncated JPEG"),
    "/corrupt.jpg": (Route(JPEG[:20] + bytes(range(256)) * 4), "corrupt or truncated JPEG"),
    "/page.jpg": (Route(b"<!DOCTYPE html><html><body>login</body></html>", content_type="text/html"),
                  "an HTML page"),
    "/vector.png": (Route(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                          content_type="image/svg+xml"), "SVG vector graphics"),
    "/doc.jpg": (Route(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", content_type="application/pdf"),
                 "a PDF document"),
    "/empty.jpg": (Route(b""), "empty (0 bytes)"),
    "/garbage.bin": (Route(bytes(range(256)) * 8), "unrecognised data"),
    "/huge.jpg": (Route(b"\xff" * 3_000_000), "MAX_IMAGE_BYTES"),
    "/chunked-huge.jpg": (Route(b"\xff" * 3_000_000, chunked=True), "MAX_IMAGE_BYTES"),
    "/missing.jpg": (Route(b"no", 404, "text/plain"), "HTTP 404"),
    "/forbidden.jpg": (Route(b"no", 403, "text/plain"), "HTTP 403"),
    "/slow.jpg": (Route(JPEG, drip_s=2.0), "timed out"),  # 2 s per KB, 2.4 KB; limit 3 s
    "/cmyk.jpg": (Route(encoded(photo("CMYK"), "JPEG")), None),
    "/gray16.png": (Route(sixteen_bit_png()), None),
    "/palette.png": (Route(palette_png()), None),
    "/rotated.jpg": (Route(rotated_jpeg()), None),
    "/animated.gif": (Route(animated_gif()), None),
    "/photo.webp": (Route(encoded(photo(), "WEBP")), None),
    "/gray.png": (Route(encoded(photo("L"), "PNG")), None),
    "/rgba.png": (Route(encoded(photo("RGBA"), "PNG")), None),
}


def references(server: LoopbackServer) -> dict[str, tuple[object, str | None]]:
    """Task image values that never reach an image server, with their expected error."""
    port = server.port
    hop = server.add("/hop", Route(status=302, headers={"Location": f"http://127.0.0.2:{port}/cmyk.jpg"}))
    return {
        "other loopback 127.0.0.2": (f"http://127.0.0.2:{port}/cmyk.jpg", "loopback: refused"),
        "IPv6 loopback": (f"http://[::1]:{port}/cmyk.jpg", "loopback: refused"),
        "localhost": (f"http://localhost:{port}/cmyk.jpg", "loopback: refused"),
        "cloud metadata": ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        "private network": ("http://10.0.0.1/a.jpg", "private: refused"),
        "redirect to a refused address": (hop, "127.0.0.2 resolves to 127.0.0.2, loopback: refused"),
        "file URL": ("file:///etc/passwd", "unsupported image reference"),
        "javascript URL": ("javascript:alert(1)", "unsupported image reference"),
        "local-files traversal": ("/data/local-files/?d=../../etc/passwd", "must not contain '..'"),
        "bad data URI": ("data:image/png;base64", "malformed data: URI"),
        "number instead of URL": (12345, "not an image URL"),
        "list instead of URL": (["http://x"], "not an image URL"),
        "empty string": ("", "empty"),
    }


@pytest.fixture
def served(tiny_configs, tmp_path):
    settings = load_settings(
        MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none", IMAGE_URL_ALLOWLIST=ALLOWED,
        MAX_IMAGE_BYTES=2_000_000, MAX_IMAGE_PIXELS=20_000_000, MAX_DECODE_BYTES=16_000_000,
        FETCH_TIMEOUT_S=3.0, MAX_CORRECTION_BYTES=100_000,
        MAX_REQUEST_BYTES=1_000_000, MAX_TASKS_PER_REQUEST=100,
        LOCAL_FILES_DOCUMENT_ROOT=tmp_path, LABEL_STUDIO_URL=f"http://{ALLOWED}:9")
    with BackendThread(create_app(settings)) as backend, LoopbackServer(ALLOWED) as images:
        backend.wait_model()
        for path, (route, _) in SERVED.items():
            images.add(path, route)
        yield backend, images


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(backend, path: str, **kwargs) -> httpx.Response:
    return httpx.post(backend.url + path, timeout=60, **kwargs)


def test_every_bad_image_fails_only_its_own_task(served):
    backend, images = served
    cases = {path: (images.url(path), expected) for path, (_, expected) in SERVED.items()}
    cases.update(references(images))
    cases["missing image field"] = (None, "has no field 'image'")
    tasks = [{"id": i, "data": {"image": ref} if ref is not None else {"img": "x"}}
             for i, (ref, _) in enumerate(cases.values())]
    before = rss_mb()
    response = post(backend, "/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(cases) >= 30
    for (name, (_, expected)), result in zip(cases.items(), results):
        if expected is None:
            assert result.get("result"), f"{name}: expected a prediction, got {result}"
        else:
            assert "result" not in result, f"{name}: expected an error"
            assert expected in result["error"], f"{name}: {result['error']}"
    assert rss_mb() - before < 400  # the 400-megapixel bomb was never decoded


@pytest.mark.parametrize(("name", "request_kwargs", "status", "expected"), [
    ("malformed JSON", {"content": b'{"tasks": [', "headers": {"Content-Type": "application/json"}}, 422, ""),
    ("not JSON at all", {"content": b"\x00\x01", "headers": {"Content-Type": "application/json"}}, 422, ""),
    ("tasks is a string", {"json": {"tasks": "x", "label_config": CONFIG}}, 422, ""),
    ("task is a number", {"json": {"tasks": [1], "label_config": CONFIG}}, 422, ""),
    ("no tasks", {"json": {"label_config": CONFIG}}, 422, ""),
    ("no label config", {"json": {"tasks": [{"id": 1, "data": {}}]}}, 422, "no label_config"),
    ("unsupported config", {"json": {"tasks": [], "label_config":
        '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>'}},
     422, "Supported: <Choices>"),
    ("broken XML", {"json": {"tasks": [], "label_config": "<View><Image"}}, 422, "not valid XML"),
    ("huge label set", {"json": {"tasks": [], "label_config": '<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                                 + "".join(f'<Choice value="{i}"/>' for i in range(10_001)) + "</Choices></View>"}},
     422, "the limit is 10000"),
    ("too many tasks", {"json": {"tasks": [{"id": i, "data": {}} for i in range(101)], "label_config": CONFIG}},
     413, "MAX_TASKS_PER_REQUEST=100"),
    ("prompt too long", {"json": {"tasks": [], "label_config": CONFIG.replace(
        'value="Cat"', 'value="Cat" model_prompts="' + "x" * 1001 + '"')}}, 422, "limit is 1000"),
])
def test_bad_predict_requests_get_a_4xx_that_says_why(served, name, request_kwargs, status, expected):
    backend, _ = served
    response = post(backend, "/predict", **request_kwargs)
    assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
    assert expected in response.text


def test_label_set_over_the_label_limit_is_refused_by_setup(served):
    backend, _ = served
    config = ('<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
              + "".join(f'<Choice value="{i}"/>' for i in range(10_001)) + "</Choices></View>")
    response = post(backend, "/setup", json={"project": "1.1", "schema": config})
    assert response.status_code == 422 and "the limit is 10000" in response.json()["detail"]


def raw_request(backend, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (a client that lies about its body), return the response."""
    host, port = backend.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_one_gigabyte_body_is_refused_before_it_is_read(served):
    backend, _ = served
    before = rss_mb()
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    reply = raw_request(backend, head, b'{"tasks": [')
    assert reply.startswith(b"HTTP/1.1 413")  # Starlette's own "Content Too Large"
    assert rss_mb() - before < 50


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    backend, _ = served
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    reply = raw_request(backend, head, body)
    assert reply.startswith(b"HTTP/1.1 413") and b"MAX_REQUEST_BYTES=1000000" in reply


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"action": 1}', b'"x"', b"\xff\xfe"])
def test_bad_webhooks_get_400(served, body):
    backend, _ = served
    response = post(backend, "/webhook", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400


def test_a_webhook_nested_too_deeply_gets_400_not_500(served):
    backend, _ = served
    for depth in (100_000, 500):  # past the JSON parser's recursion limit, and within it
        body = b'{"action": "ANNOTATION_CREATED", "x": ' + b"[" * depth + b"]" * depth + b"}"
        response = post(backend, "/webhook", content=body,
                        headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert "nested more than 64 levels" in response.json()["detail"]


def test_an_annotation_that_could_never_be_applied_gets_400_and_nothing_is_recorded(served):
    backend, _ = served
    event = annotation_event(5, 9, [{"from_name": {"x": 1}, "value": {"choices": ["Cat"]}}])
    response = post(backend, "/webhook", json=event)
    assert response.status_code == 400, response.text
    assert "result[0].from_name is a dict" in response.json()["detail"]
    assert list(backend.app.state.backend.store.events()) == []


def test_a_malformed_image_host_is_one_clear_task_error_without_a_traceback(served, caplog):
    backend, _ = served
    tasks = [{"id": 1, "data": {"image": "http://[..]/a.png"}}]
    response = post(backend, "/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    [result] = response.json()["results"]
    assert "ImageRefused: malformed image URL 'http://[..]/a.png'" in result["error"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("body", [{}, {"schema": 5}, {"schema": ""}, {"schema": None, "project": []}])
def test_bad_setup_requests_get_422(served, body):
    backend, _ = served
    assert post(backend, "/setup", json=body).status_code == 422


def test_overload_is_shed_quickly_with_503(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             MAX_PENDING_TASKS=3, IMAGE_URL_ALLOWLIST=ALLOWED)
    with BackendThread(create_app(settings)) as backend, LoopbackServer(ALLOWED) as images:
        backend.wait_model()
        slow = images.add("/slow.png", Route(encoded(photo(), "PNG"), delay_s=2))
        body = {"tasks": [{"id": i, "data": {"image": slow}} for i in range(3)], "label_config": CONFIG}
        first = threading.Thread(target=post, args=(backend, "/predict"), kwargs={"json": body})
        first.start()
        try:
            model = backend.app.state.backend
            for _ in range(200):
                if model.pipeline.admission.pending_tasks:
                    break
                threading.Event().wait(0.01)
            shed = post(backend, "/predict", json={**body, "tasks": body["tasks"][:1]})
            assert shed.status_code == 503 and shed.headers["Retry-After"] == "5"
            assert "MAX_PENDING_TASKS=3" in shed.json()["detail"]
        finally:
            first.join(30)


def test_a_config_that_expands_to_too_many_prompts_is_refused_by_setup_and_predict(served):
    backend, _ = served  # MAX_PROMPTS_PER_CONFIG=100,000: 2,000 labels x 80 templates is over
    config = ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" '
              'model_templates="openai">' + "".join(f'<Choice value="{i}"/>' for i in range(2_000))
              + "</Choices></View>")
    response = post(backend, "/setup", json={"project": "1.1", "schema": config})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "expands to 160000 prompts" in detail and "MAX_PROMPTS_PER_CONFIG=100000" in detail
    response = post(backend, "/predict", json={"tasks": [{"id": 1, "data": {"i": "x"}}],
                                               "label_config": config})
    assert response.status_code == 422 and "MAX_PROMPTS_PER_CONFIG" in response.json()["detail"]


def test_a_client_that_trickles_its_body_gets_408_and_the_connection_closed(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             REQUEST_BODY_TIMEOUT_S=1.0)
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    closed = threading.Event()

    def trickle(connection: socket.socket) -> None:
        """A byte now and then, until the server hangs up: the body is never complete."""
        while not closed.wait(0.1):
            try:
                connection.sendall(b" ")
            except OSError:
                return

    with BackendThread(create_app(settings)) as backend:
        host, port = backend.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as connection:
            connection.sendall(head + b'{"tasks": [')
            sender = threading.Thread(target=trickle, args=(connection,), daemon=True)
            sender.start()
            reply = b""
            while chunk := connection.recv(65536):  # until the server closes the connection
                reply += chunk
            closed.set()
            sender.join(10)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"REQUEST_BODY_TIMEOUT_S=1" in reply


def test_a_body_sent_in_time_is_not_limited_afterwards(tiny_configs):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             REQUEST_BODY_TIMEOUT_S=5.0)
    with BackendThread(create_app(settings)) as backend:
        response = post(backend, "/webhook", json={"action": "PROJECT_UPDATED"})
    assert response.status_code == 200


def test_an_annotation_over_the_correction_size_cap_is_refused_whole_and_says_why(served):
    backend, _ = served
    brush = {"from_name": "mask", "to_name": "image", "type": "brushlabels",
             "value": {"rle": list(range(30_000))}}  # about 190 KB of JSON
    event = annotation_event(7, 70, [*choice_result("Cat"), brush])
    response = post(backend, "/webhook", json=event)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "annotation 7 of project 4" in detail and "MAX_CORRECTION_BYTES=100000" in detail
    assert post(backend, "/webhook", json=annotation_event(8, 80, choice_result("Cat"))
                ).status_code == 200
    rows = httpx.get(backend.url + "/export/corrections",
                     params={"project": "4", "trailer": "false"}, timeout=30)
    assert [json.loads(line)["annotation"] for line in rows.text.splitlines()] == ["8"]
