"""`python -m backend doctor`: one line per check, a fix naming what to set under each warning
or failure, exit status 1 on any failure. Label Studio is a loopback fake, Redis a real one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis
import torch

from backend.cli import main
from backend.corrections.dead_letters import DeadLetters

from .support.http_server import LoopbackServer, Route
from .support.redis_server import RedisServer, free_port

LEGACY = "abcdef123456"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJl"
ACCESS = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.YWNjZXNz"  # exp: 2100
USER = json.dumps({"id": 1, "email": "admin@example.com"}).encode()


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str], str]:
    """Exit status, {check: status}, and the whole report."""
    status = main(["doctor", *args])
    out = capsys.readouterr().out
    checks = dict(reversed(match) for match in
                  re.findall(r"^(OK|WARN|FAIL|SKIP) +(\w+(?: \w+)?) {2,}", out, re.MULTILINE))
    return status, checks, out


def fix_under(report: str, check: str) -> str:
    """The fix line printed right under a check's line."""
    lines = report.splitlines()
    index = next(i for i, line in enumerate(lines) if re.match(rf"^\w+ +{check}  ", line))
    assert lines[index + 1].strip().startswith("fix: "), report
    return lines[index + 1]


@pytest.fixture
def tiny_env(monkeypatch: pytest.MonkeyPatch, tiny_configs: dict[str, Path]) -> None:
    monkeypatch.setenv("MODEL_CONFIG", str(tiny_configs["clip"]))
    monkeypatch.setenv("MODEL_PRETRAINED", "none")
    monkeypatch.setenv("DEVICE", "cpu")


@pytest.fixture
def label_studio(monkeypatch: pytest.MonkeyPatch):
    with LoopbackServer() as server:
        server.add("/health", Route(b'{"status": "UP"}', content_type="application/json"))
        server.add("/api/current-user/whoami", Route(
            USER, content_type="application/json", require_header=("Authorization",
                                                                   f"Token {LEGACY}")))
        monkeypatch.setenv("LABEL_STUDIO_URL", server.base)
        yield server


