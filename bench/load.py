"""Load: concurrent /predict clients plus webhooks against the real server process, in one run.

    python bench/load.py [--model ViT-B-32] [--seconds 60] [--clients 50] [--overload]

Starts `python -m backend serve` as users run it (random weights: a tiny test architecture,
or --model), serves a pool of JPEG and PNG images (mostly small, a few of 2-12 MP, with
sensor-like grain so files weigh what photos do: 12 MP JPEG ≈ 2.5 MB) from a loopback server
in this process, and for --seconds runs at once:
  /predict   --clients clients, each POSTing batches of 1-8 tasks (random images, a label
             config with 10 choices, project "1.1") one after another;
  /webhook   --webhook-clients clients, each POSTing ANNOTATION_CREATED events;
  /health    one prober, in its own process (so this process's load does not count), GETting
             /health every 50 ms as Label Studio's connection check does.
Each downloaded image carries distinct bytes, as new tasks do, so every image is fetched,
decoded and encoded (the server runs with IMAGE_REF_TTL_S=0, so a URL seen before is fetched
again); --repeat-images serves identical bytes with the default TTL: repeats are re-scored
from the embedding cache without a download.
Timeouts are Label Studio's: 1 s for /health and /webhook, 100 s for /predict.
Error: a transport error, a timeout, a non-2xx answer or a task answered without a result.
A 503 counts as an error unless --overload (then it is load shed); it is reported either way,
and the client waits as its Retry-After asks. The server reads the environment this script gets:
`MAX_PENDING_TASKS=100 python bench/load.py --overload` exercises its admission control.
Exit status 0 when there are no errors and /health p99 < 100 ms, else 1 (the reasons printed).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.http_server import LoopbackServer, Recorded, Route  # noqa: E402
from tests.support.tiny_models import write_config  # noqa: E402
from tests.support.webhooks import annotation_event, choice_result  # noqa: E402

# Light imports only up to here: the /health prober's process imports this file again.

LABELS = ["cat", "dog", "bird", "car", "bicycle", "person", "tree", "building", "boat", "food"]
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<Choices name="category" toName="image" choice="single">'
          + "".join(f'<Choice value="{label}"/>' for label in LABELS) + "</Choices></View>")
PROJECT = "1.1"  # Label Studio sends "<project id>.<config timestamp>"
GRAIN = 6.0
"""Standard deviation of the Gaussian noise added to every pixel value."""
POOL = ((0.1, "JPEG", 12), (0.3, "JPEG", 12), (0.3, "PNG", 6), (2.0, "JPEG", 3),
        (2.0, "PNG", 1), (6.0, "JPEG", 2), (12.0, "JPEG", 2))
"""(megapixels, format, how many) of the served images."""
BUDGET_S = {"/health": 1.0, "/predict": 100.0, "/webhook": 1.0}
HEALTH_EVERY_S = 0.05
HEALTH_P99_MS = 100.0
ROUTES = ("/predict", "/webhook", "/health")


@dataclass
class Tally:
    """What one route saw: latencies of 2xx answers, outcomes of every request."""

    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    units: int = 0
    """Images predicted (/predict) or events accepted (/webhook)."""
    details: dict[str, str] = field(default_factory=dict)
    """The first answer or exception message of each kind of failure."""

    def count(self, outcome: str, latency: float | None = None, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if latency is not None:
            self.latencies.append(latency)
        if outcome != "ok":
            self.details.setdefault(outcome, detail[:300])

    def errors(self, overload: bool) -> Counter[str]:
        return Counter({key: n for key, n in self.outcomes.items()
                        if key != "ok" and not (overload and key == "503")})

    def percentiles_ms(self) -> list[float]:
        if not self.latencies:
            return [float("nan")] * 4
        return [*np.percentile(self.latencies, [50, 95, 99]) * 1000, max(self.latencies) * 1000]


@dataclass
class Report:
    args: argparse.Namespace
    tallies: dict[str, Tally] = field(default_factory=lambda: {r: Tally() for r in ROUTES})
    seconds: float = 0.0
    rss_mib: list[float] = field(default_factory=list)
    """Server RSS sampled every second, from start to end."""
    cpu_cores: tuple[float, ...] = (0.0, 0.0, 0.0)
    """CPU time / wall time during the load: the server, this process, all other processes."""
    counters: dict[str, float] = field(default_factory=dict)
    log: str = ""

    def errors(self) -> Counter[str]:
        return sum((Counter({f"{route} {k}": n for k, n in t.errors(self.args.overload).items()})
                    for route, t in self.tallies.items()), Counter())

    def health_p99_ms(self) -> float:
        return self.tallies["/health"].percentiles_ms()[2]

    def failures(self) -> list[str]:
        why = []
        errors = sum(self.errors().values())
        if errors:
            why.append(f"{errors} errors")
        if not self.health_p99_ms() < HEALTH_P99_MS:
            why.append(f"/health p99 {self.health_p99_ms():.1f} ms >= {HEALTH_P99_MS:g} ms")
        return why


# --- the server and its images -------------------------------------------------------------
def backend_env(args: argparse.Namespace, tmp: Path) -> dict[str, str]:
    model = ({"MODEL_NAME": args.model} if args.model
             else {"MODEL_CONFIG": str(write_config(tmp / "model"))})
    # every download brings new bytes (as new tasks do), unless --repeat-images: so URLs are
    # never trusted to still hold what they held (IMAGE_REF_TTL_S=0), every image is fetched
    ttl = {} if args.repeat_images else {"IMAGE_REF_TTL_S": "0"}
    return {**model, **ttl, "MODEL_PRETRAINED": "none", "MODEL_DIR": str(tmp / "model-dir"),
            "IMAGE_URL_ALLOWLIST": "127.0.0.1", "LOG_LEVEL": "WARNING"}


def start_backend(env: dict[str, str], log_path: Path) -> Any:
    """`python -m backend serve`, as users run it."""
    from tests.support.backend_process import BackendProcess  # heavy: keep out of the prober

    return BackendProcess(env, log_path)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(kib.group(1)) / 1024 if kib else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU time all processes used: the first line of /proc/stat less idle and iowait."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_clock(pid: int) -> tuple[float, float, float, float]:
    """CPU seconds of the server, of this process and of the machine; the wall clock."""
    return cpu_seconds(pid), time.process_time(), machine_cpu_seconds(), time.perf_counter()


def cores_used(start: tuple[float, ...], end: tuple[float, ...]) -> tuple[float, ...]:
    """(server, this process, other processes) CPU cores used between two cpu_clock()s."""
    server, this, machine, wall = (b - a for a, b in zip(start, end))
    return server / wall, this / wall, max(0.0, machine - server - this) / wall


def pool_images() -> Iterator[tuple[str, bytes]]:
    """(format, bytes) of every POOL image: photo-like content, so sizes are realistic."""
    from bench.predict_throughput import photo_like_jpeg  # imports torch: keep out of the prober

    seeds = itertools.count()
    for megapixels, fmt, n in POOL:
        for _ in range(n):
            seed = next(seeds)
            yield fmt, grained(photo_like_jpeg(megapixels, seed), fmt, seed)


def grained(jpeg: bytes, fmt: str, seed: int) -> bytes:
    """The image with sensor-like noise, encoded as `fmt`: photo-sized files."""
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, GRAIN, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, fmt, quality=90)
    return buffer.getvalue()


def image_route(data: bytes, content_type: str, distinct: bool) -> Callable[[Recorded], Route]:
    """Serve `data`, or `data` plus random bytes after its end marker (decoders ignore them):
    a new image as far as the embedding cache (keyed by the bytes' hash) can tell."""
    def serve(_: Recorded) -> Route:
        return Route(data + os.urandom(16) if distinct else data, content_type=content_type)
    return serve


def serve_pool(server: LoopbackServer, distinct: bool) -> list[str]:
    urls = []
    for i, (fmt, data) in enumerate(pool_images()):
        kind = fmt.lower()
        urls.append(server.add(f"/pool/{i}.{kind}", image_route(data, f"image/{kind}", distinct)))
    return urls


# --- clients ---------------------------------------------------------------------------------
async def request(client: httpx.AsyncClient, tally: Tally, path: str,
                  body: dict[str, Any]) -> httpx.Response | None:
    """POST, counting the outcome; the response when it is a 2xx."""
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body, timeout=BUDGET_S[path])
    except httpx.HTTPError as exc:
        tally.count(type(exc).__name__, detail=str(exc))
        return None
    if not response.is_success:
        tally.count(str(response.status_code), detail=response.text)
        if response.status_code == 503:  # shed: back off as asked, as a polite client does
            await asyncio.sleep(retry_after_s(response))
        return None
    tally.count("ok", time.perf_counter() - started)
    return response


