"""`python -m backend doctor`: check a deployment before Label Studio finds out it is broken.

Checks, in order: settings, local state directory, store, Label Studio (URL and token),
auth (who may call the server), pre-label workers (with PRELABEL_EXECUTOR=rq), device, model.
Each prints OK, WARN, FAIL or SKIP; a WARN or FAIL says what to set. Exit status: 1 if any
check failed, else 0 (warnings alone do not fail).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import httpx

from .config import Settings, load_settings
from .corrections.dead_letters import DeadLetters
from .corrections.journal import spooled_entries
from .errors import BackendError, ConfigError, FetchError, StoreUnavailable
from .labelstudio.client import LabelStudioAccess, origin
from .netguard import AddressPolicy, GuardedTransport
from .web.middleware import OPEN_ROUTES_FIX, exposure

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
WHOAMI = "/api/current-user/whoami"
LS_TIMEOUT_S = 10.0
COMPOSE_HINT = "in Docker Compose use service names, e.g. {example}, never localhost"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def run(out: TextIO, *, skip_model: bool = False) -> int:
    """Run every check, print one line (plus a fix) per check; 1 if any failed, else 0."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _print(out, Check("settings", "FAIL", str(exc), "set the variables named above "
                          "(every setting is described in .env.example); nothing else was "
                          "checked"))
        return 1
    checks = [Check("settings", "OK", "valid")]
    _print(out, checks[0])
    for check in _checks(settings, skip_model):
        _print(out, check)
        checks.append(check)
    failed = sum(check.status == "FAIL" for check in checks)
    warned = sum(check.status == "WARN" for check in checks)
    out.write(f"\n{failed} failed, {warned} warnings, {len(checks)} checks\n")
    return 1 if failed else 0


def _checks(settings: Settings, skip_model: bool) -> Iterable[Check]:
    steps: list[Callable[[Settings], Check]] = [check_model_dir, check_store,
                                                check_label_studio, check_auth, check_workers,
                                                check_decode_processes]
    for step in steps:
        yield step(settings)
    device = check_device(settings)
    yield device
    if skip_model:
        yield Check("model", "SKIP", "--skip-model")
    elif device.status == "FAIL":
        yield Check("model", "SKIP", "not loaded: the device check failed")
    else:
        yield check_model(settings)


def _print(out: TextIO, check: Check) -> None:
    out.write(f"{check.status:<5} {check.name:<13} {check.detail}\n")
    if check.fix and check.status in ("WARN", "FAIL"):
        out.write(f"{'':<5} {'':<13} fix: {check.fix}\n")
    out.flush()


# --- local state and store -------------------------------------------------------------------
def check_model_dir(settings: Settings) -> Check:
    """MODEL_DIR holds the spool (always) and the embedded store (without Redis)."""
    where = settings.MODEL_DIR.resolve()
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("model dir", "FAIL", f"{where} is not writable ({exc.strerror or exc})",
                     "set MODEL_DIR to a writable directory (in Docker, a volume owned by the "
                     "container's user); corrections are spooled there while the store is down")
    return _spool_check(where)


def _spool_check(where: Path) -> Check:
    """Entries waiting in the spool, and dead letters: entries the store could never apply."""
    pending, dead = spooled_entries(where / "spool"), DeadLetters(where / "spool")
    count = dead.count()
    waiting = f"; {pending} more spooled, waiting for the store" if pending else ""
    if count:
        return Check("model dir", "WARN", f"{where}: {count} corrections the store could not "
                     f"apply were set aside as dead letters in {dead.path}{waiting}",
                     "read them with `python -m backend export dead-letters -o FILE`, fix "
                     "each `entry` as its `reason` says, then `python -m backend replay "
                     "dead-letters --input FILE`")
    if pending:
        return Check("model dir", "WARN", f"{where}: {pending} corrections spooled, waiting for "
                     "the store", "start the store; the server replays the spool when it can "
                     "(if the store is up and this number stays, check "
                     "backend_spool_replay_alive and backend_spool_replay_restarts_total on "
                     "/metrics, and the server's log)")
    return Check("model dir", "OK", f"{where} is writable, nothing spooled")