def test_a_healthy_deployment_passes_every_check(capsys, tiny_env, label_studio, redis_url,
                                                 monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
    monkeypatch.setenv("BASIC_AUTH_USER", "label-studio")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pw-123")
    status, checks, report = doctor(capsys)
    assert status == 0, report
    assert checks == {"settings": "OK", "model dir": "OK", "store": "OK", "label studio": "OK",
                      "auth": "OK", "workers": "SKIP", "decoding": "OK", "device": "OK",
                      "model": "OK"}, report
    assert "admin@example.com" in report and "AOF on" in report
    assert "fix:" not in report


def test_decode_processes_are_started_once_or_skipped_without_them(capsys, tiny_env,
                                                                    monkeypatch):
    monkeypatch.setenv("DECODE_PROCESSES", "2")
    _, checks, report = doctor(capsys, "--skip-model")
    assert checks["decoding"] == "OK" and "through shared memory" in report, report
    # the server's arenas, at the tiny model's 32 px: 2 x 16 x 32 x 32 x 3 bytes
    assert "arenas: 2 processes x 16 slots of 32x32 px = 0.1 MiB" in report, report
    if Path("/dev/shm").is_dir():
        assert "free in /dev/shm" in report, report
    monkeypatch.setenv("DECODE_PROCESSES", "0")
    _, checks, report = doctor(capsys, "--skip-model")
    assert checks["decoding"] == "SKIP" and "DECODE_PROCESSES=0" in report, report


def test_the_decoding_check_warns_when_the_arenas_would_not_fit_in_dev_shm(capsys, tiny_env,
                                                                         monkeypatch):
    from backend.images import arenas

    slot = 32 * 32 * 3
    monkeypatch.setenv("DECODE_PROCESSES", "2")
    monkeypatch.setenv("WORKERS", "2")  # each server process has its own decode processes
    monkeypatch.setattr(arenas, "shm_free_bytes", lambda: 2 * 4 * 8 * slot)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["decoding"] == "WARN", report
    assert "4 processes x 16 slots (FETCH_CONCURRENCY)" in report, report
    assert "8 slots per process instead of 16" in report and "WORKERS=2 x 2" in report, report
    fix = fix_under(report, "decoding")
    assert "--shm-size" in fix and "shm_size" in fix and "FETCH_CONCURRENCY" in fix

    monkeypatch.setattr(arenas, "shm_free_bytes", lambda: 2 * 4 * arenas.MIN_SLOTS * slot - 1)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and checks["decoding"] == "FAIL", report
    assert "DECODE_PROCESSES=0" in fix_under(report, "decoding")


def test_the_arena_side_is_the_model_s_or_an_assumed_384_px():
    from backend.config import load_settings
    from backend.doctor import DEFAULT_SIDE, _model_side

    assert _model_side(load_settings(MODEL_NAME="ViT-B-16-SigLIP")) == (224, False)
    assert _model_side(load_settings(MODEL_NAME="ViT-B-16-SigLIP-384")) == (384, False)
    assert _model_side(load_settings(MODEL_NAME="hf-hub:org/model")) == (DEFAULT_SIDE, True)


def test_failing_checks_name_what_to_set_and_exit_1(capsys, tiny_env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1
    assert checks["store"] == "FAIL" and "REDIS_URL" in fix_under(report, "store")
    assert checks["label studio"] == "FAIL"
    assert "LABEL_STUDIO_URL" in fix_under(report, "label studio")
    assert "http://label-studio:8080" in fix_under(report, "label studio")  # the Docker pitfall
    assert checks["model"] == "SKIP"


def test_invalid_settings_fail_first_and_stop_the_checks(capsys, monkeypatch):
    monkeypatch.setenv("DEVICE", "gpu0")
    status, checks, report = doctor(capsys)
    assert status == 1 and checks == {"settings": "FAIL"}
    assert "DEVICE='gpu0'" in report and "fix:" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_device_that_is_not_there_fails_and_the_model_is_not_loaded(capsys, tiny_env,
                                                                       monkeypatch):
    monkeypatch.setenv("DEVICE", "cuda")
    status, checks, report = doctor(capsys)
    assert status == 1 and checks["device"] == "FAIL" and checks["model"] == "SKIP"
    assert "DEVICE=auto or cpu" in fix_under(report, "device")


def test_a_model_that_cannot_load_fails_with_its_reason(capsys, monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "no-such-arch")
    status, checks, report = doctor(capsys)
    assert status == 1 and checks["model"] == "FAIL"
    assert "is not an open_clip architecture" in report
    assert "MODEL_NAME" in fix_under(report, "model")


def test_an_unwritable_model_dir_fails(capsys, tiny_env, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MODEL_DIR", str(blocker / "model-dir"))
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and checks["model dir"] == "FAIL"
    assert "MODEL_DIR" in fix_under(report, "model dir")


def test_label_studio_skipped_without_its_url(capsys, tiny_env):
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["label studio"] == "SKIP" and checks["store"] == "OK"


def test_auth_is_reported_and_off_on_every_interface_warns(capsys, tiny_env, monkeypatch):
    status, checks, report = doctor(capsys, "--skip-model")  # the defaults: HOST=0.0.0.0
    assert status == 0 and checks["auth"] == "WARN", report
    assert "authentication is off and HOST=0.0.0.0" in report and "/setup" in report
    assert "BASIC_AUTH_USER" in fix_under(report, "auth")
    monkeypatch.setenv("HOST", "127.0.0.1")
    status, checks, report = doctor(capsys, "--skip-model")
    assert checks["auth"] == "OK" and "off, and HOST=127.0.0.1" in report
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    monkeypatch.setenv("BASIC_AUTH_PASS", "p")
    status, checks, report = doctor(capsys, "--skip-model")
    assert checks["auth"] == "OK" and "on: every route needs HTTP Basic auth" in report


def test_an_api_key_without_label_studio_url_fails_the_settings(capsys, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
    status, checks, report = doctor(capsys)
    assert status == 1 and checks == {"settings": "FAIL"}
    assert "Set LABEL_STUDIO_URL" in report and LEGACY not in report


def test_a_reachable_label_studio_without_token_only_warns(capsys, tiny_env, label_studio):
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["label studio"] == "WARN"
    assert "LABEL_STUDIO_API_KEY" in fix_under(report, "label studio")


def test_a_refused_token_fails(capsys, tiny_env, label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong-token")
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and checks["label studio"] == "FAIL"
    assert "LABEL_STUDIO_API_KEY was refused" in report
    assert "LABEL_STUDIO_API_KEY" in fix_under(report, "label studio")
    assert label_studio.requests[-1].headers["Authorization"] == "Token wrong-token"


def test_disabled_legacy_tokens_are_named(capsys, tiny_env, label_studio, monkeypatch):
    label_studio.add("/api/current-user/whoami", Route(
        b'{"detail": "legacy token authentication has been disabled for this organization"}',
        401, "application/json"))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and "legacy tokens are disabled" in report
    assert "personal access token" in fix_under(report, "label studio")


def test_a_personal_access_token_is_exchanged_and_sent_as_bearer(capsys, tiny_env, label_studio,
                                                                 monkeypatch):
    label_studio.add("/api/token/refresh/", Route(json.dumps({"access": ACCESS}).encode(),
                                                  content_type="application/json"))
    label_studio.add("/api/current-user/whoami", Route(
        USER, content_type="application/json", require_header=("Authorization",
                                                               f"Bearer {ACCESS}")))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["label studio"] == "OK", report
    assert json.loads(label_studio.requests[-2].body) == {"refresh": PAT}


def test_an_expired_personal_access_token_fails(capsys, tiny_env, label_studio, monkeypatch):
    label_studio.add("/api/token/refresh/", Route(b'{"detail": "Token is invalid"}', 401))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", PAT)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and "HTTP 401 from /api/token/refresh/" in report


def test_redis_without_persistence_warns(capsys, tiny_env, monkeypatch, tmp_path):
    with RedisServer(tmp_path / "redis") as server:  # its own: the session's keeps its AOF
        redis.Redis.from_url(server.url).config_set("appendonly", "no")
        monkeypatch.setenv("REDIS_URL", server.url)
        status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["store"] == "WARN"
    assert "--appendonly yes" in fix_under(report, "store")


def test_spooled_corrections_are_reported(capsys, tiny_env, monkeypatch, tmp_path):
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    (spool / "spool-0.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "state"))
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["model dir"] == "WARN" and "2 corrections spooled" in report


def test_rq_executor_without_workers_warns_and_without_redis_fails(capsys, tiny_env, monkeypatch,
                                                                   redis_url):
    monkeypatch.setenv("PRELABEL_EXECUTOR", "rq")
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 1 and checks["workers"] == "FAIL" and "REDIS_URL" in report
    monkeypatch.setenv("REDIS_URL", redis_url)
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["workers"] == "WARN"
    assert "python -m backend worker" in fix_under(report, "workers")


def test_python_m_backend_doctor_exits_1_on_failure():
    import os
    import subprocess
    import sys

    env = {**os.environ, "DEVICE": "gpu0"}
    result = subprocess.run([sys.executable, "-m", "backend", "doctor"], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stdout.startswith("FAIL  settings")


def test_dead_letters_and_the_unreplayed_spool_are_reported(capsys, tiny_env, monkeypatch,
                                                            tmp_path):
    spool = tmp_path / "state" / "spool"
    spool.mkdir(parents=True)
    (spool / "spool-0.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    (spool / "spool-0.offset").write_text(str(len('{"a": 1}\n')))  # the first one is replayed
    DeadLetters(spool).add(b'{"kind": "annotation"}\n', "TypeError: unhashable type: 'list'")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "state"))
    status, checks, report = doctor(capsys, "--skip-model")
    assert status == 0 and checks["model dir"] == "WARN"
    assert f"1 corrections the store could not apply were set aside as dead letters in " \
           f"{spool / 'dead-letters.jsonl'}; 2 more spooled" in report
    assert "python -m backend export dead-letters" in fix_under(report, "model dir")
