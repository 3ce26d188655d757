"""The data plane's decode processes, against real HTTP servers on loopback: same pixels, keys
and errors as in-process; the guards hold inside the processes; a killed process fails only
its own images and comes back; nothing is left in /dev/shm."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend import metrics
from backend.config import Settings, load_settings
from backend.errors import DecodeError, FetchError, ImageRefused
from backend.images.arenas import MIN_SLOTS, plan_arenas
from backend.images.decode import decode_image
from backend.images.fetch import ImageFetcher
from backend.images.plane import Decoded, DecodePlane
from backend.images.steps import apply_steps
from backend.labelstudio.client import LabelStudioAccess
from backend.store import embedding_key

from ..support.http_server import LoopbackServer, Recorded, Route

MODEL = "tiny/none"
SIDE = 32
STEPS = (("resize", (SIDE,), 3, None), ("center_crop", (SIDE, SIDE)), ("convert", "RGB"))
REPO = Path(__file__).resolve().parents[2]


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def run_plane(settings: Settings, body: Callable[[DecodePlane], Awaitable[Any]],
              processes: int = 1, **options: Any) -> Any:
    async def run() -> Any:
        plane = DecodePlane(settings, model=MODEL, steps=STEPS, side=SIDE, processes=processes,
                            **options)
        try:
            return await body(plane)
        finally:
            plane.close()

    return asyncio.run(run())


async def outcome(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return exc


def in_process(settings: Settings, ref: str, ls: LabelStudioAccess | None = None) -> Any:
    """What the in-process path makes of `ref`: (key, pixels or the decode error), or the
    fetch error."""
    async def run() -> Any:
        fetcher = ImageFetcher(settings)
        try:
            fetched = await fetcher.fetch(ref, ls=ls)
        except Exception as exc:  # noqa: BLE001
            return exc
        finally:
            await fetcher.aclose()
        key = embedding_key(MODEL, fetched.data)
        try:
            image = decode_image(fetched.data, max_pixels=settings.MAX_IMAGE_PIXELS,
                                 draft_size=SIDE, content_type=fetched.content_type,
                                 max_bytes=settings.MAX_DECODE_BYTES,
                                 formats=settings.image_formats)
            return key, np.asarray(apply_steps(image, STEPS))
        except Exception as exc:  # noqa: BLE001
            return key, exc

    return asyncio.run(run())


def test_pixels_keys_and_errors_are_those_of_the_in_process_path(loopback):
    served = {
        "/a.jpg": Route(jpeg(1)), "/wide.png": Route(jpeg(2, (300, 40), "PNG")),
        "/big.jpg": Route(jpeg(3, (900, 700))),
        "/truncated.jpg": Route(jpeg(4)[:300]), "/page.jpg": Route(b"<html>login</html>"),
        "/missing.jpg": Route(b"no", 404), "/huge.jpg": Route(b"\xff" * 300_000),
        "/bomb.png": Route(jpeg(5, (2000, 2000), "PNG")),
    }
    refs = [loopback.add(path, route) for path, route in served.items()]
    refs += ["http://10.0.0.1/a.jpg", "file:///etc/passwd", "data:image/png;base64"]
    settings = load_settings(MAX_IMAGE_BYTES=200_000, MAX_IMAGE_PIXELS=1_000_000)

    async def body(plane: DecodePlane) -> list[Any]:
        return await asyncio.gather(*(outcome(plane.decode(ref, 1, None)) for ref in refs))

    for ref, got in zip(refs, run_plane(settings, body, processes=2)):
        expected = in_process(settings, ref)
        if isinstance(expected, Exception):  # not fetched
            assert type(got) is type(expected) and str(got) == str(expected), ref
            continue
        assert isinstance(got, Decoded), f"{ref}: {got!r}"
        key, pixels = expected
        assert got.key == key
        if isinstance(pixels, Exception):  # fetched, not decoded
            assert type(got.pixels) is type(pixels) and str(got.pixels) == str(pixels), ref
        else:
            assert isinstance(got.pixels, np.ndarray), f"{ref}: {got.pixels!r}"
            assert got.pixels.dtype == np.uint8 and got.pixels.shape == (SIDE, SIDE, 3)
            assert np.array_equal(got.pixels, pixels), ref
    assert sum(isinstance(outcome, tuple) and isinstance(outcome[1], DecodeError)
               for outcome in map(lambda ref: in_process(settings, ref), refs)) >= 2


def test_the_address_guard_holds_in_the_decode_processes():
    with LoopbackServer("127.0.0.3") as server:
        server.add("/a.jpg", Route(jpeg()))
        hop = server.add("/hop", Route(status=302, headers={
            "Location": f"http://127.0.0.2:{server.port}/a.jpg"}))
        settings = load_settings(IMAGE_URL_ALLOWLIST="127.0.0.3")
        refs = {server.url("/a.jpg"): None,
                f"http://127.0.0.2:{server.port}/a.jpg": "loopback: refused",
                f"http://localhost:{server.port}/a.jpg": "loopback: refused",
                hop: "127.0.0.2 resolves to 127.0.0.2, loopback: refused",
                "http://169.254.169.254/latest/meta-data/": "cloud metadata address"}

        async def body(plane: DecodePlane) -> list[Any]:
            return [await outcome(plane.decode(ref, 1, None)) for ref in refs]

        for (ref, expected), got in zip(refs.items(), run_plane(settings, body)):
            if expected is None:
                assert isinstance(got, Decoded), got
            else:
                assert isinstance(got, ImageRefused) and expected in str(got), (ref, got)
        assert [r.path for r in server.requests] == ["/a.jpg", "/hop"]  # never the target


def test_the_label_studio_token_goes_only_to_label_studio_from_the_processes():
    token = "0123456789abcdef0123456789abcdef01234567"
    with LoopbackServer("127.0.0.4") as label_studio, LoopbackServer("127.0.0.3") as other:
        label_studio.add("/data/upload/1/a.jpg", Route(
            jpeg(), require_header=("Authorization", f"Token {token}")))
        foreign = other.add("/a.jpg", Route(status=302, headers={
            "Location": label_studio.url("/data/upload/1/a.jpg")}))
        ls = LabelStudioAccess(label_studio.base, token)
        settings = load_settings(IMAGE_URL_ALLOWLIST="127.0.0.3",
                                 LABEL_STUDIO_URL=label_studio.base)

        async def body(plane: DecodePlane) -> list[Any]:
            return [await outcome(plane.decode(ref, 1, ls))
                    for ref in ("/data/upload/1/a.jpg", foreign)]

        uploaded, redirected = run_plane(settings, body)
        assert isinstance(uploaded, Decoded)
        assert isinstance(redirected, FetchError) and "HTTP 401" in str(redirected)
        assert [r.headers.get("Authorization") for r in label_studio.requests] == [
            f"Token {token}", None]
        assert all("Authorization" not in r.headers for r in other.requests)


def test_a_killed_decode_process_fails_only_its_images_and_is_restarted(loopback):
    received, release = threading.Event(), threading.Event()

    def held(record: Recorded) -> Route:
        received.set()
        release.wait(60)  # until the test has killed the process fetching it
        return Route(jpeg())

    slow = loopback.add("/slow.jpg", held)
    fast = loopback.add("/fast.jpg", Route(jpeg(7)))
    restarts = metrics.DECODE_PROCESS_RESTARTS._value.get()

    async def body(plane: DecodePlane) -> tuple[Any, ...]:
        doomed = asyncio.ensure_future(outcome(plane.decode(slow, 1, None)))
        await asyncio.to_thread(received.wait, 60)
        [holder] = [w for w in plane._workers if w.jobs]
        other = await outcome(plane.decode(fast, 2, None))  # the other process: unaffected
        os.kill(holder.process.pid, signal.SIGKILL)
        failed = await doomed
        after = [await outcome(plane.decode(fast, 3, None)) for _ in range(3)]
        return other, failed, after, plane.restarts, plane.alive

    try:
        other, failed, after, count, alive = run_plane(load_settings(), body, processes=2)
    finally:
        release.set()
    assert isinstance(other, Decoded)
    assert isinstance(failed, DecodeError)
    assert "killed by SIGKILL" in str(failed) and "It was restarted" in str(failed)
    assert all(isinstance(result, Decoded) for result in after)
    assert count == 1 and alive == 2
    assert metrics.DECODE_PROCESS_RESTARTS._value.get() == restarts + 1


def test_each_stage_s_cpu_time_is_counted(loopback):
    refs = [loopback.add(f"/{i}.jpg", Route(jpeg(i, (400, 300)))) for i in range(4)]
    before = {stage: metrics.PLANE_CPU_SECONDS.labels(stage)._value.get()
              for stage in ("fetch", "hash", "decode", "preprocess")}

    async def body(plane: DecodePlane) -> list[Any]:
        return await asyncio.gather(*(plane.decode(ref, 1, None) for ref in refs))

    run_plane(load_settings(), body)
    for stage, seconds in before.items():
        assert metrics.PLANE_CPU_SECONDS.labels(stage)._value.get() > seconds, stage


SHUTDOWN_SCRIPT = textwrap.dedent("""
    import asyncio, base64, io, os, signal
    from PIL import Image
    from backend.config import load_settings
    from backend.images.plane import DecodePlane

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    steps = (("resize", (32,), 3, None), ("center_crop", (32, 32)), ("convert", "RGB"))

    async def main():
        plane = DecodePlane(load_settings(), model="m", steps=steps, side=32, processes=2)
        await plane.decode(uri, 1, None)
        print("segments", " ".join(w.arena.name for w in plane._workers), flush=True)
        os.kill(plane._workers[0].process.pid, signal.SIGKILL)
        while plane.restarts == 0:
            await asyncio.sleep(0.01)  # polling the outcome of a kill, not standing in for it
        await asyncio.gather(*(plane.decode(uri, 1, None) for _ in range(4)))
        plane.close()

    asyncio.run(main())
