"""RQ workers and the data plane: a pre-label job's tasks/s and CPU per task, for a grid of
worker processes (W) x decode processes per worker (D).

    python bench/rq_workers.py [--tasks 600] [--workers 1 2] [--decode 0 1 2] [--item-tasks N]
                               [--rounds 1]

Starts one Label Studio (its own virtualenv: LABEL_STUDIO_VENV, as the e2e tests), one
redis-server (tests/support/redis_server.py: AOF, fsync always), nginx serving 640x480 JPEGs
(bench/data_plane.py's pictures and image server), and one `python -m backend serve` that plans
the jobs (POST /prelabel, executor rq; it decodes nothing). The model is a tiny open_clip with a
224 px input and random weights, on CPU, so what is measured is the data plane and the job's own
work: download, hash, decode, resize, scheduling, Redis, Label Studio's pages and imports.
For each W x D it starts W `python -m backend worker` processes with DECODE_PROCESSES=D, then:
  warm-up  a small job, repeated (3 times at most) until every worker has started its D decode
           processes: long-running workers are measured, not their start;
  job      a new project of --tasks tasks, distinct image bytes (nothing cached): tasks/s from
           POST /prelabel until GET /prelabel/{id} (polled every 0.05 s) says done;
  CPU ms   per task, from /proc: the workers' main processes, their child processes (the decode
           processes, and multiprocessing's resource tracker), the planning server (and its
           children), Redis, nginx, Label Studio (its process tree), and this process;
  checks   each worker's decode processes (children running multiprocessing.spawn; D expected)
           and their CPU during the job (> 0: the items went through them); after SIGTERM, the
           time the workers took to exit (killed past 30 s) and their exit statuses, their decode
           processes gone, and the shared-memory segments they had mapped (/dev/shm/psm_*)
           unlinked.
With --rounds N the whole grid runs N times over (fresh workers each time) and each W x D
reports its fastest round (other load only ever slows a round down), and every round's rate.
Then a table and a recommendation: the fastest W x D, and among those within 10% of it (as fast,
within a shared machine's noise) the one with the fewest worker processes (each holds a copy of
the model), then the fewest processes, then the least CPU per task. The machine may be shared:
the load average is printed before, during and after; compare figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.config import load_settings  # noqa: E402
from backend.jobs.executors import rq_queue  # noqa: E402
from bench import data_plane as dp  # noqa: E402
from tests.e2e.label_studio import LabelStudioClient, LabelStudioServer  # noqa: E402
from tests.support.backend_process import BackendProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

POLL_S = 0.05
READY_WAIT_S = 600.0
JOB_WAIT_S = 1800.0
STOP_WAIT_S = 30.0
SETTLE_S = 10.0
WARM_UPS = 3
NEAR_BEST = 0.9
"""Configurations within 10% of the fastest count as equally fast; the leanest of them wins."""
GROUPS = ("workers", "decode", "server", "redis", "nginx", "ls", "bench")


# --- processes -----------------------------------------------------------------------------------

def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(dp.children(current))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def decode_children(pid: int) -> list[int]:
    """A worker's decode processes: its children started by multiprocessing's spawn."""
    return [child for child in dp.children(pid) if "multiprocessing.spawn" in cmdline(child)]


def shared_memory(pid: int) -> set[str]:
    """The multiprocessing shared-memory segments a process has mapped."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return set()
    return {line.split()[-1] for line in lines if "/dev/shm/psm_" in line}