def check_store(settings: Settings) -> Check:
    from .store import open_store

    if not settings.REDIS_URL:
        target = f"embedded SQLite store in {settings.MODEL_DIR}"
        fix = "set MODEL_DIR to a writable directory, or REDIS_URL to a Redis"
    else:
        target = f"Redis at {_redacted(settings.REDIS_URL)}"
        fix = ("start Redis, or set REDIS_URL to where it runs (" +
               COMPOSE_HINT.format(example="redis://redis:6379/0") +
               "); unset REDIS_URL to use the embedded SQLite store")
    try:
        store = open_store(settings)
        try:
            store.ping()
        finally:
            store.close()
    except (StoreUnavailable, OSError) as exc:
        return Check("store", "FAIL", str(exc), fix)
    if settings.REDIS_URL:
        return _redis_persistence(settings.REDIS_URL, settings.REDIS_TIMEOUT_S, target)
    return Check("store", "OK", f"{target} is reachable")


def _redis_persistence(url: str, timeout_s: float, target: str) -> Check:
    """Acknowledged corrections live in Redis: without AOF, a Redis restart loses them."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, decode_responses=True)
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
    except redis.RedisError:  # CONFIG is often disabled on managed Redis: cannot tell
        return Check("store", "OK", f"{target} is reachable (persistence not checked)")
    finally:
        client.close()
    if appendonly != "yes":
        return Check("store", "WARN", f"{target} is reachable, but runs without AOF "
                     "persistence: a Redis restart loses corrections",
                     "start redis-server with --appendonly yes --appendfsync always")
    return Check("store", "OK", f"{target} is reachable, AOF on")


def _redacted(url: str) -> str:
    parts = httpx.URL(url)
    return str(parts.copy_with(password="***")) if parts.password else url


# --- Label Studio ----------------------------------------------------------------------------
def check_label_studio(settings: Settings) -> Check:
    url = settings.LABEL_STUDIO_URL
    if not url:
        return Check("label studio", "SKIP", "LABEL_STUDIO_URL is not set: the backend uses the "
                     "hostname and token Label Studio sends in /setup (set LABEL_STUDIO_URL and "
                     "LABEL_STUDIO_API_KEY to check them here)")
    ls = LabelStudioAccess(url, settings.LABEL_STUDIO_API_KEY)
    return asyncio.run(_probe(ls, settings))


async def _probe(ls: LabelStudioAccess, settings: Settings) -> Check:
    timeout = httpx.Timeout(LS_TIMEOUT_S, connect=settings.CONNECT_TIMEOUT_S)
    # the image fetcher's transport (address guard, private CAs, no proxy) and no redirects
    policy = AddressPolicy.parse(settings.IMAGE_URL_ALLOWLIST, [origin(ls.url)[1]])
    transport = GuardedTransport(policy, httpx.Limits())
    async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                 transport=transport) as client:
        try:
            headers = await ls.auth_headers(client)
            path = WHOAMI if ls.token else "/health"
            response = await client.get(ls.absolute(path), headers=headers)
        except FetchError as exc:  # the personal access token could not be exchanged
            return Check("label studio", "FAIL", str(exc), _TOKEN_FIX)
        except httpx.HTTPError as exc:
            return Check("label studio", "FAIL", f"cannot reach Label Studio at {ls.url} "
                         f"({type(exc).__name__}: {exc})", _unreachable_fix())
    return _judge(ls, response)


_TOKEN_FIX = ("set LABEL_STUDIO_API_KEY to a personal access token (Label Studio: Account & "
              "Settings → Personal Access Token) or to a legacy token where those are enabled")


def _unreachable_fix() -> str:
    return ("set LABEL_STUDIO_URL to Label Studio's address as this backend reaches it (" +
            COMPOSE_HINT.format(example="http://label-studio:8080") + ")")


def _judge(ls: LabelStudioAccess, response: httpx.Response) -> Check:
    code = response.status_code
    if code == 200 and not ls.token:
        return Check("label studio", "WARN", f"{ls.url} is up, but LABEL_STUDIO_API_KEY is not "
                     "set: images stored in Label Studio are fetched with the legacy token "
                     "from /setup (only if its hostname is this same URL), which Label Studio "
                     "≥ 1.22 disables by default", _TOKEN_FIX)
    if code == 200:
        who = _user(response)
        return Check("label studio", "OK", f"{ls.url}: token accepted" + (f" ({who})" if who
                                                                           else ""))
    if code in (401, 403):
        legacy_off = "legacy token" in response.text.lower()
        why = ("legacy tokens are disabled in this organisation" if legacy_off
               else "LABEL_STUDIO_API_KEY was refused")
        return Check("label studio", "FAIL", f"{ls.url}: HTTP {code}, {why}", _TOKEN_FIX)
    if code in (301, 302, 303, 307, 308):
        return Check("label studio", "FAIL", f"{ls.url}{WHOAMI} redirects to "
                     f"{response.headers.get('location')!r}", "set LABEL_STUDIO_URL to Label "
                     "Studio's base URL itself (scheme, host, port; no path), e.g. "
                     "http://label-studio:8080")
    return Check("label studio", "FAIL", f"{ls.url}{WHOAMI}: HTTP {code}", _unreachable_fix())


def _user(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    who = body.get("email") or body.get("username")
    return str(who) if who else None


# --- who may call ----------------------------------------------------------------------------
def check_auth(settings: Settings) -> Check:
    """Whether the server's routes need credentials, judged on HOST as `serve` uses it."""
    if settings.auth_enabled:
        secret = " (/webhook also takes WEBHOOK_SECRET)" if settings.WEBHOOK_SECRET else ""
        return Check("auth", "OK", f"on: every route needs HTTP Basic auth{secret}")
    warning = exposure(settings, settings.HOST, settings.PORT)
    if warning:
        return Check("auth", "WARN", f"off: {warning}", OPEN_ROUTES_FIX)
    return Check("auth", "OK", f"off, and HOST={settings.HOST} accepts connections from this "
                 "machine only")


