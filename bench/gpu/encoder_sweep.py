"""Absolute encoder throughput (images/s) per model and batch size, on one device.

    python bench/gpu/encoder_sweep.py [--models ViT-B-32 ViT-L-14] [--batches 1 8 64 256]
                                      [--device cuda] [--seconds 1.5]

Times the backend's own `encode_images` (the "encoder" figure of bench/predict_throughput.py):
preprocessed float tensors on the CPU in, L2-normalised float32 embeddings on the CPU out, so
the host-to-device copy and the wait for the result are counted, with the backend's precision
(PRECISION=auto: bf16 autocast on a GPU). Weights are random (MODEL_PRETRAINED=none): the same
FLOPs as the real ones, no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def sweep(model_name: str, batches: list[int], device: str, seconds: float) -> None:
    import torch

    from backend.config import load_settings
    from backend.zeroshot.encoder import load_encoder

    started = time.perf_counter()
    encoder = load_encoder(load_settings(MODEL_NAME=model_name, MODEL_PRETRAINED="none",
                                         DEVICE=device, LOG_LEVEL="WARNING"))
    size = encoder.input_size
    print(f"{model_name}: loaded in {time.perf_counter() - started:.1f} s, input {size}px, "
          f"{encoder.describe()['device']}, {encoder.describe()['precision']}", flush=True)
    pixels = torch.randn(max(batches), 3, size, size)
    for batch in batches:
        chunk = pixels[:batch]
        for _ in range(3):  # warm-up: kernel selection, allocator
            encoder.encode_images(chunk)
        calls, begun = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - begun < seconds:
            encoder.encode_images(chunk)
            calls += 1
        elapsed = time.perf_counter() - begun
        print(f"  {model_name:<10} batch {batch:>4}: {batch * calls / elapsed:9.1f} img/s "
              f"({elapsed / calls * 1000:8.2f} ms/batch, {calls} batches)", flush=True)
    if encoder.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(encoder.device) / 2**30
        print(f"  {model_name:<10} peak GPU memory {peak:.1f} GiB", flush=True)
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"))
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="timed seconds per batch size (at least 3 batches)")
    args = parser.parse_args()
    import torch

    print(f"encoder-only sweep: device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    for model_name in args.models:
        sweep(model_name, args.batches, args.device, args.seconds)


if __name__ == "__main__":
    main()