class Workers:
    """W `python -m backend worker` processes, as one would run them on a machine."""

    def __init__(self, count: int, env: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self.processes = [subprocess.Popen([sys.executable, "-m", "backend", "worker"],
                                           cwd=REPO, env=env, stdout=self._log,
                                           stderr=subprocess.STDOUT) for _ in range(count)]
        self.log = log
        self.stop_s = 0.0

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def wait_ready(self, queue: Any) -> None:
        """Until every process is registered with RQ (it has loaded the model by then)."""
        from rq import Worker

        deadline = time.monotonic() + READY_WAIT_S
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited with {process.returncode}: "
                                       f"{self.log.read_text(errors='replace')[-3000:]}")
            if set(self.pids) <= {worker.pid for worker in Worker.all(queue=queue)}:
                return
            time.sleep(0.2)
        raise RuntimeError(f"workers not ready after {READY_WAIT_S:.0f} s; log: {self.log}")

    def stop(self) -> list[int | None]:
        """SIGTERM, as `docker stop` or systemd send it; each exit status (None: killed, not
        ended STOP_WAIT_S after the signal)."""
        started = time.monotonic()
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.processes:
            try:
                codes.append(process.wait(max(0.0, started + STOP_WAIT_S - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
        self.stop_s = time.monotonic() - started
        self._log.close()
        return codes


@dataclass
class Snapshot:
    cpu: dict[str, dict[int, float]]
    bench: float

    @staticmethod
    def take(pids: dict[str, list[int]]) -> Snapshot:
        return Snapshot({group: {pid: dp.cpu_seconds(pid) for pid in members}
                         for group, members in pids.items()}, sum(os.times()[:2]))

    def since(self, before: Snapshot) -> dict[str, float]:
        used = {group: sum(seconds - before.cpu.get(group, {}).get(pid, 0.0)
                           for pid, seconds in members.items())
                for group, members in self.cpu.items()}
        used["bench"] = self.bench - before.bench
        return used


def members(workers: Workers, server: BackendProcess, redis: RedisServer, images: dp.ImageServer,
            ls_pid: int) -> dict[str, list[int]]:
    """The processes of each group, now (decode: every child of every worker)."""
    worker_children = [child for pid in workers.pids for child in tree(pid) if child != pid]
    redis_pid = redis._process.pid if redis._process else 0  # a bench may read private fields
    return {"workers": workers.pids, "decode": worker_children, "server": tree(server.pid),
            "redis": [redis_pid], "nginx": images.pids(), "ls": tree(ls_pid)}


def settle(done: Callable[[], bool], seconds: float = SETTLE_S) -> None:
    """Until `done()`, or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


# --- one configuration ---------------------------------------------------------------------------

@dataclass
class Result:
    workers: int
    decode: int
    tasks: int
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    status: str = "?"
    decode_seen: list[int] = field(default_factory=list)
    decode_cpu_s: list[float] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    stop_s: float = 0.0
    left_running: int = 0
    left_segments: list[str] = field(default_factory=list)
    segments: int = 0
    warm_ups: int = 0
    rates: list[float] = field(default_factory=list)
    """tasks/s of every round of this W x D (this one is the fastest)."""

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.decode}"

    @property
    def rate(self) -> float:
        return self.done / self.wall_s if self.wall_s else 0.0

    def ms(self, group: str) -> float:
        return 1000 * self.cpu.get(group, 0.0) / max(1, self.done)

    @property
    def total_ms(self) -> float:
        return sum(self.ms(group) for group in GROUPS if group != "bench")

    @property
    def problems(self) -> list[str]:
        found = []
        if self.status != "done" or self.failed or self.done < self.tasks:
            found.append(f"job {self.status}: {self.done} done, {self.failed} failed")
        if self.decode and any(seen != self.decode for seen in self.decode_seen):
            found.append(f"decode processes per worker {self.decode_seen}, {self.decode} expected")
        if self.decode and not all(self.decode_cpu_s):
            found.append("a worker's decode processes did no work during the job")
        if not self.decode and any(self.decode_seen):
            found.append(f"decode processes with DECODE_PROCESSES=0: {self.decode_seen}")
        if any(code != 0 for code in self.exit_codes):
            found.append(f"worker exit statuses {self.exit_codes}")
        if self.left_running:
            found.append(f"{self.left_running} decode processes still running after the stop")
        if self.left_segments:
            found.append(f"shared memory left in /dev/shm: {self.left_segments}")
        return found


def project_of(client: LabelStudioClient, images: dp.ImageServer, pictures: list[bytes],
               title: str, count: int) -> int:
    """A project of `count` tasks, each a distinct JPEG (its own bytes and URL)."""
    project = client.create_project(title, dp.CONFIG)
    paths = dp.write_run(images.root / "www", pictures, title, count)
    tasks = [{"data": {"image": f"{images.url}/{path}"}} for path in paths]
    for start in range(0, len(tasks), 500):
        client.import_tasks(project, tasks[start:start + 500])
    return project


def run_job(server: BackendProcess, project: int) -> tuple[dict[str, Any], float]:
    """POST /prelabel (executor rq), then poll until the job is no longer running."""
    started = time.perf_counter()
    reply = httpx.post(server.url + "/prelabel", json={"project": project, "executor": "rq"},
                       timeout=60)
    reply.raise_for_status()
    job = reply.json()["id"]
    deadline = time.monotonic() + JOB_WAIT_S
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < deadline:
            state = http.get(f"{server.url}/prelabel/{job}").json()
            if state["status"] != "running":
                return state, time.perf_counter() - started
            time.sleep(POLL_S)
    raise RuntimeError(f"job {job} still running after {JOB_WAIT_S:.0f} s")


def one_configuration(count: int, decode: int, ctx: Context) -> Result:
    result = Result(count, decode, ctx.args.tasks)
    slug = f"w{count}d{decode}-{time.monotonic_ns()}"
    warm_size = count * ctx.item_tasks
    warm = [project_of(ctx.client, ctx.images, ctx.pictures, f"{slug}-warm{i}", warm_size)
            for i in range(WARM_UPS)]
    project = project_of(ctx.client, ctx.images, ctx.pictures, slug, ctx.args.tasks)
    env = {**ctx.env, "DECODE_PROCESSES": str(decode)}
    workers = Workers(count, env, ctx.work / f"workers-{slug}.log")
    try:
        workers.wait_ready(ctx.queue)
        for warm_project in warm:  # every worker gets an item, and starts its decode processes
            run_job(ctx.server, warm_project)
            result.warm_ups += 1
            if all(len(decode_children(pid)) == decode for pid in workers.pids):
                break
        groups = members(workers, ctx.server, ctx.redis, ctx.images, ctx.ls_pid)
        decoders = {pid: decode_children(pid) for pid in workers.pids}
        before = Snapshot.take(groups)
        state, result.wall_s = run_job(ctx.server, project)
        after = Snapshot.take(groups)
        result.cpu = after.since(before)
        result.status, result.done, result.failed = state["status"], state["done"], state["failed"]
        result.failures.update(str(reason)[:100] for reason in state.get("failures", {}).values())
        result.decode_seen = [len(decode_children(pid)) for pid in workers.pids]
        result.decode_cpu_s = [sum(after.cpu["decode"].get(child, 0.0)
                                   - before.cpu["decode"].get(child, 0.0) for child in found)
                               for found in decoders.values()]
        segments = set().union(*(shared_memory(pid) for pid in workers.pids))
        result.segments = len(segments)
    finally:
        result.exit_codes = workers.stop()
        result.stop_s = workers.stop_s
    # a killed worker's decode processes end when they read EOF, and its resource tracker then
    # unlinks the segments: a moment later, so leftovers are counted once that has had time
    pids = [child for found in decoders.values() for child in found]
    settle(lambda: not any(map(running, pids)) and not any(map(os.path.exists, segments)))
    result.left_running = sum(map(running, pids))
    result.left_segments = sorted(segment for segment in segments if Path(segment).exists())
    for title in (slug, *(f"{slug}-warm{i}" for i in range(WARM_UPS))):
        shutil.rmtree(ctx.images.root / "www" / title, ignore_errors=True)
    return result


# --- report --------------------------------------------------------------------------------------

COLUMNS = ("W x D", "procs", "tasks/s", "wall s", "workers", "decode", "server", "redis", "nginx",
           "LS", "total", "bench", "cores busy", "decode seen", "failed")


def row(result: Result) -> list[str]:
    busy = sum(v for k, v in result.cpu.items() if k != "bench") / max(result.wall_s, 1e-9)
    return [result.label, str(result.workers * (1 + result.decode)), f"{result.rate:.1f}",
            f"{result.wall_s:.1f}", *(f"{result.ms(group):.2f}" for group in GROUPS[:-1]),
            f"{result.total_ms:.2f}", f"{result.ms('bench'):.2f}", f"{busy:.2f}",
            ",".join(map(str, result.decode_seen)) or "-", str(result.failed)]


def report(results: list[Result], cores: int) -> None:
    rows = [list(COLUMNS), *(row(result) for result in results)]
    print("\nW x D: worker processes x DECODE_PROCESSES per worker; procs: the worker processes "
          "and their decode processes; CPU ms per task: workers = their main processes, decode = "
          "their child processes, server = the planning backend, LS = Label Studio's process "
          "tree, total = all but this bench process (bench); cores busy = total CPU s / wall s; "
          "decode seen = decode processes per worker during the job")
    dp.print_table(rows)
    for result in results:
        problems = result.problems
        top = dict(result.failures.most_common(3))
        decode_cpu = ", ".join(f"{seconds:.1f}" for seconds in result.decode_cpu_s) or "-"
        rounds = ", ".join(f"{rate:.1f}" for rate in result.rates)
        print(f"  {result.label}: {result.status}, {result.done} done / {result.tasks}, tasks/s "
              f"by round {rounds}, warm-up jobs {result.warm_ups}, decode CPU s per worker "
              f"during the job {decode_cpu}, {result.segments} shm segments mapped; SIGTERM: "
              f"stopped in {result.stop_s:.1f} s, exit {result.exit_codes}, "
              f"{result.left_running} decode processes left, {len(result.left_segments)} "
              "segments left"
              + (f"; failures {top}" if top else "")
              + ("; PROBLEMS: " + "; ".join(problems) if problems else ""))
    good = [result for result in results if not result.problems and result.rate]
    if not good:
        print("recommendation: none (every configuration had problems)")
        return
    best = max(good, key=lambda result: result.rate)
    near = [result for result in good if result.rate >= NEAR_BEST * best.rate]
    lean = min(near, key=lambda result: (result.workers, result.workers * (1 + result.decode),
                                         result.total_ms))
    print(f"recommendation ({cores} cores, CPU only): fastest {best.label} at {best.rate:.1f} "
          f"tasks/s ({best.rate / cores:.1f} per core, {best.total_ms:.1f} CPU ms/task); as fast "
          f"within {100 * (1 - NEAR_BEST):.0f}% with the fewest processes: {lean.label} at "
          f"{lean.rate:.1f} tasks/s, {lean.total_ms:.1f} CPU ms/task = {lean.workers / cores:g} "
          f"worker process(es) per core, DECODE_PROCESSES={lean.decode} each")


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    client: LabelStudioClient
    images: dp.ImageServer
    redis: RedisServer
    server: BackendProcess
    queue: Any
    ls_pid: int
    env: dict[str, str]
    pictures: list[bytes]
    item_tasks: int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=600, help="tasks in each measured job")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker process counts W")
    parser.add_argument("--decode", type=int, nargs="+", default=[0, 1, 2],
                        help="DECODE_PROCESSES values D, per worker")
    parser.add_argument("--item-tasks", type=int,
                        help="PRELABEL_ITEM_TASKS (default: the setting's default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times over the whole grid; each W x D reports its fastest round")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average before: {os.getloadavg()} (a shared machine: other work "
          "skews absolute figures)", flush=True)
    shm_before = {path.name for path in Path("/dev/shm").glob("psm_*")}
    with tempfile.TemporaryDirectory(prefix="bench-rq-workers-") as tmp:
        results = measure(Path(tmp), args)
    report(fastest_rounds(results), cores)
    print(f"load average after: {os.getloadavg()}")
    new = sorted({path.name for path in Path("/dev/shm").glob("psm_*")} - shm_before)
    print(f"/dev/shm psm_* segments created during the run and still there: {new or 'none'} "
          "(other processes on a shared machine may have made some)")
    troubled = [result.label for result in results if result.problems]
    if troubled:
        print(f"rounds with problems: {', '.join(troubled)}")
    return 1 if troubled else 0


def measure(work: Path, args: argparse.Namespace) -> list[Result]:
    config = work / "tiny-224-clip.json"
    config.write_text(json.dumps(dp.TINY_224))
    pictures = [dp.picture(seed) for seed in range(min(dp.PICTURES, args.tasks))]
    item_tasks = args.item_tasks or load_settings().PRELABEL_ITEM_TASKS
    results = []
    with LabelStudioServer() as ls, LabelStudioClient.for_server(ls) as client, \
            dp.ImageServer(work / "images") as images, RedisServer(work / "redis") as redis:
        env = {"MODEL_CONFIG": str(config), "MODEL_PRETRAINED": "none", "DEVICE": "cpu",
               "TEMPLATES": "photo", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
               "IMAGE_URL_ALLOWLIST": "127.0.0.1", "REDIS_URL": redis.url,
               "MODEL_DIR": str(work / "model-dir"), "LOG_LEVEL": "WARNING",
               "PRELABEL_ITEM_TASKS": str(item_tasks), "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        queue = rq_queue(load_settings(REDIS_URL=redis.url))
        print(f"Label Studio {ls.url} (started in {ls.startup_seconds:.0f} s), images: "
              f"{images.kind}, Redis {redis.url}; {args.tasks} tasks per job, {item_tasks} per "
              "item", flush=True)
        with BackendProcess({**env, "DECODE_PROCESSES": "0"}, work / "server.log") as server:
            assert ls._process is not None  # a bench may read private fields
            ctx = Context(args, work, client, images, redis, server, queue,
                          ls._process.pid, {**os.environ, **env}, pictures, item_tasks)
            for round_ in range(1, args.rounds + 1):
                for count in args.workers:
                    for decode in args.decode:
                        result = one_configuration(count, decode, ctx)
                        print(f"  round {round_}, {result.label}: {result.rate:.1f} tasks/s, "
                              f"{result.total_ms:.1f} CPU ms/task, {result.failed} failed, workers "
                              f"stopped in {result.stop_s:.1f} s, load "
                              f"average {os.getloadavg()[0]:.2f}"
                              + (f" ({'; '.join(result.problems)})" if result.problems else ""),
                              flush=True)
                        results.append(result)
    return results


def fastest_rounds(results: list[Result]) -> list[Result]:
    """Per W x D, in the grid's order: the fastest round without problems (else the first with
    them), knowing every round's rate."""
    by_label: dict[str, list[Result]] = {}
    for result in results:
        by_label.setdefault(result.label, []).append(result)
    chosen = []
    for rounds in by_label.values():
        clean = [result for result in rounds if not result.problems]
        best = max(clean, key=lambda result: result.rate) if clean else rounds[0]
        best.rates = [result.rate for result in rounds]
        chosen.append(best)
    return chosen


if __name__ == "__main__":
    sys.exit(main())
