"""The data plane's CPU proxy: /predict with a near-free encoder, against the CPU work it needs.

    python bench/data_plane.py [--images 2000] [--clients 8] [--tasks-per-request 16]
                               [--processes 0 1 2] [--seconds 10] [--megapixels 0.3]
                               [--model ViT-B-16 --device cuda --precision bf16] [--no-install]

The encoder is a tiny open_clip model (random weights) with a 224 px input, so what is left is
the data plane: download, hash, decode, preprocess, store, scheduling. In one run it measures:
  limit     cores x the single-thread img/s of the real work on the same images: decode (with
            draft) + resize + crop + normalise, as the backend does it (images.decode and the
            encoder's preprocess), from its CPU time (what an idle core does);
  /predict  img/s of the real app (`python -m backend serve` in a subprocess), `--clients`
            concurrent clients of `--tasks-per-request` tasks each, over loopback HTTP, for each
            DECODE_PROCESSES in `--processes` (one run when the setting does not exist yet),
            and its ratio to the limit (target >= 0.6; 2 processes >= 1.7 x 1 on 2 cores);
  CPU ms    per image: the server's main process, its child processes (the decode processes),
            the plane's own stages (backend_plane_cpu_seconds_total{stage}, when exposed),
            the image server and this client; their sum against the real work's CPU ms is
            the ratio an idle machine would reach (a CPU-bound figure other load does not skew);
  /health   p50/p99 latency, sampled every 20 ms from another process while /predict runs
            flat out (target p99 < 100 ms);
  reuse     image requests per HTTP connection, from nginx's access log (keep-alive measured,
            not assumed).
Images: 640x480 JPEGs (quality 90), distinct bytes in every run (each backend run also starts
with an empty store), served by nginx (Debian's nginx-light, installed if missing) with a
generated configuration; without nginx, by a Python asyncio server in processes of its own
(with a warning: it takes more CPU from the cores being measured). The machine may be shared:
the load average is printed before and after; compare ratios from one run only.

With `--model NAME` (an open_clip architecture, random weights: the FLOPs of the real ones) the
encoder is real, on `--device` in `--precision` (the backend's DEVICE and PRECISION), and the
same run also measures
  encoder-only  img/s of the encoder alone fed as the plane feeds it: batches of the backend's
            size (BATCH_SIZE, auto: 8 CPU, 64 GPU) of uint8 pixels already decoded and resized,
            normalised on the device, embeddings back on the CPU; and /predict ÷ encoder-only
            (issue 16's GPU target: >= 0.5);
  GPU use   on cuda, nvidia-smi's utilisation and memory sampled every 200 ms during each
            /predict run (mean, p50, max).
`--megapixels` sets the picture size (0.3 = 640x480, 12 = 4000x3000, 4:3). `--processes unset`
runs the backend's default (one decode process per CPU). `--no-install`: no apt-get for nginx
(a machine without network; the fallback is a Python asyncio server in its own processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.config import Settings, load_settings  # noqa: E402
from backend.images.decode import decode_image  # noqa: E402
from backend.images.steps import apply_steps  # noqa: E402
from bench.predict_throughput import photo_like, synchronise  # noqa: E402
from tests.support.backend_process import BackendProcess  # noqa: E402
from tests.support.redis_server import free_port  # noqa: E402
from tests.support.tiny_models import TINY_CLIP  # noqa: E402

WIDTH, HEIGHT, QUALITY = 640, 480, 90
NOISE = 8.0
"""Standard deviation of the noise added to each picture, in 8-bit levels."""
PICTURES = 256
"""Different pictures drawn at 0.3 MP (fewer for larger ones, as many pixels in all); the rest
of `--images` are byte-distinct copies (a JPEG comment)."""
TINY_224 = {**TINY_CLIP, "vision_cfg": {"image_size": 224, "layers": 1, "width": 16,
                                        "patch_size": 32, "head_width": 16}}
LABELS = ["cat", "dog", "car", "tree", "house", "person", "bicycle", "boat"]
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          + "".join(f'<Choice value="{label}"/>' for label in LABELS) + "</Choices></View>")
STAGES = ("fetch", "hash", "decode", "preprocess")
HEALTH_EVERY_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- images ------------------------------------------------------------------------------------

def picture(seed: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    """A photo-like JPEG (640x480 unless `size` says otherwise): gradients and shapes under
    sensor-like noise, about 86 KB at 640x480 and 3 MB at 4000x3000, quality 90, as camera
    photos of those sizes are (smooth shapes alone compress to 22 KB and decode faster than
    photos)."""
    width, height = size
    rng = np.random.default_rng(seed)
    image = photo_like(width, height, rng)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, NOISE, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def dimensions(megapixels: float) -> tuple[int, int]:
    """(width, height) of a 4:3 picture of about `megapixels`, the width a multiple of 16:
    0.3 → 640x480, 2 → 1632x1224, 12 → 4000x3000."""
    width = 16 * max(1, round((megapixels * 1e6 * 4 / 3) ** 0.5 / 16))
    return width, width * 3 // 4


def draw_pictures(count: int, size: tuple[int, int]) -> list[bytes]:
    """`count` different pictures of `size` (seeds 0, 1, ...); large ones drawn in processes,
    one per CPU (a 12 MP one takes a core about 1.5 s)."""
    if size[0] * size[1] <= 1_000_000 or count == 1:
        return [picture(seed, size) for seed in range(count)]
    workers = min(count, len(os.sched_getaffinity(0)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(picture, range(count), [size] * count))


def picture_count(megapixels: float, images: int) -> int:
    """Different pictures for a run: PICTURES at 0.3 MP, as many pixels in all (at least 4)
    for larger ones, never more than `images`."""
    return max(1, min(images, PICTURES, max(4, round(PICTURES * 0.3 / megapixels))))


def tagged(jpeg: bytes, tag: str) -> bytes:
    """The same JPEG with a comment segment after SOI: other bytes (another sha256), same pixels."""
    payload = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def write_run(www: Path, pictures: list[bytes], run: str, count: int) -> list[str]:
    """`count` distinct JPEGs for one run under www/run/; their paths relative to www."""
    folder = www / run
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(tagged(pictures[i % len(pictures)], f"{run}/{i}"))
        paths.append(f"{run}/{i}.jpg")
    return paths


# --- the image server --------------------------------------------------------------------------

NGINX_CONF = """{user}worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    log_format reuse '$connection $connection_requests $request_uri';
    access_log {root}/access.log reuse;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    client_body_temp_path {root}/body;
    open_file_cache max=10000 inactive=60s;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
    }}
}}
"""
PYTHON_SERVER = r"""
import asyncio, ctypes, os, signal, socket, sys
port, root, workers = int(sys.argv[1]), os.path.realpath(sys.argv[2]), int(sys.argv[3])

