"""Soak: minutes of mixed traffic through outages, then nothing lost and nothing leaked.

    python bench/soak.py [--minutes 10] [--tasks 60] [--keep DIR]

Run by hand (it is not part of the test suite). Everything runs on 127.0.0.1: a redis-server
this script starts (AOF, fsync always), a real Label Studio (from LABEL_STUDIO_VENV, as the
end-to-end tests), a loopback server for the images, and `python -m backend serve` with the
tiny random-weight test model and REDIS_URL pointing at that Redis. For --minutes, at once:
  /predict         two clients, batches of 1-4 tasks;
  /webhook         ANNOTATION_CREATED for new annotations and ANNOTATION_UPDATED corrections
                   (another label, a later updated_at) of annotations already acknowledged;
  /export          GET /export/corrections (JSONL) every 2 s;
  /prelabel        pre-label jobs on a Label Studio project of --tasks tasks: each finished
                   job is followed by a label change (a new model_version) and a new job; a
                   job the outages interrupted is started again (it resumes);
and, on a schedule: Redis SIGKILLed at 10 % and restarted at 20 %, the backend SIGKILLed at
30 % and restarted at once, Redis SIGKILLed again at 55 % and restarted at 65 % (a slow
restart delays what follows; the load goes on for at least a fifth of the run after the last).
Then the load stops and the run checks:
  - every webhook the backend acknowledged (200) is in the corrections log exactly once (the
    store's event log), and its annotation in the HTTP JSONL export exactly once, with the
    label of its last acknowledged event; events answered with an error are absent, events
    whose answer never came (the backend was killed) are there at most once;
  - the backend's RSS (/proc/PID/status VmRSS) at the end is within 10 % of its value after the
    restarted process's warm-up;
  - a last pre-label job finishes, and every task holds exactly one prediction of its version.
Prints a summary JSON; exit status 0 when every check passes, 1 otherwise (the reasons in
"failures"). Export lines without an annotation id (e.g. a trailer) are skipped.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.label_studio import LabelStudioClient, LabelStudioServer  # noqa: E402
from tests.support.backend_process import BackendProcess  # noqa: E402
from tests.support.http_server import LoopbackServer, Route  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.tiny_models import write_config  # noqa: E402
from tests.support.webhooks import annotation_event, choice_result  # noqa: E402

LABELS = ["cat", "dog", "bird", "car", "tree", "boat"]
CONTROL = "choice"
WEBHOOK_PROJECT = 9000
"""Corrections go to a project of their own, apart from the pre-label project."""
IMAGES = 24
RSS_TOLERANCE = 0.10
AFTER_OUTAGES = 0.2
"""At least this fraction of the run goes on after the last outage."""
SCHEDULE = ((0.10, "kill redis"), (0.20, "start redis"), (0.30, "kill backend"),
            (0.55, "kill redis"), (0.65, "start redis"))
"""(fraction of the run, what happens then)."""
TIMEOUT_S = {"predict": 100.0, "webhook": 10.0, "export": 60.0, "job": 30.0}
DRAIN_TIMEOUT_S = 120.0
FINAL_JOB_TIMEOUT_S = 300.0
LS_STARTUP_TIMEOUT_S = 900.0
"""Label Studio's first start (migrations) takes minutes on a busy machine."""


def config(labels: list[str]) -> str:
    choices = "".join(f'<Choice value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/>'
            f'<Choices name="{CONTROL}" toName="image">{choices}</Choices></View>')


# --- shared state ----------------------------------------------------------------------------
class Target:
    """The backend process now serving (it changes when the backend is restarted)."""

    def __init__(self, backend: BackendProcess) -> None:
        self._lock = threading.Lock()
        self.backend = backend

    def swap(self, backend: BackendProcess) -> None:
        with self._lock:
            self.backend = backend

    @property
    def url(self) -> str:
        with self._lock:
            return self.backend.url


@dataclass
class Sent:
    annotation: int
    label: str
    updated_at: str
    outcome: str
    """acked (200), refused (an error answer: must not be recorded), unknown (no answer)."""


