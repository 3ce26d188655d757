"""End-to-end /predict throughput as a ratio of the encoder's own, measured in one run.

    python bench/predict_throughput.py [--model ViT-B-32] [--images 32] [--megapixels 0.3 12]
                                       [--device auto|cpu|cuda] [--precision auto|bf16|…]

For each image size it measures, on the same model and batch size:
  encoder   images/s of `encode_images` on already-preprocessed tensors (the ceiling);
  backend   images/s of the real /predict over loopback HTTP (download, decode, preprocess,
            batched encode, score, format), text embeddings already cached;
  naive     images/s of a loop in the style of the official examples: sequential download,
            full decode, one image per forward pass in FP32, label prompts encoded per request;
  rescore   images/s of /predict over every image of that size embedded so far (the project),
            with a label added (so its prompt is encoded once, as after a real label change):
            the embeddings come from the store, and no image is downloaded within
            IMAGE_REF_TTL_S; the downloads and encodes it caused are printed.
Each run uses new images (new bytes), so "backend" always encodes: the embedding cache would
otherwise turn every run after the first into a re-score.
Weights are random (same FLOPs as the real ones); no network is needed.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import load_settings  # noqa: E402
from backend.web.app import create_app  # noqa: E402
from tests.support.backend_server import BackendThread  # noqa: E402
from tests.support.http_server import LoopbackServer, Route  # noqa: E402

LABELS = ["cat", "dog", "car", "tree", "house", "person", "bicycle", "boat"]
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          + "".join(f'<Choice value="{label}"/>' for label in LABELS) + "</Choices></View>")


def rescore_config(new_label: str) -> str:
    """The project's config after a label is added."""
    last = '<Choice value="boat"/>'
    return CONFIG.replace(last, f'{last}<Choice value="{new_label}"/>')