class Files(asyncio.Protocol):  # GET only, HTTP/1.1 keep-alive, files read per request
    def connection_made(self, transport):
        self.transport, self.pending = transport, b""
    def data_received(self, data):
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            head, self.pending = self.pending.split(b"\r\n\r\n", 1)
            target = head.split(b" ", 2)[1].split(b"?")[0].decode()
            path = os.path.realpath(os.path.join(root, target.lstrip("/")))
            try:
                if not path.startswith(root + os.sep):
                    raise FileNotFoundError(path)
                with open(path, "rb") as handle:
                    body, status = handle.read(), b"200 OK"
            except OSError:
                body, status = b"", b"404 Not Found"
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

listener = socket.create_server(("127.0.0.1", port), backlog=4096)
children = []
for _ in range(workers - 1):  # forked before any loop: all accept on the one socket
    pid = os.fork()
    if pid == 0:
        children = []
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: end with the parent
        break
    children.append(pid)

def stop(*_):
    for child in children:
        os.kill(child, signal.SIGTERM)
    for child in children:
        os.waitpid(child, 0)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)

async def serve():
    server = await asyncio.get_running_loop().create_server(Files, sock=listener)
    await server.serve_forever()

asyncio.run(serve())
"""


def nginx_binary(install: bool = True) -> str | None:
    """nginx on PATH (or /usr/sbin), installing Debian's nginx-light when it is missing (unless
    not `install`: on a machine without network, apt-get could wait minutes for a mirror)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found or not install or not shutil.which("apt-get"):
        return found
    print("installing nginx-light (apt-get) to serve the images ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "nginx-light"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "nginx-light"]):
        if subprocess.run(command, env=env, capture_output=True).returncode == 0 and \
                command[1] == "install":
            break
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class ImageServer:
    """nginx serving `root`/www on a loopback port, or a Python server when nginx is missing."""

    def __init__(self, root: Path, install: bool = True) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kind = "nginx"
        self.install = install

    def __enter__(self) -> ImageServer:
        (self.root / "www").mkdir(parents=True, exist_ok=True)
        binary = nginx_binary(self.install)
        if binary:
            conf = self.root / "nginx.conf"
            # started by root, nginx's workers would run as nobody, who cannot read a temp dir
            user = "user root;\n" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONF.format(user=user, root=self.root, port=self.port))
            command = [binary, "-p", str(self.root), "-c", str(conf), "-e", "stderr"]
        else:
            # one process serves a few thousand small files a second; a quarter of the cores
            # at most, 4 at most (the rest decode)
            workers = max(1, min(4, len(os.sched_getaffinity(0)) // 4))
            print(f"WARNING: nginx is not available; images come from a Python asyncio server "
                  f"in {workers} process(es) of its own, which takes more CPU per image than "
                  "nginx from the cores being measured (the 'images' column)", flush=True)
            self.kind = f"python asyncio server x {workers}"
            command = [sys.executable, "-c", PYTHON_SERVER, str(self.port), str(self.root / "www"),
                       str(workers)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
        self._wait()
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"image server exited: {self.process.communicate()[1]!r}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("image server did not start")

    def log_size(self) -> int:
        log = self.root / "access.log"
        return log.stat().st_size if log.exists() else 0

    def requests_per_connection(self, start: int, marker: str) -> float | None:
        """Image requests per TCP connection since `start` (nginx's access log: connection
        serial numbers), for the URIs containing `marker`; None without nginx."""
        log = self.root / "access.log"
        if not log.exists():
            return None
        with log.open("rb") as handle:
            handle.seek(start)
            lines = handle.read().decode("utf-8", "replace").splitlines()
        connections = [line.split()[0] for line in lines if marker in line]
        return len(connections) / len(set(connections)) if connections else None

    def pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- CPU accounting from /proc -----------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from every process's parent id in /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(entry.name))
    return found


@dataclass
class CpuSnapshot:
    main: float
    children: dict[int, float]
    server: float
    client: float
    plane: dict[str, float]

    @staticmethod
    def take(backend: BackendProcess, images: ImageServer) -> CpuSnapshot:
        return CpuSnapshot(
            main=cpu_seconds(backend.pid),
            children={pid: cpu_seconds(pid) for pid in children(backend.pid)},
            server=sum(cpu_seconds(pid) for pid in images.pids()),
            client=sum(os.times()[:2]),
            plane=plane_cpu(backend.url))


def plane_cpu(url: str) -> dict[str, float]:
    """backend_plane_cpu_seconds_total by stage; empty before the plane exists."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {sample.labels.get("stage", "?"): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "backend_plane_cpu_seconds_total"}


def metric(url: str, name: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == name]
    return sum(values) if values else None


# --- the limit: single-thread real work --------------------------------------------------------

def single_thread_work(settings: Settings, encoder: Any, images: list[bytes],
                       seconds: float) -> tuple[float, float]:
    """(img/s by the wall clock, CPU ms per image) of decode (draft) + resize + crop +
    normalise on one thread (torch's too: the caller sets it), as the backend does it. The CPU
    time is what an idle core needs: on a shared machine the wall-clock rate also counts the
    time other work took the core."""
    work = lambda data: encoder.preprocess(decode_image(  # noqa: E731
        data, max_pixels=settings.MAX_IMAGE_PIXELS, draft_size=encoder.input_size,
        content_type="image/jpeg", max_bytes=settings.MAX_DECODE_BYTES,
        formats=settings.image_formats))
    for data in images[:8]:
        work(data)
    done, started, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - started < seconds or done < 50:
        work(images[done % len(images)])
        done += 1
    wall, work_ms = done / (time.perf_counter() - started), 1000 * (time.thread_time() - cpu) / done
    return wall, work_ms


def encoder_cpu_ms(encoder: Any) -> float:
    """The encoder's own CPU ms per image: batches of 8 uint8 images (one torch thread: the
    caller sets it)."""
    import torch

    batch = torch.randint(0, 256, (8, encoder.input_size, encoder.input_size, 3),
                          dtype=torch.uint8)
    encoder.encode_pixels(batch)
    cpu = time.thread_time()
    for _ in range(20):
        encoder.encode_pixels(batch)
    return 1000 * (time.thread_time() - cpu) / (20 * len(batch))


@dataclass
class EncoderOnly:
    rate: float
    batch: int
    batches: int
    seconds: float
    fed: str


def encoder_only(encoder: Any, images: list[bytes], batch: int,
                 seconds: float) -> EncoderOnly:
    """img/s of the encoder alone, fed as the inference thread feeds it from the plane: one
    batch of `batch` uint8 (S, S, 3) pixels (the decode processes' decode and steps, done
    first, not timed) through `encode_pixels` (to the device, normalised there, embeddings back
    on the CPU), again and again for `seconds` (3 warm-up batches first). A model whose
    preprocessing does not split gets float tensors through `encode_images`, as the backend
    gives it."""
    import torch

    decoded = [decode_image(data, max_pixels=10**9, draft_size=encoder.input_size)
               for data in images[:batch]]
    rows = [decoded[i % len(decoded)] for i in range(batch)]
    if encoder.pixel_steps is not None:
        pixels = torch.from_numpy(np.stack([np.asarray(apply_steps(image, encoder.pixel_steps))
                                            for image in rows]))
        encode, fed = encoder.encode_pixels, "uint8 pixels in"
    else:
        pixels = torch.stack([encoder.preprocess(image) for image in rows])
        encode, fed = encoder.encode_images, "float tensors in (preprocessing does not split)"
    for _ in range(3):  # kernel selection, allocator
        encode(pixels)
    synchronise(encoder.device)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        encode(pixels)  # returns the embeddings on the CPU: the device's work is done
        calls += 1
    elapsed = time.perf_counter() - started
    return EncoderOnly(batch * calls / elapsed, batch, calls, elapsed, fed)


# --- GPU utilisation (nvidia-smi, another process) ---------------------------------------------

GPU_QUERY = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "200"]


class GpuSampler:
    """nvidia-smi's GPU utilisation (%) and memory used (MiB) every 200 ms while the block
    runs; `samples` is None where nvidia-smi is absent or not `enabled`."""

    def __init__(self, enabled: bool, out: Path) -> None:
        self.binary = shutil.which("nvidia-smi") if enabled else None
        self.out = out
        self.samples: list[tuple[float, float]] | None = None

    def __enter__(self) -> GpuSampler:
        if self.binary:
            self._file = self.out.open("wb")
            self.process = subprocess.Popen([self.binary, *GPU_QUERY], stdout=self._file,
                                            stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.binary:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._file.close()
        self.samples = []
        for line in self.out.read_text().splitlines():
            fields = [part.strip() for part in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):
                self.samples.append((float(fields[0]), float(fields[1])))


# --- /health sampler (another process) ---------------------------------------------------------

def sample_health(url: str, ready: Any, stop: Any, results: Any) -> None:
    """GET /health every 20 ms until `stop`; put the latencies (s) on `results`."""
    latencies: list[float] = []
    with httpx.Client(timeout=10) as client:
        client.get(url + "/health")
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url + "/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(max(0.0, HEALTH_EVERY_S - (time.perf_counter() - started)))
    results.put(latencies)


class HealthSampler:
    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready, self.stop, self.results = context.Event(), context.Event(), context.Queue()
        self.process = context.Process(target=sample_health,
                                       args=(url, self.ready, self.stop, self.results))

    def __enter__(self) -> HealthSampler:
        self.process.start()
        if not self.ready.wait(60):
            raise RuntimeError("the /health sampler did not start")
        return self

    def latencies(self) -> list[float]:
        self.stop.set()
        found: list[float] = self.results.get(timeout=60)
        self.process.join(30)
        return found

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.terminate()


# --- /predict load -----------------------------------------------------------------------------

@dataclass
class Load:
    images: int = 0
    requests: int = 0
    wall_s: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)


async def drive(url: str, batches: list[list[str]], clients: int, seconds: float) -> Load:
    """`clients` concurrent clients, each posting the next batch until none is left or
    `seconds` have passed; in-flight requests finish and count."""
    load, pending = Load(), iter(batches)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        for batch in pending:
            tasks = [{"id": i, "data": {"image": ref}} for i, ref in enumerate(batch)]
            response = await http.post(url + "/predict", json={"tasks": tasks,
                                                               "label_config": CONFIG})
            count(load, response, len(batch))
            if time.perf_counter() > deadline:
                return

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        load.wall_s = time.perf_counter() - started
    return load


def count(load: Load, response: httpx.Response, tasks: int) -> None:
    load.requests += 1
    if response.status_code != 200:
        load.failures[f"HTTP {response.status_code}"] += tasks
        return
    for result in response.json()["results"]:
        if "result" in result:
            load.images += 1
        else:
            load.failures[str(result.get("error", "?"))[:80]] += 1


# --- one backend run ---------------------------------------------------------------------------

@dataclass
class Run:
    label: str
    load: Load
    before: CpuSnapshot
    after: CpuSnapshot
    health: list[float]
    decode_processes: float | None
    requests_per_connection: float | None = None
    gpu: list[tuple[float, float]] | None = None
    """nvidia-smi's (utilisation %, memory MiB) samples during the load; None: not sampled."""

    @property
    def rate(self) -> float:
        return self.load.images / self.load.wall_s if self.load.wall_s else 0.0

    def ms(self, seconds: float) -> float:
        return 1000 * seconds / max(1, self.load.images)

    def total_s(self) -> float:
        """CPU seconds of the server, its children, the image server and the client."""
        return (self.after.main - self.before.main + self.children_s()
                + self.after.server - self.before.server + self.after.client - self.before.client)

    def children_s(self) -> float:
        return sum(cpu - self.before.children.get(pid, 0.0)
                   for pid, cpu in self.after.children.items())


def model_env(args: argparse.Namespace, config: Path) -> dict[str, str]:
    """The settings naming the model, its device and precision: the tiny 224 px model (its
    config file) unless --model names an open_clip architecture."""
    env = {"MODEL_NAME": args.model} if args.model else {"MODEL_CONFIG": str(config)}
    env["DEVICE"] = args.device
    if args.precision:
        env["PRECISION"] = args.precision
    return env


def backend_env(model: dict[str, str], state: Path, processes: int | None) -> dict[str, str]:
    env = {**model, "MODEL_PRETRAINED": "none", "MODEL_DIR": str(state),
           "IMAGE_URL_ALLOWLIST": "127.0.0.1", "TEMPLATES": "photo", "LOG_LEVEL": "WARNING"}
    if processes is not None:
        env["DECODE_PROCESSES"] = str(processes)
    return env


def one_run(label: str, env: dict[str, str], images: ImageServer, work: Path,
            pictures: list[bytes], args: argparse.Namespace) -> Run:
    www, slug = images.root / "www", f"run{time.monotonic_ns()}"
    warm = write_run(www, pictures, f"{slug}-warm", 2 * args.tasks_per_request)
    paths = write_run(www, pictures, slug, args.images)
    refs = [f"{images.url}/{path}" for path in paths]
    per = args.tasks_per_request
    batches = [refs[i:i + per] for i in range(0, len(refs), per)]
    log_start = images.log_size()
    with BackendProcess(env, work / f"backend-{slug}.log") as backend:
        asyncio.run(drive(backend.url, [[f"{images.url}/{p}" for p in warm]], 1, 600))
        gpu = GpuSampler(args.device.startswith("cuda"), work / f"gpu-{slug}.csv")
        with HealthSampler(backend.url) as health, profiled(backend.pid, label, args.py_spy):
            before = CpuSnapshot.take(backend, images)
            with gpu:
                load = asyncio.run(drive(backend.url, batches, args.clients, args.seconds))
            after = CpuSnapshot.take(backend, images)
            latencies = health.latencies()
        alive = metric(backend.url, "backend_decode_processes")
    shutil.rmtree(www / slug)
    shutil.rmtree(www / f"{slug}-warm")
    if len(batches) * per <= load.images + sum(load.failures.values()):
        print(f"  note: run {label} used all {args.images} images within {args.seconds:.0f} s "
              "(more --images make a longer run)", flush=True)
    return Run(label, load, before, after, latencies, alive,
               images.requests_per_connection(log_start, f"/{slug}/"), gpu.samples)


@contextlib.contextmanager
def profiled(pid: int, label: str, out: Path | None) -> Iterator[None]:
    """py-spy sampling the server's main process (its own threads only) while the block runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not Path(spy).exists():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"profile-{label}.txt"
    process = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate",
                                "200", "--output", str(raw), "--nonblocking", "--subprocesses"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


# --- report ------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


COLUMNS = ("DECODE_PROCESSES", "img/s", "x limit", "main", "procs", *STAGES, "images",
           "client", "p50", "p99", "failed")


def row(run: Run, limit: float) -> list[str]:
    plane = [f"{run.ms(run.after.plane[s] - run.before.plane.get(s, 0.0)):.2f}"
             if s in run.after.plane else "-" for s in STAGES]
    return [run.label, f"{run.rate:.1f}", f"{run.rate / limit:.2f}",
            f"{run.ms(run.after.main - run.before.main):.2f}", f"{run.ms(run.children_s()):.2f}",
            *plane, f"{run.ms(run.after.server - run.before.server):.2f}",
            f"{run.ms(run.after.client - run.before.client):.2f}",
            f"{1000 * percentile(run.health, 50):.1f}", f"{1000 * percentile(run.health, 99):.1f}",
            str(sum(run.load.failures.values()))]


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells in aligned columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(r, widths))))


def report(runs: list[Run], limit: float, cores: int, work_ms: float) -> None:
    rows = [list(COLUMNS), *(row(run, limit) for run in runs)]
    print("\nCPU ms per image: main = the server process, procs = its child processes (decode), "
          "fetch..preprocess = backend_plane_cpu_seconds_total{stage} ('-': not exposed), "
          "images = the image server, client = this process; /health latency in ms")
    print_table(rows)
    for run in runs:
        top = dict(run.load.failures.most_common(3))
        failures = f", failures {top}" if top else ""
        print(f"  {run.label}: {run.load.images} images in {run.load.wall_s:.1f} s, "
              f"{run.load.requests} requests, {len(run.health)} /health samples, decode "
              f"processes alive at the end: {run.decode_processes}, image requests per "
              f"connection: {_reuse(run.requests_per_connection)}{failures}")
    by_label = {run.label: run for run in runs}
    one, two = by_label.get("1"), by_label.get("2")
    if one and two and one.rate:
        print(f"scaling: 2 processes = {two.rate / one.rate:.2f} x 1 process "
              f"(target >= 1.7 on 2 cores; {cores} cores here)")
    for run in runs:
        total = run.ms(run.total_s())
        print(f"/predict {run.label}: {run.rate / limit:.2f} x limit (target >= 0.6); CPU "
              f"{total:.2f} ms/img in all processes = {work_ms / total:.2f} x the real work's "
              f"{work_ms:.2f} (the ratio an idle machine would reach, if CPU-bound); /health p99 "
              f"{1000 * percentile(run.health, 99):.1f} ms (target < 100)")


def report_encoder(runs: list[Run], ceiling: EncoderOnly, gpu_sampled: bool) -> None:
    """With a real encoder: /predict against the encoder alone, and the GPU's use."""
    for run in runs:
        print(f"/predict {run.label}: {run.rate:.1f} img/s = {run.rate / ceiling.rate:.2f} x "
              f"encoder-only {ceiling.rate:.1f} img/s (target >= 0.5 on GPU)")
    for run in runs:
        if run.gpu:
            util = [u for u, _ in run.gpu]
            print(f"GPU during /predict {run.label}: utilisation mean {np.mean(util):.0f} %, "
                  f"p50 {np.percentile(util, 50):.0f} %, max {max(util):.0f} %; memory used "
                  f"max {max(m for _, m in run.gpu):,.0f} MiB ({len(run.gpu)} samples, 200 ms)")
        elif gpu_sampled:
            print(f"GPU during /predict {run.label}: not sampled (nvidia-smi "
                  f"{'gave nothing' if run.gpu is not None else 'not found'})")


def _reuse(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def processes_value(text: str) -> int | None:
    """A --processes value: a count, or 'unset' (the backend's default: one per CPU)."""
    if text == "unset":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a count >= 0, or 'unset'")
    return value


def run_labels(processes: list[int | None]) -> list[tuple[str, int | None]]:
    """(label, DECODE_PROCESSES) per run; one default run while the setting does not exist."""
    if "DECODE_PROCESSES" not in Settings.model_fields:
        print("DECODE_PROCESSES is not a setting in this branch: one run of today's path")
        return [("default", None)]
    return [("unset" if n is None else str(n), n) for n in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="distinct JPEGs per run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tasks-per-request", type=int, default=16)
    parser.add_argument("--processes", type=processes_value, nargs="+", default=[0, 1, 2],
                        help="DECODE_PROCESSES values, one /predict run each; 'unset': the "
                        "backend's default (one per CPU)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per /predict run (at most)")
    parser.add_argument("--megapixels", type=float, default=0.3,
                        help="picture size, 4:3 (0.3 = 640x480, 12 = 4000x3000)")
    parser.add_argument("--model", help="an open_clip architecture (random weights), e.g. "
                        "ViT-B-16; default: a tiny model with a 224 px input (a near-free "
                        "encoder). A real one adds encoder-only img/s to the report")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="DEVICE of the backend (and of the encoder-only measurement)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="PRECISION of the backend; default: its own (auto)")
    parser.add_argument("--encoder-seconds", type=float, default=3.0,
                        help="timed seconds of the encoder-only measurement (a real --model)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="do not apt-get nginx-light when nginx is missing")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the server's main process during each run with py-spy "
                        "(pip install py-spy): DIR/profile-<processes>.txt, frames by samples")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average before: {os.getloadavg()} "
          "(a shared machine: other work skews absolute figures; compare ratios in one run)")
    with tempfile.TemporaryDirectory(prefix="bench-data-plane-") as tmp:
        measure(Path(tmp), cores, args)
    print(f"load average after: {os.getloadavg()}")


def measure(work: Path, cores: int, args: argparse.Namespace) -> None:
    import torch

    from backend.zeroshot.encoder import load_encoder
    from backend.zeroshot.loader import max_batch

    config = work / "tiny-224-clip.json"
    config.write_text(json.dumps(TINY_224))
    model = model_env(args, config)
    width, height = dimensions(args.megapixels)
    drawn = draw_pictures(picture_count(args.megapixels, args.images), (width, height))
    size_kb = sum(map(len, drawn)) / len(drawn) / 1024
    settings = load_settings(**model, MODEL_PRETRAINED="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the limit, and the tiny encoder's own cost: one thread
    encoder = load_encoder(settings)
    sample = [tagged(data, f"limit/{i}") for i, data in enumerate(drawn)]
    wall_rate, work_ms = single_thread_work(settings, encoder, sample, seconds=3.0)
    limit = 1000 / work_ms * cores
    ceiling = None
    if args.model:
        torch.set_num_threads(threads)  # the encoder alone as the backend runs it
        ceiling = encoder_only(encoder, sample, max_batch(settings), args.encoder_seconds)
        describe = encoder.describe()
        print(f"images: {width}x{height} JPEG q{QUALITY}, {size_kb:.0f} KB mean, {len(drawn)} "
              f"different pictures; model: {args.model} ({encoder.input_size} px, random "
              f"weights) on {describe['device']}, {describe['precision']}")
    else:
        encoder_ms = encoder_cpu_ms(encoder)
        print(f"images: {width}x{height} JPEG q{QUALITY}, {size_kb:.0f} KB mean; model: tiny "
              f"open_clip (224 px, random weights) on {args.device.upper()}, {encoder_ms:.2f} "
              "CPU ms/img on one thread (batch 8, uint8 in)")
    print(f"limit: single-thread decode+resize+crop+normalise {work_ms:.2f} CPU ms/img = "
          f"{1000 / work_ms:.1f} img/s on an idle core ({wall_rate:.1f} img/s by the wall clock "
          f"here) x {cores} cores = {limit:.0f} img/s")
    if ceiling:
        print(f"encoder-only: {ceiling.rate:.1f} img/s ({args.model}, batch {ceiling.batch}, "
              f"{ceiling.fed}, embeddings on the CPU out; {ceiling.batches} batches in "
              f"{ceiling.seconds:.1f} s)")
    device = encoder.device
    del encoder  # and its GPU memory: the backend loads its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runs = []
    with ImageServer(work / "images", args.install) as images:
        print(f"image server: {images.kind}; {args.clients} clients x {args.tasks_per_request} "
              f"tasks per request, up to {args.seconds:.0f} s or {args.images} images per run",
              flush=True)
        for label, processes in run_labels(args.processes):
            if processes is None:  # the backend's default, whatever this shell exported
                os.environ.pop("DECODE_PROCESSES", None)
            env = backend_env(model, work / f"state-{label}", processes)
            runs.append(one_run(label, env, images, work, drawn, args))
    report(runs, limit, cores, work_ms)
    if ceiling:
        report_encoder(runs, ceiling, args.device.startswith("cuda"))


if __name__ == "__main__":
    main()
