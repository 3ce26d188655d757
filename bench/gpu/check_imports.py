"""Smoke check before a benchmark on a borrowed machine: does everything the benches run import?

    python bench/gpu/check_imports.py [--device cuda]

Imports every module of `backend` and the test-support and bench modules the benches use, builds
what they build at start (a label interface, the app, open_clip's tokenizer), and reports every
failure at once, with the missing top-level modules named, instead of stopping at the first.
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
    "bench.predict_throughput", "bench.load", "bench.gpu.encoder_sweep",
]
VERSIONS = [
    "torch", "torchvision", "numpy", "pillow", "httpx", "httpcore", "anyio", "h11", "click",
    "typing-extensions", "transformers", "tokenizers", "huggingface-hub", "timm", "safetensors",
    "regex", "tqdm", "pyarrow", "prometheus-client", "lxml", "requests", "uvloop",
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "pydantic-settings",
    "open-clip-torch", "label-studio-sdk", "redis", "rq",
]


def backend_modules() -> list[str]:
    import backend

    names = [f"backend.{m.name}" for m in pkgutil.walk_packages(backend.__path__)
             if m.name != "__main__"]  # __main__ runs the CLI
    import backend.store

    names += [f"backend.store.{m.name}" for m in pkgutil.iter_modules(backend.store.__path__)]
    return sorted(set(names))


def check(label: str, action, failures: list[tuple[str, BaseException]]) -> None:
    try:
        action()
        print(f"  ok    {label}")
    except BaseException as exc:  # noqa: BLE001 - report everything, fail at the end
        failures.append((label, exc))
        print(f"  FAIL  {label}: {type(exc).__name__}: {exc}")


def build_things() -> list[tuple[str, object]]:
    def label_interface() -> None:
        from label_studio_sdk.label_interface.interface import LabelInterface

        from bench.predict_throughput import CONFIG
        LabelInterface(CONFIG)

    def app() -> None:
        from backend.config import load_settings
        from backend.web.app import create_app
        create_app(load_settings(MODEL_NAME="ViT-B-32", MODEL_PRETRAINED="none",
                                 IMAGE_URL_ALLOWLIST="127.0.0.1", LOG_LEVEL="WARNING"))

    def tokenizer() -> None:
        import open_clip
        open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])

    return [("LabelInterface(config)", label_interface), ("create_app(settings)", app),
            ("open_clip tokenizer ViT-B-32", tokenizer)]


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
    origins()
    if args.site.is_dir():
        unmet_requirements(args.site)
    missing = sorted({exc.name.split(".")[0] for _, exc in failures
                      if isinstance(exc, ModuleNotFoundError) and exc.name})
    print(f"smoke check: {len(failures)} failures in {time.perf_counter() - started:.1f} s")
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