# --- device and model ------------------------------------------------------------------------
def check_decode_processes(settings: Settings) -> Check:
    """One decode process started and given one image: what /predict needs from this machine
    (process spawning, shared memory in /dev/shm); and whether the shared memory the server's
    decode processes plan (their arenas) fits in /dev/shm's free space."""
    if settings.DECODE_PROCESSES == 0:
        return Check("decoding", "SKIP", "DECODE_PROCESSES=0: images decode in threads")
    try:
        side = asyncio.run(_decode_once(settings))
    except Exception as exc:  # noqa: BLE001 - whatever stops it, /predict would meet it too
        return Check("decoding", "FAIL", f"{type(exc).__name__}: {exc}",
                     "give the container shared memory (/dev/shm, e.g. Compose shm_size) and "
                     "leave process spawning allowed, or set DECODE_PROCESSES=0")
    decoded = f"a decode process decoded an image ({side}x{side} pixels through shared memory)"
    return _arena_check(settings, decoded)


def _arena_check(settings: Settings, decoded: str) -> Check:
    """The server's arenas (every server process's, at the model's input side) against the free
    space in /dev/shm: WARN when the server will use fewer slots than FETCH_CONCURRENCY, FAIL
    when it cannot start its decode processes at all."""
    from .images import arenas, plane

    side, assumed = _model_side(settings)
    per_server = plane.plane_processes(settings, os.cpu_count())
    plan = arenas.plan_arenas(settings, per_server * settings.WORKERS, side,
                              arenas.shm_free_bytes())
    notes = [f"WORKERS={settings.WORKERS} x {per_server}"] if settings.WORKERS > 1 else []
    notes += [f"assuming {side} px until the model loads"] if assumed else []
    planned = f"shared-memory arenas: {plan.describe()}"
    planned += f" ({'; '.join(notes)})" if notes else ""
    if not plan.fits:
        return Check("decoding", "FAIL", f"{decoded}, but {plan.shortage()}, even at "
                     f"{arenas.MIN_SLOTS} slots per process",
                     f"{arenas.SHM_FIX}, or set DECODE_PROCESSES=0")
    if plan.reduced:
        return Check("decoding", "WARN", f"{decoded}, but {plan.shortage()}: the server will "
                     f"use {plan.slots} slots per process instead of {plan.wanted}; "
                     f"{planned}", arenas.SHM_FIX)
    return Check("decoding", "OK", f"{decoded}; {planned}")


DEFAULT_SIDE = 384
"""The input side assumed when it is not known without loading the model (hf-hub: and
local-dir: models): the largest of the common CLIP and SigLIP models."""