def retry_after_s(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("retry-after", "1"))
    except ValueError:  # an HTTP date: not sent by this backend
        return 1.0


def predict_body(rng: random.Random, ids: Iterator[int], urls: list[str]) -> dict[str, Any]:
    tasks = [{"id": next(ids), "project": 1, "data": {"image": rng.choice(urls)},
              "annotations": [], "predictions": []} for _ in range(rng.randint(1, 8))]
    return {"tasks": tasks, "label_config": CONFIG, "project": PROJECT,
            "params": {"login": None, "password": None, "context": None}}


def count_images(tally: Tally, response: httpx.Response) -> None:
    for result in response.json()["results"]:
        if "result" in result:
            tally.units += 1
        else:
            tally.count("failed task", detail=result.get("error", ""))


async def predict_client(client: httpx.AsyncClient, tally: Tally, urls: list[str],
                         ids: Iterator[int], deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        response = await request(client, tally, "/predict", predict_body(rng, ids, urls))
        if response is not None:
            count_images(tally, response)


async def webhook_client(client: httpx.AsyncClient, tally: Tally, urls: list[str],
                         ids: Iterator[int], deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        annotation = next(ids)
        event = annotation_event(annotation, annotation,  # one annotation per task
                                 choice_result(rng.choice(LABELS), control="category"),
                                 project_id=1, image=rng.choice(urls), label_config=CONFIG)
        if await request(client, tally, "/webhook", event) is not None:
            tally.units += 1


def probe_health(url: str, seconds: float) -> tuple[list[float], dict[str, int]]:
    """GET /health every HEALTH_EVERY_S for `seconds` (runs in its own process)."""
    latencies, outcomes = [], Counter[str]()
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=BUDGET_S["/health"]) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                outcome = str(client.get("/health").status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            elapsed = time.perf_counter() - started
            outcomes["ok" if outcome == "200" else outcome] += 1
            if outcome == "200":
                latencies.append(elapsed)
            time.sleep(max(0.0, HEALTH_EVERY_S - elapsed))
    return latencies, dict(outcomes)


# --- the run ---------------------------------------------------------------------------------
def warm_up(url: str, urls: list[str]) -> None:
    """What Label Studio does first: /setup (prompts encoded), then a first /predict."""
    body = {"project": PROJECT, "schema": CONFIG}
    httpx.post(url + "/setup", json=body, timeout=60).raise_for_status()
    tasks = [{"id": -i, "data": {"image": u}} for i, u in enumerate(urls[:8], 1)]
    body = {"tasks": tasks, "label_config": CONFIG, "project": PROJECT}
    httpx.post(url + "/predict", json=body, timeout=300).raise_for_status()


async def sample_rss(backend: Any, report: Report, deadline: float) -> None:
    while time.monotonic() < deadline:
        report.rss_mib.append(rss_mib(backend.pid))
        await asyncio.sleep(1.0)


async def load(backend: Any, urls: list[str], report: Report,
               prober: ProcessPoolExecutor) -> None:
    args, tallies = report.args, report.tallies
    clients = args.clients + args.webhook_clients
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=backend.url, limits=limits) as client:
        health = asyncio.get_running_loop().run_in_executor(
            prober, probe_health, backend.url, args.seconds)
        deadline = time.monotonic() + args.seconds
        started = time.perf_counter()
        tasks, events = itertools.count(1), itertools.count(1)
        await asyncio.gather(
            sample_rss(backend, report, deadline),
            *(predict_client(client, tallies["/predict"], urls, tasks, deadline, seed)
              for seed in range(args.clients)),
            *(webhook_client(client, tallies["/webhook"], urls, events, deadline, -seed)
              for seed in range(1, args.webhook_clients + 1)))
        report.seconds = time.perf_counter() - started
        latencies, outcomes = await health
    tallies["/health"].latencies, tallies["/health"].outcomes = latencies, Counter(outcomes)


COUNTERS = {"fetched": ("backend_images_fetched_total", {}),
            "encoded": ("backend_images_encoded_total", {}),
            "cache hits": ("backend_embedding_cache_lookups_total", {"result": "hit"}),
            "corrections": ("backend_corrections_logged_total", {})}


def read_counters(backend: Any) -> dict[str, float]:
    return {name: backend.counter(metric, **labels) for name, (metric, labels) in COUNTERS.items()}


def run(args: argparse.Namespace, tmp: Path) -> Report:
    report = Report(args)
    log_path = args.log or tmp / "backend.log"
    spawn = get_context("spawn")
    with LoopbackServer() as images, ProcessPoolExecutor(1, mp_context=spawn) as prober, \
            start_backend(backend_env(args, tmp), log_path) as backend:
        prober.submit(int).result()  # the prober's process is up before the clock starts
        urls = serve_pool(images, distinct=not args.repeat_images)
        warm_up(backend.url, urls)
        before = read_counters(backend)
        report.rss_mib.append(rss_mib(backend.pid))
        start = cpu_clock(backend.pid)
        asyncio.run(load(backend, urls, report, prober))
        report.cpu_cores = cores_used(start, cpu_clock(backend.pid))
        report.rss_mib.append(rss_mib(backend.pid))
        report.counters = {k: v - before[k] for k, v in read_counters(backend).items()}
    report.log = summarise_log(log_path.read_text(errors="replace"))
    return report


# --- the report ------------------------------------------------------------------------------
SEVERE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
NUMBER = re.compile(r"(?<![\w-])\d+(?![\w-])")
"""A number on its own (ids, counts), not part of a name such as ViT-B-32."""


def summarise_log(text: str) -> str:
    """Server log lines at WARNING and above: counts, and the most frequent messages."""
    found = [(m.group(1), line) for line in text.splitlines() if (m := SEVERE.search(line))]
    if not found:
        return "server log: no warnings or errors"
    shapes = Counter(NUMBER.sub("N", line.split(": ", 1)[-1])[:160] for _, line in found)
    levels = Counter(level for level, _ in found)
    top = "".join(f"\n  {n:>6} x {shape}" for shape, n in shapes.most_common(5))
    return f"server log: {dict(levels)}; most frequent:{top}"


def route_line(route: str, tally: Tally, report: Report) -> str:
    errors = sum(tally.errors(report.args.overload).values())
    rate = (tally.units if route != "/health" else sum(tally.outcomes.values())) / report.seconds
    unit = {"/predict": "img/s", "/webhook": "ev/s", "/health": "req/s"}[route]
    p50, p95, p99, most = tally.percentiles_ms()
    return (f"{route:<9} {sum(tally.outcomes.values()):>8} {errors:>7} {tally.outcomes['503']:>6} "
            f"{p50:>9.1f} {p95:>9.1f} {p99:>9.1f} {most:>9.1f} {rate:>9.1f} {unit}")


def print_report(report: Report) -> None:
    args, rss = report.args, report.rss_mib
    print(f"load: {args.clients} /predict clients (1-8 tasks) + {args.webhook_clients} webhook "
          f"clients + /health every {HEALTH_EVERY_S * 1000:g} ms for {report.seconds:.1f} s; "
          f"model {args.model or 'tiny-test-clip'} (random weights); {os.cpu_count()} CPUs")
    print(f"{'route':<9} {'requests':>8} {'errors':>7} {'503':>6} {'p50 ms':>9} {'p95 ms':>9} "
          f"{'p99 ms':>9} {'max ms':>9} {'rate':>9}")
    for route, tally in report.tallies.items():
        print(route_line(route, tally, report))
    c = report.counters
    quarters = " -> ".join(f"{rss[len(rss) * i // 4]:.0f}" for i in range(4))
    print(f"server RSS MiB each quarter: {quarters} -> {rss[-1]:.0f} at the end "
          f"({rss[-1] - rss[0]:+.0f}, peak {max(rss):.0f}); CPU cores used: server "
          "{:.2f}, this process {:.2f}, other processes {:.2f}".format(*report.cpu_cores))
    print(f"images fetched {c['fetched']:.0f}, encoded {c['encoded']:.0f}, embedding-cache hits "
          f"{c['cache hits']:.0f}, corrections logged {c['corrections']:.0f}")
    errors = report.errors()
    print("errors: " + (", ".join(f"{k} x{n}" for k, n in errors.most_common()) or "none"))
    for route, tally in report.tallies.items():
        for outcome in tally.errors(args.overload):
            print(f"  first {route} {outcome}: {tally.details.get(outcome) or '-'}")
    print(report.log)
    failures = report.failures()
    print("FAIL: " + "; ".join(failures) if failures else
          f"PASS: 0 errors, /health p99 {report.health_p99_ms():.1f} ms < {HEALTH_P99_MS:g} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip architecture, random weights (e.g. "
                        "ViT-B-32); default: a tiny test architecture")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50, help="concurrent /predict clients")
    parser.add_argument("--webhook-clients", type=int, default=4)
    parser.add_argument("--overload", action="store_true",
                        help="503 (load shed) is not an error; it is reported either way")
    parser.add_argument("--repeat-images", action="store_true",
                        help="serve identical bytes on every download (embedding-cache hits)")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as name:
        report = run(args, Path(name))
    print_report(report)
    sys.exit(1 if report.failures() else 0)


if __name__ == "__main__":
    main()