@dataclass
class Tallies:
    lock: threading.Lock = field(default_factory=threading.Lock)
    routes: dict[str, Counter[str]] = field(default_factory=dict)
    webhooks: list[Sent] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds since start, pid, MiB)."""
    timeline: list[tuple[float, str]] = field(default_factory=list)

    def count(self, route: str, outcome: str) -> None:
        with self.lock:
            self.routes.setdefault(route, Counter())[outcome] += 1


def outcome_of(client: httpx.Client, method: str, url: str,
               **kwargs: Any) -> tuple[str, httpx.Response | None]:
    """The answer's status code (or the transport error's name), and the answer."""
    try:
        response = client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        return type(exc).__name__, None
    return str(response.status_code), response


def backoff(stop: threading.Event, outcome: str) -> None:
    """Clients pause after a failure, so an outage is not a busy loop."""
    if outcome != "200":
        stop.wait(0.25)


# --- the clients -----------------------------------------------------------------------------
def predict_loop(target: Target, stop: threading.Event, tallies: Tallies, urls: list[str],
                 seed: int) -> None:
    rng, ids = random.Random(seed), itertools.count(seed * 1_000_000)
    with httpx.Client(timeout=TIMEOUT_S["predict"]) as client:
        while not stop.is_set():
            tasks = [{"id": next(ids), "data": {"image": rng.choice(urls)}}
                     for _ in range(rng.randint(1, 4))]
            body = {"tasks": tasks, "label_config": config(LABELS), "project": "1.1"}
            outcome, _ = outcome_of(client, "POST", target.url + "/predict", json=body)
            tallies.count("/predict", outcome)
            backoff(stop, outcome)


def webhook_body(sent: Sent, action: str, image: str) -> dict[str, Any]:
    return annotation_event(sent.annotation, 100_000 + sent.annotation,
                            choice_result(sent.label, control=CONTROL), action=action,
                            project_id=WEBHOOK_PROJECT, updated_at=sent.updated_at,
                            image=image, label_config=config(LABELS))


def classify(outcome: str) -> str:
    """acked; refused: an error answer, or no connection (never sent); unknown: sent, but the
    answer never came (the backend was killed meanwhile)."""
    if outcome == "200":
        return "acked"
    if outcome in ("ConnectError", "ConnectTimeout") or (
            outcome.isdigit() and (outcome.startswith("4") or outcome == "503")):
        return "refused"
    return "unknown"


def webhook_loop(target: Target, stop: threading.Event, tallies: Tallies,
                 urls: list[str]) -> None:
    rng, clock, annotations = random.Random(7), itertools.count(1), itertools.count(1)
    acked: list[int] = []
    with httpx.Client(timeout=TIMEOUT_S["webhook"]) as client:
        while not stop.is_set():
            update = bool(acked) and rng.random() < 0.3
            annotation = rng.choice(acked) if update else next(annotations)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_790_000_000 + next(clock)))
            sent = Sent(annotation, rng.choice(LABELS), f"{stamp}.000000Z", "")
            body = webhook_body(sent, "ANNOTATION_UPDATED" if update else "ANNOTATION_CREATED",
                                rng.choice(urls))
            outcome, _ = outcome_of(client, "POST", target.url + "/webhook", json=body)
            tallies.count("/webhook", outcome)
            sent.outcome = classify(outcome)
            with tallies.lock:
                tallies.webhooks.append(sent)
            if sent.outcome == "acked" and not update:
                acked.append(annotation)
            backoff(stop, outcome)


def export_loop(target: Target, stop: threading.Event, tallies: Tallies) -> None:
    with httpx.Client(timeout=TIMEOUT_S["export"]) as client:
        while not stop.is_set():
            outcome, _ = outcome_of(client, "GET", target.url + "/export/corrections")
            tallies.count("/export/corrections", outcome)
            stop.wait(2.0)


def run_job(client: httpx.Client, target: Target, project: int,
            stop: threading.Event) -> tuple[str, dict[str, Any] | None]:
    """Start (or resume) the project's job and poll it until it ends: (its status, its
    state), or (what went wrong, None): the start or a poll failed, or `stop` was set."""
    outcome, response = outcome_of(client, "POST", target.url + "/prelabel",
                                   json={"project": project})
    if response is None or not response.is_success:
        return f"start: {outcome}", None
    job = response.json()["id"]
    while not stop.wait(1.0):
        outcome, response = outcome_of(client, "GET", f"{target.url}/prelabel/{job}")
        if response is None or not response.is_success:
            return f"poll: {outcome}", None
        state: dict[str, Any] = response.json()
        if state.get("status") != "running":
            return str(state.get("status")), state
    return "stopped", None


def prelabel_loop(target: Target, stop: threading.Event, tallies: Tallies,
                  ls: LabelStudioClient, project: int) -> None:
    labels = list(LABELS)
    with httpx.Client(timeout=TIMEOUT_S["job"]) as client:
        while not stop.is_set():
            status, state = run_job(client, target, project, stop)
            tallies.count("/prelabel", status)
            if state:
                with tallies.lock:
                    tallies.jobs.append(state)
            if status == "done":  # a label change: the next job re-scores every task
                labels.append(f"extra {len(labels)}")
                ls.patch_project(project, label_config=config(labels))
            else:
                stop.wait(1.0)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(kib.group(1)) / 1024 if kib else float("nan")


def rss_loop(target: Target, stop: threading.Event, tallies: Tallies, started: float) -> None:
    while not stop.wait(2.0):
        pid = target.backend.pid
        try:
            sample = (round(time.monotonic() - started, 1), pid, round(rss_mib(pid), 1))
        except OSError:  # the process is gone (killed): nothing to sample
            continue
        with tallies.lock:
            tallies.rss.append(sample)


# --- the run ---------------------------------------------------------------------------------
@dataclass
class World:
    """Everything the soak started, and where."""

    work: Path
    redis: RedisServer
    ls: LabelStudioServer
    ls_client: LabelStudioClient
    images: LoopbackServer
    urls: list[str]
    project: int
    task_ids: list[int]
    env: dict[str, str]
    restarts: itertools.count = field(default_factory=lambda: itertools.count(1))

    def start_backend(self) -> BackendProcess:
        log = self.work / f"backend-{next(self.restarts)}.log"
        return BackendProcess(self.env, log).__enter__()


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    pixels[12:36, 12:36] = rng.integers(0, 256, size=3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def backend_env(work: Path, redis: RedisServer, ls: LabelStudioServer) -> dict[str, str]:
    return {"MODEL_CONFIG": str(write_config(work / "model", "clip")), "MODEL_PRETRAINED": "none",
            "MODEL_DIR": str(work / "model-dir"), "REDIS_URL": redis.url,
            "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
            "IMAGE_URL_ALLOWLIST": "127.0.0.1", "LOG_LEVEL": "WARNING"}


def warm_up(url: str, urls: list[str]) -> None:
    """What a fresh process sees first: /setup, then every image once, then an export."""
    httpx.post(url + "/setup", json={"project": "1.1", "schema": config(LABELS)},
               timeout=60).raise_for_status()
    tasks = [{"id": -i, "data": {"image": u}} for i, u in enumerate(urls, 1)]
    httpx.post(url + "/predict", json={"tasks": tasks, "label_config": config(LABELS),
                                       "project": "1.1"}, timeout=300).raise_for_status()
    httpx.get(url + "/export/corrections", timeout=60).raise_for_status()


def restart_backend(world: World, target: Target, tallies: Tallies,
                    started: float) -> float:
    """SIGKILL the backend, start a new one, warm it up; its RSS after the warm-up (MiB)."""
    old = target.backend
    old.kill()
    old.__exit__(None, None, None)
    fresh = world.start_backend()
    target.swap(fresh)
    mark(tallies, started, f"backend ready again (pid {fresh.pid})")
    warm_up(fresh.url, world.urls)
    baseline = rss_mib(fresh.pid)
    mark(tallies, started, f"backend warmed up: RSS {baseline:.1f} MiB")
    return baseline


def mark(tallies: Tallies, started: float, what: str) -> None:
    with tallies.lock:
        tallies.timeline.append((round(time.monotonic() - started, 1), what))
    print(f"[{time.monotonic() - started:7.1f} s] {what}", file=sys.stderr, flush=True)


def chaos(world: World, target: Target, tallies: Tallies, started: float,
          seconds: float) -> float:
    """Run SCHEDULE; the restarted backend's RSS after its warm-up."""
    baseline = float("nan")
    for fraction, action in SCHEDULE:
        wait = started + fraction * seconds - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        mark(tallies, started, action)
        if action == "kill redis":
            world.redis.kill()
        elif action == "start redis":
            world.redis.start()
        else:
            baseline = restart_backend(world, target, tallies, started)
    return baseline