def photo_like_jpeg(megapixels: float, seed: int) -> bytes:
    """Smooth gradients and shapes: compresses like a photo, unlike noise."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    buffer = io.BytesIO()
    photo_like(width, height, np.random.default_rng(seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A horizontal colour gradient under 12 filled circles, drawn from `rng`."""
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    base = (rng.uniform(40, 200, 3) * (0.6 + 0.4 * ramp)).astype(np.float32)
    image = Image.fromarray(np.broadcast_to(base, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 20, width // 5))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image


def encoder_only(model, images: list[bytes], batch: int) -> float:
    from backend.images.decode import decode_image

    encoder = model.encoder
    decoded = [decode_image(data, max_pixels=10**9) for data in images]
    pixels = torch.stack([encoder.preprocess(image) for image in decoded])
    synchronise(encoder.device)
    started = time.perf_counter()
    for start in range(0, len(pixels), batch):
        encoder.encode_images(pixels[start:start + batch])
    synchronise(encoder.device)
    return len(images) / (time.perf_counter() - started)


def synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_predict(url: str, urls: list[str], config: str = CONFIG) -> float:
    tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]
    started = time.perf_counter()
    body = {"tasks": tasks, "label_config": config}
    response = httpx.post(url + "/predict", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    assert all("result" in r for r in response.json()["results"]), response.text[:500]
    return len(urls) / elapsed


def naive_loop(naive, urls: list[str]) -> float:
    """`naive`: (model in FP32, its preprocess, tokenizer, device), as the examples load it."""
    model, preprocess, tokenizer, device = naive
    started = time.perf_counter()
    with torch.inference_mode():
        texts = [f"a photo of a {label}." for label in LABELS]
        text = model.encode_text(tokenizer(texts).to(device), normalize=True)  # per request
        for url in urls:
            data = httpx.get(url, timeout=60).content
            image = Image.open(io.BytesIO(data)).convert("RGB")
            features = model.encode_image(preprocess(image)[None].to(device), normalize=True)
            (100 * features @ text.T).softmax(dim=-1).cpu()
    return len(urls) / (time.perf_counter() - started)


def naive_model(encoder) -> tuple:
    """The backend's model as the examples run it: FP32, whatever PRECISION the backend uses."""
    model = copy.deepcopy(encoder.model).float()
    return model, encoder.preprocess, encoder.tokenizer, encoder.device


def counted() -> tuple[float, float]:
    """Images downloaded and images encoded, so far."""
    from backend import metrics

    return metrics.IMAGES_FETCHED._value.get(), metrics.IMAGES_ENCODED._value.get()


def one_run(url: str, server: LoopbackServer, model, naive, project: list[str],
            megapixels: float, run: int, args: argparse.Namespace) -> tuple[float, ...]:
    """(encoder, backend, naive, rescore img/s, images downloaded and encoded while
    re-scoring, images re-scored, KB/image). `project` gains this run's image URLs."""
    images = [photo_like_jpeg(megapixels, run * 1_000 + seed) for seed in range(args.images)]
    urls = [server.add(f"/{megapixels}/{run}/{i}.jpg", Route(data, content_type="image/jpeg"))
            for i, data in enumerate(images)]
    # on the inference thread: at the backend's own CPU priority (batching.BACKGROUND_NICE)
    ceiling = model.inference.submit(encoder_only, model, images, args.batch).result()
    served = backend_predict(url, urls)
    project += urls
    before = counted()
    rescore = backend_predict(url, project, rescore_config(f"bus {megapixels} {run}"))
    fetched, encoded = (after - then for after, then in zip(counted(), before))
    naive = model.inference.submit(naive_loop, naive, urls).result()
    return (ceiling, served, naive, rescore, fetched, encoded, len(project),
            sum(map(len, images)) / len(images) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[0.3, 12.0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto", help="DEVICE setting: auto, cpu, cuda, …")
    parser.add_argument("--precision", default="auto", help="PRECISION setting: auto, bf16, …")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians shown")
    args = parser.parse_args()
    settings = load_settings(MODEL_NAME=args.model, MODEL_PRETRAINED="none", BATCH_SIZE=args.batch,
                             DEVICE=args.device, PRECISION=args.precision,
                             IMAGE_URL_ALLOWLIST="127.0.0.1",
                             TEMPLATES="photo", LOG_LEVEL="WARNING")
    with BackendThread(create_app(settings)) as backend, LoopbackServer() as server:
        backend.wait_model()
        model = backend.app.state.backend
        naive = naive_model(model.encoder)
        print(f"model {args.model} (random weights) on {model.encoder.device}, "
              f"{model.encoder.describe()['precision']}, batch {args.batch}, torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")
        for megapixels in args.megapixels:
            measure_size(backend.url, server, model, naive, megapixels, args)


def measure_size(url: str, server: LoopbackServer, model, naive, megapixels: float,
                 args: argparse.Namespace) -> None:
    warm = [server.add(f"/warm/{megapixels}/{i}.jpg", Route(
        photo_like_jpeg(megapixels, 10_000 + i), content_type="image/jpeg")) for i in range(16)]
    backend_predict(url, warm)  # warm-up: first forward passes are slow
    project = list(warm)
    runs = [one_run(url, server, model, naive, project, megapixels, run, args)
            for run in range(args.repeat)]
    ceiling, served, naive, rescore, fetched, encoded, rescored, size_kb = (
        float(np.median(c)) for c in zip(*runs))
    print(f"{megapixels:>5} MP ({size_kb:,.0f} KB/image): encoder {ceiling:6.1f} img/s | "
          f"backend {served:6.1f} img/s = {served / ceiling:.2f} x encoder | "
          f"naive {naive:6.1f} img/s -> backend = {served / naive:.2f} x naive | "
          f"rescore of {rescored:.0f} images {rescore:6.1f} img/s = {rescore / served:.1f} x "
          f"first pass, {fetched:.0f} downloads, {encoded:.0f} encodes")


if __name__ == "__main__":
    main()
