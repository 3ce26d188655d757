"""CPU decode (the decode processes' work) against GPU decode (nvJPEG) on the same JPEGs.

    python bench/gpu/decode_compare.py [--megapixels 0.3 12] [--device cuda] [--batch 64]
                                       [--processes N] [--size 224] [--seconds 3]

Per picture size, on bench/data_plane.py's photo-like JPEGs (quality 90, sensor-like noise):
  CPU  img/s of --processes processes (default: one per CPU), each doing what a decode process
       does to an image once it is fetched and hashed: `decode_image` with Pillow's draft, then
       the model's resize and centre crop (images.steps), to uint8 (S, S, 3) pixels;
  GPU  img/s of images.gpu_decode.decode_batch, --batch images per call, in this one process
       and thread: header checks on the CPU, one nvJPEG batch, resize and crop on the device,
       uint8 (N, 3, S, S) left there. With --device cpu it runs torchvision's libjpeg instead
       (a rehearsal of the script, not a figure to compare).
Neither counts the download or the SHA-256 both paths need. Each figure runs for --seconds
after a warm-up (process start, nvJPEG's first batch). Exit status 1 when a GPU batch sent
an image to the CPU path or failed one (these JPEGs are all plain baseline YCbCr).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.config import load_settings  # noqa: E402
from backend.images.decode import decode_image  # noqa: E402
from backend.images.steps import apply_steps, shortest_side_steps  # noqa: E402
from bench.data_plane import dimensions, draw_pictures, picture_count, tagged  # noqa: E402

START_MARGIN_S = 1.0
"""Time given to every process to receive its images before the timed decodes start together."""


def cpu_decodes(images: list[bytes], size: int, start_at: float, stop_at: float) -> float:
    """In a worker process: decode images in turn from `start_at` to `stop_at` (wall clock,
    shared by the processes); its img/s."""
    settings = load_settings()
    steps = shortest_side_steps(size)
    time.sleep(max(0.0, start_at - time.time()))
    begun, done = time.time(), 0
    while time.time() < stop_at:
        image = decode_image(images[done % len(images)], max_pixels=settings.MAX_IMAGE_PIXELS,
                             draft_size=size, content_type="image/jpeg",
                             max_bytes=settings.MAX_DECODE_BYTES, formats=settings.image_formats)
        apply_steps(image, steps).tobytes()
        done += 1
    return done / (time.time() - begun)


def warm(_: int) -> int:
    """A task that keeps a worker busy long enough for the others to take theirs too."""
    time.sleep(0.3)
    return os.getpid()


def cpu_rate(pool: Any, processes: int, images: list[bytes], size: int,
             seconds: float) -> float:
    """img/s of `processes` processes decoding `images` (each sent once to each) together."""
    start_at = time.time() + START_MARGIN_S
    tasks = [(images, size, start_at, start_at + seconds)] * processes
    return float(sum(pool.starmap(cpu_decodes, tasks, chunksize=1)))


def gpu_rate(images: list[bytes], size: int, batch: int, device: str,
             seconds: float) -> tuple[float, int, int]:
    """(img/s, images sent to the CPU path, images failed) of decode_batch in this thread."""
    import torch

    from backend.images.gpu_decode import decode_batch

    settings = load_settings()
    chunk = [images[i % len(images)] for i in range(batch)]

    def once() -> tuple[int, int]:
        made = decode_batch(chunk, size=size, max_pixels=settings.MAX_IMAGE_PIXELS,
                            max_bytes=settings.MAX_DECODE_BYTES, formats=settings.image_formats,
                            device=device)
        return len(made.on_cpu), len(made.errors)

    for _ in range(2):  # nvJPEG's handles, the allocator
        once()
    sync(device, torch)
    calls, on_cpu, failed, begun = 0, 0, 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - begun < seconds:
        cpu_path, errors = once()
        calls, on_cpu, failed = calls + 1, on_cpu + cpu_path, failed + errors
    sync(device, torch)
    return batch * calls / (time.perf_counter() - begun), on_cpu, failed


def sync(device: str, torch: Any) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def describe(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"nvJPEG on {torch.cuda.get_device_name()}"
    return "torchvision libjpeg on the CPU (a rehearsal: no GPU here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[0.3, 12.0])
    parser.add_argument("--device", default="cuda", help="where decode_batch decodes: cuda, cpu")
    parser.add_argument("--batch", type=int, default=64, help="images per decode_batch call")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU decode processes (default: one per CPU)")
    parser.add_argument("--size", type=int, default=224, help="the model's input side")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure")
    args = parser.parse_args()
    print(f"decode compare: CPU {args.processes} processes vs GPU path {describe(args.device)}, "
          f"batch {args.batch}, to {args.size} px, {args.seconds:.1f} s per figure", flush=True)
    context = multiprocessing.get_context("spawn")  # as the plane starts its processes
    problems = 0
    with context.Pool(args.processes) as pool:
        pool.map(warm, range(args.processes), chunksize=1)
        for megapixels in args.megapixels:
            width, height = dimensions(megapixels)
            count = picture_count(megapixels, args.batch)
            drawn = draw_pictures(count, (width, height))
            images = [tagged(drawn[i % count], f"decode/{i}") for i in range(args.batch)]
            size_kb = sum(map(len, images)) / len(images) / 1024
            cpu = cpu_rate(pool, args.processes, drawn, args.size, args.seconds)
            gpu, on_cpu, failed = gpu_rate(images, args.size, args.batch, args.device,
                                           args.seconds)
            problems += on_cpu + failed
            print(f"decode {megapixels:g} MP ({width}x{height} JPEG, {size_kb:,.0f} KB): CPU "
                  f"{args.processes} processes {cpu:,.1f} img/s ({cpu / args.processes:,.1f} "
                  f"per process) | GPU path {args.device} batch {args.batch} {gpu:,.1f} img/s = "
                  f"{gpu / cpu:.2f} x CPU ({on_cpu} images on the CPU path, {failed} failed)",
                  flush=True)
    if args.device.startswith("cuda"):
        import torch

        print(f"decode compare: peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
