"""Webhook ingestion: events/s and latency through the real /webhook, per store, in one run.

    python bench/webhook_ingest.py [--events 2000] [--threads 8]

For each store — Redis with `appendfsync always`, Redis with `appendfsync everysec` (a
redis-server this script starts) and the embedded SQLite store — it measures:
  store.apply      the store alone, entries applied in a loop (records.apply): the storage cost;
  model.fit        what /webhook runs, called directly (on the server's event loop):
                   webhook → entries → journal → store;
  HTTP sequential  ANNOTATION_CREATED webhooks POSTed one at a time on one keep-alive
                   httpx.Client to the app served by uvicorn, as Label Studio sends them;
  HTTP N threads   the same from N client threads at once (several Label Studio workers).
And once, the spool that takes writes while the store is down (append + fsync per write).
Every event is distinct (none is deduplicated). The model is a tiny random one: /webhook never
runs it. Every annotated image counts as already embedded (the task was pre-labeled), so no
background embedding runs; each webhook still looks that up in the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import Settings, load_settings  # noqa: E402
from backend.corrections.entries import entries_from_webhook  # noqa: E402
from backend.corrections.journal import Journal  # noqa: E402
from backend.corrections.records import apply  # noqa: E402
from backend.runtime import Backend  # noqa: E402
from backend.store import Store  # noqa: E402
from backend.store.entry import Entry  # noqa: E402
from backend.store.redis import RedisStore  # noqa: E402
from backend.web.app import create_app  # noqa: E402
from tests.support.backend_server import BackendThread  # noqa: E402
from tests.support.redis_server import RedisServer, free_port  # noqa: E402
from tests.support.tiny_models import write_config  # noqa: E402
from tests.support.webhooks import annotation_event, choice_result  # noqa: E402

IMAGE = "/data/upload/4/pre-labeled.png"
WARM_UP = 50
Event = dict[str, Any]


@dataclass
class Row:
    store: str
    path: str
    seconds: float
    latencies: list[float]

    def line(self) -> str:
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000
        rate = len(self.latencies) / self.seconds
        return f"{self.store:<30} {self.path:<17} {rate:>9,.0f} {p50:>8.2f} {p99:>8.2f}"


HEADER = f"{'store':<30} {'path':<17} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8}"


def webhooks(ids: Iterator[int], n: int) -> list[Event]:
    """n distinct ANNOTATION_CREATED payloads (annotation k on task 10_000 + k)."""
    numbers = [next(ids) for _ in range(n)]
    return [annotation_event(k, 10_000 + k, choice_result(("Cat", "Dog")[k % 2]), image=IMAGE)
            for k in numbers]


def entries(ids: Iterator[int], n: int) -> list[Entry]:
    return [entry for event in webhooks(ids, n) for entry in entries_from_webhook(event)]


def run_timed(calls: Sequence[Callable[[], object]]) -> list[float]:
    """Run the calls one after another; the latency of each."""
    latencies = []
    for call in calls:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


def timed(run: Callable[[], list[float]]) -> tuple[float, list[float]]:
    """Wall-clock seconds of `run`, and the latencies it returns."""
    started = time.perf_counter()
    latencies = run()
    return time.perf_counter() - started, latencies


def post_all(url: str, events: Sequence[Event]) -> list[float]:
    """POST the events one at a time on one keep-alive client."""
    with httpx.Client(base_url=url, timeout=30) as client:
        def post(event: Event) -> None:
            client.post("/webhook", json=event).raise_for_status()
        return run_timed([partial(post, event) for event in events])


def post_concurrently(url: str, events: Sequence[Event], threads: int) -> list[float]:
    """`threads` clients, each posting its share of the events one at a time."""
    shares = [events[i::threads] for i in range(threads)]
    results: list[list[float]] = [[] for _ in shares]

    def client(i: int) -> None:
        results[i] = post_all(url, shares[i])

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [latency for share in results for latency in share]


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[BackendThread, Backend]]:
    backend = BackendThread(create_app(settings))
    with backend:
        backend.wait_model()
        model: Backend = backend.app.state.backend
        model.store.put_embedding(f"{model.embedding_model}|bench", np.zeros(32, np.float32), IMAGE)
        yield backend, model


def measure(label: str, settings: Settings, args: argparse.Namespace) -> list[Row]:
    ids = count(1)
    with serving(settings) as (backend, model):
        post_all(backend.url, webhooks(ids, WARM_UP))
        applies = [partial(apply, model.store, e) for e in entries(ids, args.events)]

        def fit(event: dict[str, Any]) -> object:
            return backend.call(model.fit(event["action"], event))

        fits = [partial(fit, e) for e in webhooks(ids, args.events)]
        sequential, parallel = webhooks(ids, args.events), webhooks(ids, args.events)
        return [
            Row(label, "store.apply", *timed(lambda: run_timed(applies))),
            Row(label, "model.fit", *timed(lambda: run_timed(fits))),
            Row(label, "HTTP sequential", *timed(lambda: post_all(backend.url, sequential))),
            Row(label, f"HTTP {args.threads} threads",
                *timed(lambda: post_concurrently(backend.url, parallel, args.threads))),
        ]


def spool_row(store: Store, directory: Path, n: int) -> Row:
    """Writes while the store is down: after the first fails over, each is an fsynced append."""
    journal = Journal(store, directory)  # not started: nothing replays
    batches = [[entry] for entry in entries(count(1), n + 1)]
    journal.write(batches[0])
    writes = [partial(journal.write, batch) for batch in batches[1:]]
    return Row("(store down)", "journal spool", *timed(lambda: run_timed(writes)))


def redis_rows(base: dict[str, Any], tmp: Path, args: argparse.Namespace) -> list[Row]:
    rows = []
    with RedisServer(tmp / "redis") as server:
        control = redis.Redis.from_url(server.url)
        for fsync in ("always", "everysec"):
            control.flushall()
            control.config_set("appendfsync", fsync)
            settings = load_settings(**base, REDIS_URL=server.url, MODEL_DIR=tmp / f"dir-{fsync}")
            rows += measure(f"redis appendfsync={fsync}", settings, args)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="events per row")
    parser.add_argument("--threads", type=int, default=8, help="client threads, concurrent rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhook-ingest-") as name:
        tmp = Path(name)
        base = dict(MODEL_CONFIG=write_config(tmp), MODEL_PRETRAINED="none", LOG_LEVEL="WARNING")
        rows = redis_rows(base, tmp, args)
        rows += measure("sqlite (WAL, synchronous=FULL)",
                        load_settings(**base, MODEL_DIR=tmp / "dir"), args)
        down = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
        rows.append(spool_row(down, tmp / "spool", args.events))
    print(f"webhook ingestion: {args.events} distinct events per row; {os.cpu_count()} CPUs; "
          f"p50/p99 per event (per request for HTTP)")
    print(HEADER)
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
