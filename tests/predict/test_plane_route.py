"""The embed phase through the data plane (DECODE_PROCESSES ≥ 1: decode processes, uint8
pixels) and through the in-process path (DECODE_PROCESSES=0: decode threads, float tensors)
give the same predictions and embeddings for the same images, served over loopback HTTP."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.config import Settings, load_settings
from backend.predict.embed import Embedded
from backend.runtime import Backend
from backend.zeroshot.encoder import load_encoder

from ..support.http_server import Route

CLASSES = ["red", "green", "blue", "black", "white"]
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")


def image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def checkpoint(settings: Settings, path: Path) -> Path:
    """The tiny model's random weights, saved: both backends load the very same ones."""
    torch.save(load_encoder(settings).model.state_dict(), path)
    return path


def embed(settings: Settings, tasks: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    model = Backend(settings)

    async def run() -> tuple[list[Any], list[Any]]:
        model.start()
        try:
            await model.wait_ready()
            ctx = await model.context(CONFIG)
            found = await model.embedder.embed_tasks(tasks, ctx.parsed.spaces, None)
            results = await model.predict(tasks, label_config=CONFIG)
            used = model.embedder._plane is not None and model.embedder._plane.alive > 0
            assert used == bool(settings.DECODE_PROCESSES), "the route under test was not taken"
            return [found[task["data"]["image"]] for task in tasks], results
        finally:
            await model.aclose()

    return asyncio.run(run())


def test_the_plane_and_the_in_process_path_agree(tiny_configs, tmp_path, loopback):
    base = load_settings(MODEL_CONFIG=tiny_configs["clip"], MODEL_PRETRAINED="none")
    weights = checkpoint(base, tmp_path / "tiny.pt")
    urls = [loopback.add(f"/{i}.{fmt.lower()}", Route(image_bytes(i, fmt)))
            for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG", "PNG", "JPEG"])]
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls)]
    outcomes = {}
    for processes in (0, 1):
        settings = base.model_copy(update={"MODEL_PRETRAINED": str(weights),
                                           "MODEL_DIR": tmp_path / f"p{processes}",
                                           "DECODE_PROCESSES": processes})
        outcomes[processes] = embed(settings, tasks)
    (threads, threaded), (plane, planed) = outcomes[0], outcomes[1]
    for a, b in zip(threads, plane):
        assert isinstance(a, Embedded) and isinstance(b, Embedded)
        assert a.key == b.key
        torch.testing.assert_close(a.vector, b.vector, atol=1e-6, rtol=0)
    top1 = [[r["result"][0]["value"]["choices"] for r in results] for results in (threaded, planed)]
    assert top1[0] == top1[1]