def _model_side(settings: Settings) -> tuple[int, bool]:
    """The model's input side from its open_clip config, read without importing open_clip
    (seconds); (DEFAULT_SIDE, True) when it cannot be."""
    from .zeroshot.encoder import ModelSpec

    spec = ModelSpec.from_settings(settings)
    path = spec.config_path
    if path is None and not spec.has_schema:
        found = importlib.util.find_spec("open_clip")
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / "model_configs" / (
                f"{spec.name}.json")
    if path is None:
        return DEFAULT_SIDE, True
    try:
        size = json.loads(path.read_text())["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size), False
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return DEFAULT_SIDE, True


async def _decode_once(settings: Settings) -> int:
    from .images.plane import DecodePlane

    side = 16
    plane = DecodePlane(settings, model="doctor", side=side, processes=1,
                        steps=(("resize", (side, side), 2, None),))
    try:
        decoded = await asyncio.wait_for(plane.decode(_PIXEL, None, None), 60)
    finally:
        plane.close()
    if isinstance(decoded.pixels, BaseException):
        raise decoded.pixels
    return int(decoded.pixels.shape[0])


_PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGM4"
          "wcUFAAJ6AN1nJ0J9AAAAAElFTkSuQmCC")
"""A 1x1 PNG: decoding it needs no network."""


def check_workers(settings: Settings) -> Check:
    """With PRELABEL_EXECUTOR=rq, jobs wait for `python -m backend worker` processes."""
    if settings.PRELABEL_EXECUTOR != "rq":
        return Check("workers", "SKIP", "PRELABEL_EXECUTOR=local: jobs run in the server")
    if not settings.REDIS_URL:
        return Check("workers", "FAIL", "PRELABEL_EXECUTOR=rq needs a shared Redis",
                     "set REDIS_URL on the backend and on every worker")
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    from .jobs.executors import queue_name

    try:
        connection = Redis.from_url(settings.REDIS_URL, socket_timeout=settings.REDIS_TIMEOUT_S)
        queue = Queue(queue_name(settings), connection=connection)
        workers, waiting = len(Worker.all(queue=queue)), queue.count
    except RedisError as exc:
        return Check("workers", "FAIL", f"cannot list workers: {exc}", "check REDIS_URL")
    if not workers:
        return Check("workers", "WARN", f"no worker listens on {queue.name} ({waiting} items "
                     "waiting)", "start `python -m backend worker` (one per GPU) with the "
                     "backend's settings")
    return Check("workers", "OK", f"{workers} worker(s) on {queue.name}, {waiting} items waiting")


def check_device(settings: Settings) -> Check:
    import torch

    from .zeroshot.encoder import resolve_device

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    seen = (f"torch {torch.__version__}, CUDA devices: {cuda}" +
            (f" ({torch.cuda.get_device_name(0)})" if cuda else "") + (", MPS" if mps else ""))
    try:
        device = resolve_device(settings.DEVICE)
    except ConfigError as exc:
        return Check("device", "FAIL", f"{exc} ({seen})", _device_fix(settings))
    if device.type == "cuda" and device.index is not None and device.index >= cuda:
        return Check("device", "FAIL", f"DEVICE={settings.DEVICE} but only {cuda} CUDA "
                     f"device(s) are visible ({seen})", _device_fix(settings))
    threads = settings.THREADS or torch.get_num_threads()
    return Check("device", "OK", f"DEVICE={settings.DEVICE} → {device} ({seen}; "
                 f"{threads} CPU threads)")


def _device_fix(settings: Settings) -> str:
    return ("set DEVICE=auto or cpu, or give the process the GPU (Docker: run the GPU image "
            "with --gpus all; Compose: --profile gpu)"
            if not settings.DEVICE.startswith("mps") else "set DEVICE=auto or cpu")


def check_model(settings: Settings) -> Check:
    """Load the model exactly as the server does (weights are downloaded if not cached)."""
    from .zeroshot.encoder import ModelSpec, load_encoder

    label = ModelSpec.from_settings(settings).label()
    started = time.perf_counter()
    try:
        encoder = load_encoder(settings)
        encoder.encode_texts(["a photo of a cat."])
    except BackendError as exc:
        return Check("model", "FAIL", f"{label}: {exc}", _MODEL_FIX)
    except Exception as exc:  # noqa: BLE001 - whatever stops the load is the answer
        return Check("model", "FAIL", f"{label}: {type(exc).__name__}: {exc}", _MODEL_FIX)
    return Check("model", "OK", f"{label} loaded and encoded a prompt in "
                 f"{time.perf_counter() - started:.1f} s")


_MODEL_FIX = ("set MODEL_NAME / MODEL_PRETRAINED (or MODEL_CONFIG) to a model this machine can "
              "load; offline, point them at local files or set HF_HOME to a populated cache "
              "with HF_HUB_OFFLINE=1 (README: Models)")