""")


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_shutdown_leaves_no_shared_memory_and_no_resource_tracker_warning(tmp_path):

    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = done.stdout.split("segments", 1)[1].split()
    assert len(names) == 2
    assert not {name.lstrip("/") for name in names} & shm()

    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def broken_start() -> None:
    raise RuntimeError("this decode process is broken on purpose")


def test_processes_that_cannot_start_fail_the_images_with_a_reason(monkeypatch, loopback):
    from backend.images import plane

    monkeypatch.setattr(plane, "CHILD_SETUP", [*plane.CHILD_SETUP, broken_start])
    url = loopback.add("/a.jpg", Route(jpeg()))

    async def body(plane: DecodePlane) -> Any:
        return await outcome(plane.decode(url, 1, None))

    failed = run_plane(load_settings(), body)
    assert isinstance(failed, DecodeError), failed
    assert "cannot start (one exited with status 1" in str(failed)
    assert "DECODE_PROCESSES=0" in str(failed)


# --- slots and shared memory -----------------------------------------------------------------
SLOT = SIDE * SIDE * 3


def test_each_process_has_fetch_concurrency_slots_however_many_processes_there_are():
    for concurrency, expected in ((16, 16), (24, 24), (1, MIN_SLOTS)):
        settings = load_settings(FETCH_CONCURRENCY=concurrency)
        for processes in (1, 2, 16):
            plane = DecodePlane(settings, model=MODEL, steps=STEPS, side=SIDE,
                                processes=processes)
            assert plane.slots_per_process == expected, (concurrency, processes)
            assert plane.background_slots == processes * expected // 2
            assert plane.plan.bytes == processes * expected * SLOT


def test_arenas_take_at_most_half_the_free_shared_memory_and_never_under_min_slots():
    settings = load_settings(FETCH_CONCURRENCY=16)
    mib = 2**20
    # a 16-core GPU box at 384 px needs 108 MiB; Docker's default /dev/shm is 64 MiB
    docker = plan_arenas(settings, 16, 384, 64 * mib)
    assert docker.wanted_bytes == 16 * 16 * 384 * 384 * 3
    assert (docker.slots, docker.reduced, docker.fits) == (4, True, True)
    assert docker.bytes <= 32 * mib < docker.bytes + 16 * 384 * 384 * 3
    roomy = plan_arenas(settings, 16, 384, 1024 * mib)
    assert (roomy.slots, roomy.reduced, roomy.bytes) == (16, False, roomy.wanted_bytes)
    unknown = plan_arenas(settings, 16, 384, None)  # no /dev/shm here: nothing to check against
    assert (unknown.slots, unknown.reduced, unknown.fits) == (16, False, True)
    exact = plan_arenas(settings, 2, SIDE, 2 * 2 * MIN_SLOTS * SLOT)
    assert (exact.slots, exact.fits) == (MIN_SLOTS, True)
    short = plan_arenas(settings, 2, SIDE, 2 * 2 * MIN_SLOTS * SLOT - 1)
    assert not short.fits and "free in /dev/shm" in short.shortage()


def test_tight_shared_memory_means_fewer_slots_and_one_warning_naming_the_fix(loopback,
                                                                              caplog):
    url = loopback.add("/a.jpg", Route(jpeg()))
    free = 2 * 5 * SLOT  # half of it: 5 slots for the one process

    async def body(plane: DecodePlane) -> Any:
        decoded = await asyncio.gather(*(plane.decode(url, 1, None) for _ in range(8)))
        [worker] = plane._workers
        return decoded, plane.slots_per_process, worker.slots, len(worker.free)

    with caplog.at_level("WARNING", logger="backend.images.plane"):
        decoded, slots, worker_slots, free_slots = run_plane(
            load_settings(FETCH_CONCURRENCY=16), body, shm_free=lambda: free)
    assert all(isinstance(result, Decoded) for result in decoded)
    assert slots == worker_slots == free_slots == 5
    [warning] = [r for r in caplog.records if r.name == "backend.images.plane"]
    message = warning.getMessage()
    assert "5 slots per process instead of 16" in message
    assert "--shm-size" in message and "shm_size" in message and "DECODE_PROCESSES" in message


def test_shared_memory_too_small_for_min_slots_fails_the_images_naming_the_fix():
    async def body(plane: DecodePlane) -> Any:
        failed = await outcome(plane.decode("data:image/png;base64,AAAA", 1, None))
        return failed, plane._workers, plane.alive

    failed, workers, alive = run_plane(load_settings(), body, processes=2,
                                       shm_free=lambda: 2 * 2 * MIN_SLOTS * SLOT - 1)
    assert isinstance(failed, DecodeError), failed
    assert "--shm-size" in str(failed) and "DECODE_PROCESSES=0" in str(failed)
    assert workers == [] and alive == 0  # no arena created, no process started