def load(world: World, target: Target, tallies: Tallies, seconds: float) -> float:
    """The traffic and the outages for `seconds`; the RSS baseline (see chaos)."""
    stop, started = threading.Event(), time.monotonic()
    clients = [
        *(threading.Thread(target=predict_loop, args=(target, stop, tallies, world.urls, seed))
          for seed in (1, 2)),
        threading.Thread(target=webhook_loop, args=(target, stop, tallies, world.urls)),
        threading.Thread(target=export_loop, args=(target, stop, tallies)),
        threading.Thread(target=prelabel_loop,
                         args=(target, stop, tallies, world.ls_client, world.project)),
        threading.Thread(target=rss_loop, args=(target, stop, tallies, started)),
    ]
    for client in clients:
        client.start()
    try:
        baseline = chaos(world, target, tallies, started, seconds)
        # a slow restart delays the schedule: still some load after the last outage
        time.sleep(max(started + seconds - time.monotonic(), AFTER_OUTAGES * seconds))
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=max(TIMEOUT_S.values()) + 30)
    mark(tallies, started, "load stopped")
    return baseline


# --- the checks ------------------------------------------------------------------------------
def spooled(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(r"^backend_spooled_entries\s+(\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_drained(url: str) -> bool:
    """The spool written during the outages has reached Redis."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if spooled(url) == 0:
            return True
        time.sleep(0.5)
    return False


def exported(url: str) -> list[dict[str, Any]]:
    """Rows of the JSONL export of the webhook project; lines without an annotation skipped."""
    response = httpx.get(url + "/export/corrections", timeout=120,
                         params={"project": str(WEBHOOK_PROJECT)})
    response.raise_for_status()
    rows = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    return [row for row in rows if isinstance(row, dict) and row.get("annotation") is not None]


def logged_events(redis_url: str) -> list[dict[str, Any]]:
    """The store's event log (the corrections log), oldest first."""
    from backend.store.redis import RedisStore

    store = RedisStore(redis_url, timeout_s=30)
    try:
        return list(store.events())
    finally:
        store.close()


def event_key(annotation: Any, updated_at: Any) -> tuple[str, str]:
    return str(annotation), str(updated_at)


def check_events(sent: list[Sent], events: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(event_key(e.get("annotation"), e.get("updated_at")) for e in events
                     if int(str(e.get("project") or 0).split(".")[0] or 0) == WEBHOOK_PROJECT)
    found = {kind: Counter(counts[event_key(s.annotation, s.updated_at)] for s in sent
                           if s.outcome == kind) for kind in ("acked", "refused", "unknown")}
    return {"acked": sum(found["acked"].values()),
            "acked_missing": found["acked"][0],
            "acked_more_than_once": sum(n for c, n in found["acked"].items() if c > 1),
            "refused_but_logged": sum(n for c, n in found["refused"].items() if c > 0),
            "unknown_logged": sum(n for c, n in found["unknown"].items() if c == 1),
            "unknown_more_than_once": sum(n for c, n in found["unknown"].items() if c > 1)}


def labels_of(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def check_export(sent: list[Sent], rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows_by_annotation = Counter(str(row["annotation"]) for row in rows)
    final = {str(row["annotation"]): labels_of(row.get("final")) for row in rows}
    history: dict[str, list[Sent]] = {}
    for s in sent:
        history.setdefault(str(s.annotation), []).append(s)
    acked = {a for a, h in history.items() if any(s.outcome == "acked" for s in h)}
    possible = {a for a, h in history.items() if any(s.outcome != "refused" for s in h)}
    wrong = [a for a in sorted(acked)
             if a in final and final[a] not in acceptable_labels(history[a])]
    return {"annotations_acked": len(acked), "rows": len(rows),
            "missing": sorted(acked - set(rows_by_annotation))[:20],
            "more_than_once": sorted(a for a, n in rows_by_annotation.items() if n > 1)[:20],
            "unexpected": sorted(set(rows_by_annotation) - possible)[:20],
            "wrong_final_label": wrong[:20]}


def acceptable_labels(history: list[Sent]) -> list[list[str]]:
    """The last acknowledged label, or that of any later event whose answer never came."""
    last = max(i for i, s in enumerate(history) if s.outcome == "acked")
    return [[s.label] for s in history[last:] if s.outcome in ("acked", "unknown")]


def predictions_by_task(client: LabelStudioClient, project: int) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for page in itertools.count(1):
        body = client.request("GET", "/api/tasks/", params={
            "project": project, "page": page, "page_size": 100, "fields": "all"})
        if not body.get("tasks"):
            return found
        found.update({t["id"]: [p["model_version"] for p in t["predictions"]]
                      for t in body["tasks"]})
        if len(found) >= body.get("total", len(found)):
            return found
    return found


def final_job(world: World, target: Target) -> dict[str, Any]:
    """One more job after the outages: it must finish, one prediction per task."""
    stop = threading.Event()
    timer = threading.Timer(FINAL_JOB_TIMEOUT_S, stop.set)
    timer.start()
    try:
        with httpx.Client(timeout=TIMEOUT_S["job"]) as client:
            state = None
            while state is None and not stop.is_set():
                _, state = run_job(client, target, world.project, stop)
                stop.wait(0 if state else 1.0)
    finally:
        timer.cancel()
    if state is None:
        return {"status": "did not finish", "problems": ["the last pre-label job did not finish"]}
    version = state.get("model_version")
    stored = predictions_by_task(world.ls_client, world.project)
    problems = [f"job {state.get('status')}: {state.get('failed')} failed"] \
        if state.get("status") != "done" or state.get("failed") else []
    without = [t for t in world.task_ids if stored.get(t, []).count(version) != 1]
    if without:
        problems.append(f"{len(without)} tasks without exactly one prediction of {version}")
    return {"status": state.get("status"), "model_version": version, "total": state.get("total"),
            "done": state.get("done"), "failed": state.get("failed"), "problems": problems}


def rss_summary(tallies: Tallies, pid: int, baseline: float) -> dict[str, Any]:
    end = rss_mib(pid)
    samples = [mib for _, p, mib in tallies.rss if p == pid]
    change = (end - baseline) / baseline if baseline == baseline and baseline else float("nan")
    return {"pid": pid, "after_warm_up_mib": round(baseline, 1), "end_mib": round(end, 1),
            "change_pct": round(100 * change, 1),
            "peak_mib": round(max(samples, default=end), 1), "samples": len(samples)}


def failures(summary: dict[str, Any]) -> list[str]:
    why = []
    events, export, rss = summary["events_log"], summary["export"], summary["rss"]
    if not summary["drained"]:
        why.append(f"the spool did not drain within {DRAIN_TIMEOUT_S:g} s")
    for key in ("acked_missing", "acked_more_than_once", "refused_but_logged",
                "unknown_more_than_once"):
        if events[key]:
            why.append(f"events log: {events[key]} {key.replace('_', ' ')}")
    for key in ("missing", "more_than_once", "unexpected", "wrong_final_label"):
        if export[key]:
            why.append(f"export: annotations {key.replace('_', ' ')}: {export[key]}")
    if not events["acked"]:
        why.append("no webhook was acknowledged: nothing was checked")
    if not abs(rss["change_pct"]) <= 100 * RSS_TOLERANCE:
        why.append(f"RSS {rss['after_warm_up_mib']} -> {rss['end_mib']} MiB "
                   f"({rss['change_pct']:+} %, limit ±{100 * RSS_TOLERANCE:g} %)")
    why += summary["prelabel"]["final"]["problems"]
    return why


# --- main ------------------------------------------------------------------------------------
def serve_images(images: LoopbackServer) -> list[str]:
    return [images.add(f"/soak/{i}.png", Route(png(i), content_type="image/png"))
            for i in range(IMAGES)]


def make_project(client: LabelStudioClient, urls: list[str], count: int) -> tuple[int, list[int]]:
    project = client.create_project("soak", config(LABELS))
    tasks = [{"data": {"image": urls[i % len(urls)]}} for i in range(count)]
    return project, client.import_tasks(project, tasks)


def summarise(world: World, target: Target, tallies: Tallies, args: argparse.Namespace,
              baseline: float) -> dict[str, Any]:
    url = target.url
    drained = wait_drained(url)
    summary: dict[str, Any] = {
        "minutes": args.minutes, "drained": drained,
        "requests": {route: dict(c) for route, c in sorted(tallies.routes.items())},
        "webhooks": dict(Counter(s.outcome for s in tallies.webhooks)),
        "events_log": check_events(tallies.webhooks, logged_events(world.redis.url)),
        "export": check_export(tallies.webhooks, exported(url)),
        "rss": rss_summary(tallies, target.backend.pid, baseline),
        "prelabel": {"jobs": Counter(j.get("status") for j in tallies.jobs),
                     "final": final_job(world, target)},
        "timeline": tallies.timeline, "work_dir": str(world.work)}
    summary["failures"] = failures(summary)
    summary["ok"] = not summary["failures"]
    return summary


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with RedisServer(work / "redis") as redis_server, \
            LabelStudioServer(startup_timeout=LS_STARTUP_TIMEOUT_S) as ls, \
            LabelStudioClient.for_server(ls) as ls_client, LoopbackServer() as images:
        urls = serve_images(images)
        project, task_ids = make_project(ls_client, urls, args.tasks)
        world = World(work, redis_server, ls, ls_client, images, urls, project, task_ids,
                      backend_env(work, redis_server, ls))
        target = Target(world.start_backend())
        try:
            warm_up(target.url, urls)
            tallies = Tallies()
            baseline = load(world, target, tallies, args.minutes * 60)
            return summarise(world, target, tallies, args, baseline)
        finally:
            target.backend.__exit__(None, None, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tasks", type=int, default=60, help="tasks in the pre-label project")
    parser.add_argument("--keep", type=Path, help="work here and keep the logs (default: a "
                        "temporary directory, removed)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        summary = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as name:
            summary = soak(args, Path(name))
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
