"""The end-to-end flow against the Compose stack (scripts/docker-smoke.sh compose).

    python3 scripts/compose_flow.py --label-studio http://127.0.0.1:8080 --token KEY \
        --compose "docker compose -p NAME -f docker/compose.yaml -f docker/compose.smoke.yaml"

In Label Studio: a project, the backend connected by its name on the Compose network
(http://backend.labelstudio.internal:9090, the alias docker/compose.yaml gives the backend
service: Label Studio refuses a webhook URL whose hostname has no dot), predictions
retrieved, annotations that correct them, and the corrections log in Redis (read with
redis-cli in the redis container). Then Redis is restarted, and stopped while one
more annotation is made: nothing is lost. Standard library only; exit 0 when all held.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from typing import Any

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>')
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
LOG, CORRECTIONS = "clip-backend:log", "clip-backend:corrections"
BACKEND_URL = "http://backend.labelstudio.internal:9090"


def png(rgb: tuple[int, int, int], size: int = 16) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(data).decode()


class LabelStudio:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=120) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
        return json.loads(text) if text else None


def step(message: str) -> None:
    print(f"-- {message}", flush=True)


def until(what: str, check: Callable[[], bool], timeout_s: float = 180) -> None:
    """Poll a condition of another process (Label Studio's webhook, a container's start)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)


class Stack:
    def __init__(self, compose: str) -> None:
        self.compose = shlex.split(compose)

    def run(self, *args: str) -> str:
        return subprocess.run([*self.compose, *args], check=True, capture_output=True,
                              text=True, timeout=600).stdout.strip()

    def redis(self, *command: str) -> str:
        return self.run("exec", "-T", "redis", "redis-cli", "--raw", *command)

    def counts(self) -> tuple[int, int]:
        return int(self.redis("XLEN", LOG)), int(self.redis("ZCARD", CORRECTIONS))

    def healthy(self, service: str) -> bool:
        container = self.run("ps", "-q", service)
        if not container:
            return False
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                               capture_output=True, text=True, timeout=60).stdout.strip()
        return state == "healthy"


def annotate(ls: LabelStudio, task: dict[str, Any], choice: str) -> None:
    ls.call("POST", f"/api/tasks/{task['id']}/annotations/", {"result": [{
        "from_name": "label", "to_name": "image", "type": "choices",
        "value": {"choices": [choice]}}]})


def corrected(prediction: str) -> str:
    return next(colour for colour in COLOURS if colour != prediction)


def flow(ls: LabelStudio, stack: Stack) -> None:
    step("project with three image tasks")
    project = ls.call("POST", "/api/projects/", {"title": "compose-smoke", "label_config": CONFIG})
    pid = project["id"]
    ls.call("POST", f"/api/projects/{pid}/import?return_task_ids=true",
            [{"data": {"image": png(rgb)}} for rgb in COLOURS.values()])
    step(f"connect the backend by its name on the Compose network: {BACKEND_URL}")
    backend = ls.call("POST", "/api/ml/", {"url": BACKEND_URL, "project": pid, "title": "clip"})
    state = ls.call("GET", f"/api/ml/{backend['id']}")["state"]
    print(f"   ML backend {backend['id']}: state {state}")
    if state != "CO":
        raise SystemExit(f"Label Studio could not connect the backend (state {state})")
    hooks = [hook["url"] for hook in ls.call("GET", f"/api/webhooks/?project={pid}")]
    print(f"   Label Studio's webhooks for the project: {hooks}")
    if f"{BACKEND_URL}/webhook" not in hooks:  # annotations would never reach the backend
        raise SystemExit(f"Label Studio made no webhook {BACKEND_URL}/webhook with the ML "
                         "backend: corrections cannot reach it (its log says why)")
    step("retrieve predictions")
    ls.call("POST", f"/api/dm/actions/?id=retrieve_tasks_predictions&project={pid}",
            {"selectedItems": {"all": True, "excluded": []}})
    tasks = ls.call("GET", f"/api/tasks/?project={pid}&fields=all&page_size=100")["tasks"]
    predicted = {task["id"]: task["predictions"][0]["result"][0]["value"]["choices"][0]
                 for task in tasks if task["predictions"]}
    print(f"   predictions: {predicted}")
    if len(predicted) != len(tasks):
        raise SystemExit(f"{len(tasks) - len(predicted)} of {len(tasks)} tasks got no prediction")
    before = stack.counts()
    step("annotate two tasks, each correcting its prediction")
    for task in tasks[:2]:
        annotate(ls, task, corrected(predicted[task["id"]]))
    try:
        until("two corrections in Redis", lambda: stack.counts()[1] >= before[1] + 2)
    except SystemExit:
        print("   Label Studio's webhooks:", ls.call("GET", f"/api/webhooks/?project={pid}"))
        raise
    logged = stack.counts()
    print(f"   Redis: {LOG} XLEN {logged[0]}, {CORRECTIONS} ZCARD {logged[1]}")
    restart_redis(ls, stack, tasks[2], predicted[tasks[2]["id"]], logged)


def restart_redis(ls: LabelStudio, stack: Stack, task: dict[str, Any], prediction: str,
                  logged: tuple[int, int]) -> None:
    step("restart the Redis container")
    stack.run("restart", "redis")
    until("redis healthy", lambda: stack.healthy("redis"))
    after = stack.counts()
    print(f"   after restart: XLEN {after[0]}, ZCARD {after[1]}")
    if after != logged:
        raise SystemExit(f"Redis lost data over a restart: {logged} before, {after} after")
    step("annotate a task while Redis is stopped, then start it")
    stack.run("stop", "redis")
    annotate(ls, task, corrected(prediction))
    stack.run("start", "redis")
    until("redis healthy", lambda: stack.healthy("redis"))
    until("the spooled correction in Redis", lambda: stack.counts()[1] >= logged[1] + 1)
    final = stack.counts()
    print(f"   after the outage: XLEN {final[0]}, ZCARD {final[1]}")
    step("passed: predictions, corrections logged, Redis restarted and stopped without loss")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-studio", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--compose", required=True, help="the docker compose command line")
    args = parser.parse_args()
    flow(LabelStudio(args.label_studio, args.token), Stack(args.compose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
