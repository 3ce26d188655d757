"""Log lines: the JSON format, and the request id from X-Request-ID on every line logged while
serving a request (including lines logged from worker threads) and in the response."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
from collections.abc import Iterator

import httpx
import pytest

from backend.config import load_settings
from backend.logs import (
    REQUEST_ID,
    JsonFormatter,
    RequestIdFilter,
    logging_config,
    request_id_from,
)
from backend.web.app import create_app

from .support.backend_server import BackendThread
from .support.webhooks import annotation_event, choice_result

UNSUPPORTED = ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">'
               '<Label value="a"/></RectangleLabels></View>')


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "backend.test", "levelno": logging.WARNING,
                                  "levelname": "WARNING", "msg": message, "args": args, **extra})
    RequestIdFilter().filter(made)
    return made


def test_json_lines_carry_time_level_logger_message_and_request_id():
    token = REQUEST_ID.set("req-42")
    try:
        line = json.loads(JsonFormatter().format(record("task %d failed", 7, task=7)))
    finally:
        REQUEST_ID.reset(token)
    assert line["level"] == "WARNING" and line["logger"] == "backend.test"
    assert line["message"] == "task 7 failed" and line["request_id"] == "req-42"
    assert line["task"] == 7
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", line["time"])


def test_json_lines_outside_a_request_have_no_request_id_and_keep_tracebacks():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        made = record("failed", exc_info=sys.exc_info())
    line = json.loads(JsonFormatter().format(made))
    assert "request_id" not in line
    assert "ValueError: boom" in line["exception"]


@pytest.mark.parametrize("given, kept", [
    ("abc-123", True), ("0af7651916cd43dd8448eb211c80319c", True),
    ("x" * 129, False), ("bad id", False), ("evil\nline", False), ("", False), (None, False)])
def test_only_plain_incoming_ids_are_kept(given, kept):
    made = request_id_from(given)
    assert (made == given) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", made)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logging_config_routes_backend_and_uvicorn_through_one_handler(fmt, monkeypatch):
    monkeypatch.setenv("LOG_FORMAT", fmt.upper())
    config = logging_config(load_settings())
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    logging.config.dictConfig(config)
    try:
        handler = logging.getLogger().handlers[0]
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("uvicorn.access").info('%s - "%s"', "127.0.0.1:1", "GET /health")
        logging.getLogger("backend.predict.pipeline").warning("task 3: bad")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "json":
        assert [json.loads(line)["logger"] for line in lines] == ["uvicorn.access",
                                                                  "backend.predict.pipeline"]
    else:
        assert lines[1].endswith("WARNING [-] backend.predict.pipeline: task 3: bad")


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def backend(tiny_settings):
    with BackendThread(create_app(tiny_settings)) as server:
        server.wait_model()
        yield server


def test_request_id_is_returned_and_tags_the_requests_log_lines(backend, captured):
    response = httpx.post(backend.url + "/setup", json={"project": "1.1", "schema": UNSUPPORTED},
                          headers={"X-Request-ID": "ls-req-1"})
    assert response.status_code == 422 and response.headers["x-request-id"] == "ls-req-1"
    tagged = [r for r in captured.records if getattr(r, "request_id", None) == "ls-req-1"]
    assert any("/setup" in r.getMessage() and "422" in r.getMessage() for r in tagged)


def test_lines_logged_from_worker_threads_carry_the_id_too(backend, captured):
    event = annotation_event(1, 11, choice_result("Cat"))
    response = httpx.post(backend.url + "/webhook", json=event)
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    fit = [r for r in captured.records if r.getMessage().startswith("event ANNOTATION_CREATED")]
    assert fit and fit[0].request_id == request_id  # type: ignore[attr-defined]
    assert fit[0].threadName != "MainThread"


def test_refused_requests_get_an_id_as_well(tiny_configs, tmp_path):
    settings = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none",
                             MODEL_DIR=tmp_path / "m", BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    with BackendThread(create_app(settings)) as server:
        response = httpx.get(server.url + "/health", headers={"X-Request-ID": "probe-9"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "probe-9"


def text_formatter(monkeypatch: pytest.MonkeyPatch) -> logging.Formatter:
    """The formatter LOG_FORMAT=text configures."""
    monkeypatch.setenv("LOG_FORMAT", "TEXT")
    config = logging_config(load_settings())
    return logging.config.DictConfigurator(config).configure_formatter(
        config["formatters"]["default"])


def test_text_lines_escape_control_characters_in_every_message_and_argument(monkeypatch):
    formatter = text_formatter(monkeypatch)
    line = formatter.format(record("event %s: %s", "A\nB", "\x1b[2Kc\r\u2028d"))
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert line.endswith(r"backend.test: event A\nB: \x1b[2Kc\r\u2028d")
    assert formatter.format(record("plain\nmessage")).endswith(r"plain\nmessage")


def test_a_newline_in_a_webhook_action_cannot_forge_a_log_line(backend, captured, monkeypatch):
    forged = "ANNOTATION_CREATED\n2026-11-30 06:00:00,000 ERROR [-] backend.predict.pipeline: forged"
    response = httpx.post(backend.url + "/webhook", json={"action": forged, "project": {"id": 4}})
    assert response.status_code == 200
    formatter = text_formatter(monkeypatch)
    lines = [formatter.format(r) for r in captured.records if "forged" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)
