"""A whole project through the pre-label job, against a real Label Studio, in one run.

    python bench/prelabel_job.py [--tasks 2000] [--model ViT-B-32] [--megapixels 0.3]

Starts Label Studio (from its own virtualenv: LABEL_STUDIO_VENV, as the tests) and
`python -m backend serve` (random weights), imports --tasks tasks whose JPEGs are served over
loopback HTTP, starts the job with POST /prelabel and polls GET /prelabel/{id} every 0.5 s
while a prober GETs /health every 50 ms. It prints:
  first pass   wall time, tasks/s, and the progress the polls saw;
  requests     the slowest Label Studio API call the job made (the backend's
               backend_labelstudio_call_duration_seconds histogram), the slowest status poll,
               and /health p99 and max;
  second pass  the same job again: tasks predicted (0: idempotent);
  re-score     a job after a label change (a new model_version): tasks/s, images encoded (0).
Exit status 1 if any request took 5 s or more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_throughput import photo_like_jpeg  # noqa: E402

from tests.e2e.label_studio import LabelStudioClient, LabelStudioServer  # noqa: E402
from tests.support.backend_process import BackendProcess  # noqa: E402
from tests.support.http_server import LoopbackServer, Route  # noqa: E402
from tests.support.tiny_models import write_config  # noqa: E402

LABELS = ["cat", "dog", "car", "tree", "house", "person", "bicycle", "boat"]
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          + "".join(f'<Choice value="{label}"/>' for label in LABELS) + "</Choices></View>")
SLOW_S = 5.0


class Prober(threading.Thread):
    """GET /health every 50 ms, as Label Studio's connection check would."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                client.get(self.url + "/health")
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.05)


def run_job(backend: BackendProcess, project: int) -> tuple[dict, float, float]:
    """(final state, wall seconds, slowest status poll in seconds)."""
    started = time.perf_counter()
    reply = httpx.post(backend.url + "/prelabel", json={"project": project}, timeout=30)
    reply.raise_for_status()
    job, slowest = reply.json()["id"], time.perf_counter() - started
    while True:
        time.sleep(0.5)
        polled = time.perf_counter()
        state = httpx.get(f"{backend.url}/prelabel/{job}", timeout=30).json()
        slowest = max(slowest, time.perf_counter() - polled)
        if state["status"] != "running":
            return state, time.perf_counter() - started, slowest


def histogram_max(backend: BackendProcess, name: str) -> tuple[float, int]:
    """(upper bound of the slowest call: the lowest bucket holding every call, calls)."""
    text = httpx.get(backend.url + "/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0) + sample.value
    total = buckets.get(float("inf"), 0)
    return min(bound for bound, count in buckets.items() if count >= total), int(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip name, or 'tiny'")
    parser.add_argument("--megapixels", type=float, default=0.3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    model = ({"MODEL_CONFIG": str(write_config(work, "clip"))} if args.model == "tiny"
             else {"MODEL_NAME": args.model})
    with LabelStudioServer() as ls, LabelStudioClient.for_server(ls) as client, \
            LoopbackServer() as images:
        project = client.create_project("bench", CONFIG)
        tasks = [{"data": {"image": images.add(f"/{i}.jpg", Route(
            photo_like_jpeg(args.megapixels, i), content_type="image/jpeg"))}}
            for i in range(args.tasks)]
        for start in range(0, len(tasks), 500):
            client.import_tasks(project, tasks[start:start + 500])
        env = {**model, "MODEL_PRETRAINED": "none", "LABEL_STUDIO_URL": ls.url,
               "LABEL_STUDIO_API_KEY": ls.token, "IMAGE_URL_ALLOWLIST": "127.0.0.1",
               "MODEL_DIR": str(work / "model-dir"), "LOG_LEVEL": "WARNING",
               "TEMPLATES": "photo"}
        with BackendProcess(env, work / "backend.log") as backend:
            prober = Prober(backend.url)
            prober.start()
            first, first_s, first_poll = run_job(backend, project)
            calls_max, calls = histogram_max(backend, "backend_labelstudio_call_duration_seconds")
            again, _, again_poll = run_job(backend, project)
            encoded = backend.counter("backend_images_encoded_total")
            client.patch_project(project, label_config=CONFIG.replace(
                "</Choices>", '<Choice value="bus"/></Choices>'))
            rescore, rescore_s, rescore_poll = run_job(backend, project)
            rescore_encodes = backend.counter("backend_images_encoded_total") - encoded
            prober.stop.set()
            prober.join()
    health = sorted(prober.latencies)
    p99 = health[int(0.99 * (len(health) - 1))]
    slowest_poll = max(first_poll, again_poll, rescore_poll)
    print(f"model {args.model} (random weights), {args.tasks} tasks of {args.megapixels} MP, "
          f"{os.cpu_count()} CPUs")
    print(f"first pass: {first['status']}, {first['done']} done, {first['failed']} failed in "
          f"{first_s:.1f} s = {args.tasks / first_s:.1f} tasks/s")
    print(f"requests:   {calls} Label Studio API calls, slowest <= {calls_max:g} s; slowest "
          f"status poll {slowest_poll * 1000:.0f} ms; /health p99 {p99 * 1000:.0f} ms, max "
          f"{health[-1] * 1000:.0f} ms ({len(health)} probes, median "
          f"{statistics.median(health) * 1000:.0f} ms)")
    print(f"second pass: {again['status']}, skipped {again['skipped']} of {again['total']} "
          f"(predicted {again['total'] - again['skipped']})")
    print(f"re-score after a label change: {rescore['status']}, {rescore['done']} done in "
          f"{rescore_s:.1f} s = {args.tasks / rescore_s:.1f} tasks/s = "
          f"{first_s / rescore_s:.1f} x first pass, {rescore_encodes:.0f} images encoded")
    slow = [what for what, seconds in (("a Label Studio call", calls_max),
                                       ("a status poll", slowest_poll),
                                       ("a /health probe", health[-1])) if seconds >= SLOW_S]
    if slow:
        print("requests of 5 s or more: " + ", ".join(slow))
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
