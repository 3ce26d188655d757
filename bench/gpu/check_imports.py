"""Smoke check before a benchmark on a borrowed machine: does everything the benches run import?

    python bench/gpu/check_imports.py [--device cuda]

Imports every module of `backend` (subpackages included: the data plane's images.plane,
images.plane_process, images.gpu_decode, ...) and the test-support, test and bench modules the
run uses, builds what they build at start (a label interface, the app, open_clip's tokenizer, an
aiohttp session), and reports every failure at once, with the missing top-level modules named,
instead of stopping at the first. A batched JPEG decode on the device (nvJPEG on cuda) is tried
too; its failure is a warning, not a failure: only the decode comparison and its tests need it.
Also prints where each third-party package comes from (the carried wheels or the machine's own)
and which requirements of the carried wheels the machine does not meet (a warning: many are
extras-only or harmless). Exit status 1 when anything failed to import or build.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

EXTRA_MODULES = [
    "tests.support.backend_server", "tests.support.http_server", "tests.support.backend_process",
    "tests.support.tiny_models", "tests.support.webhooks", "tests.support.redis_server",
    "tests.support.microclip", "tests.images.test_gpu_decode", "pytest", "pytest_timeout",
    "bench.predict_throughput", "bench.load", "bench.data_plane", "bench.gpu.encoder_sweep",
    "bench.gpu.decode_compare", "torchvision.io", "torchvision.transforms.v2.functional",
]
VERSIONS = [
    "torch", "torchvision", "numpy", "pillow", "httpx", "httpcore", "anyio", "h11", "click",
    "typing-extensions", "transformers", "tokenizers", "huggingface-hub", "timm", "safetensors",
    "regex", "tqdm", "pyarrow", "prometheus-client", "lxml", "requests", "uvloop",
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "pydantic-settings",
    "open-clip-torch", "label-studio-sdk", "redis", "rq",
    "aiohttp", "aiohappyeyeballs", "aiosignal", "frozenlist", "multidict", "propcache", "yarl",
    "attrs", "idna", "pytest", "pluggy", "iniconfig", "pygments", "packaging", "pytest-timeout",
]


def backend_modules() -> list[str]:
    import backend

    # walking imports each subpackage to find its modules: one that fails to import is listed
    # (and reported when imported below), its modules are not
    names = [m.name for m in pkgutil.walk_packages(backend.__path__, prefix="backend.",
                                                   onerror=lambda name: None)
             if m.name != "backend.__main__"]  # __main__ runs the CLI
    return sorted(set(names))


def check(label: str, action, failures: list[tuple[str, BaseException]],
          word: str = "FAIL") -> None:
    try:
        action()
        print(f"  ok    {label}")
    except BaseException as exc:  # noqa: BLE001 - report everything, fail at the end
        failures.append((label, exc))
        print(f"  {word:<4}  {label}: {type(exc).__name__}: {exc}")


def build_things() -> list[tuple[str, object]]:
    def label_interface() -> None:
        from label_studio_sdk.label_interface.interface import LabelInterface

        from bench.predict_throughput import CONFIG
        LabelInterface(CONFIG)

    def app() -> None:
        import tempfile

        from backend.config import load_settings
        from backend.web.app import create_app
        with tempfile.TemporaryDirectory(prefix="smoke-model-dir-") as state:
            create_app(load_settings(MODEL_NAME="ViT-B-32", MODEL_PRETRAINED="none",
                                     MODEL_DIR=state, IMAGE_URL_ALLOWLIST="127.0.0.1",
                                     LOG_LEVEL="WARNING"))

    def tokenizer() -> None:
        import open_clip
        open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])

    def fetcher() -> None:
        import asyncio

        from backend.config import load_settings
        from backend.images.fetch import ImageFetcher
        from tests.support.http_server import LoopbackServer, Route

        async def get(url: str) -> bytes:
            fetcher = ImageFetcher(load_settings(IMAGE_URL_ALLOWLIST="127.0.0.1"))
            try:
                return (await fetcher.fetch(url)).data
            finally:
                await fetcher.aclose()

        with LoopbackServer() as server:
            url = server.add("/smoke.jpg", Route(b"\xff\xd8 smoke", content_type="image/jpeg"))
            if asyncio.run(get(url)) != b"\xff\xd8 smoke":
                raise RuntimeError("fetched other bytes")

    return [("LabelInterface(config)", label_interface), ("create_app(settings)", app),
            ("open_clip tokenizer ViT-B-32", tokenizer),
            ("ImageFetcher.fetch over loopback (aiohttp)", fetcher)]


def gpu_decode(device: str) -> None:
    """images.gpu_decode.decode_batch of two small JPEGs on `device`, on its batched path."""
    import io

    from PIL import Image

    from backend.images.gpu_decode import decode_batch

    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 120, 40)).save(buffer, "JPEG", quality=90)
    made = decode_batch([buffer.getvalue()] * 2, size=224, max_pixels=10**8, device=device)
    if made.errors or made.on_cpu or tuple(made.pixels.shape) != (2, 3, 224, 224):
        raise RuntimeError(f"errors {made.errors}, on the CPU path {sorted(made.on_cpu)}, "
                           f"shape {tuple(made.pixels.shape)}")


def origins() -> None:
    print("packages (version, from):")
    for name in VERSIONS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            print(f"  {name:<20} -")
            continue
        where = str(dist.locate_file(""))
        print(f"  {name:<20} {dist.version:<16} {where}")


def unmet(owner: str, requirements: list[str]) -> list[str]:
    """The requirements (PEP 508 strings) that the environment does not satisfy."""
    from packaging.requirements import Requirement

    found = []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            found.append(f"{owner} needs {req} (absent)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            found.append(f"{owner} needs {req} (have {have})")
    return found


def unmet_requirements(site: Path) -> None:
    """Warnings: the project's dependencies (pyproject.toml) and the carried wheels'
    requirements that this environment does not satisfy."""
    try:
        import packaging.requirements  # noqa: F401
        import tomllib
    except ImportError:
        print("  (tomllib or packaging missing: requirement check skipped)")
        return
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    own = unmet("pyproject.toml", project)
    print(f"project dependencies not met here: {len(own)}")
    for line in own:
        print(f"  warning: {line}")
    carried = list(md.distributions(path=[str(site)]))
    theirs = [line for dist in carried
              for line in unmet(dist.metadata["Name"], dist.requires or [])]
    print(f"carried wheels in {site}: {len(carried)}; their requirements not met here: "
          f"{len(theirs)} (what matters is that the imports above work)")
    for line in sorted(theirs):
        print(f"  warning: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cuda: also require a usable GPU")
    parser.add_argument("--site", type=Path, default=Path(os.environ.get("SITE", "/tmp/site")),
                        help="where the carried wheels were installed")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    failures: list[tuple[str, BaseException]] = []
    print("imports:")
    modules = []
    check("backend (package)", lambda: modules.extend(backend_modules()), failures)
    for name in [*modules, *EXTRA_MODULES]:
        check(name, lambda name=name: importlib.import_module(name), failures)
    print("built at start:")
    for label, action in build_things():
        check(label, action, failures)
    if args.device.startswith("cuda"):
        def gpu() -> None:
            import torch
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False")
            x = torch.ones(256, 256, device=args.device)
            float((x @ x).sum().item())
            print(f"        {torch.cuda.get_device_name()} (capability "
                  f"{torch.cuda.get_device_capability()}), torch {torch.__version__}, "
                  f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
        check(f"a matrix product on {args.device}", gpu, failures)
    warnings: list[tuple[str, BaseException]] = []
    check(f"decode_batch on {args.device} (a warning only)", lambda: gpu_decode(args.device),
          warnings, "WARN")
    origins()
    if args.site.is_dir():
        unmet_requirements(args.site)
    missing = sorted({exc.name.split(".")[0] for _, exc in failures
                      if isinstance(exc, ModuleNotFoundError) and exc.name})
    print(f"smoke check: {len(failures)} failures, {len(warnings)} warnings in "
          f"{time.perf_counter() - started:.1f} s")
    if failures:
        if missing:
            print("MISSING top-level modules (add their wheels to bench/gpu/fetch_wheels.sh): "
                  + ", ".join(missing))
        label, exc = failures[0]
        print(f"first failure ({label}):")
        traceback.print_exception(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
