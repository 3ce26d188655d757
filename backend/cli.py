"""Command line: `python -m backend <command>` (or the `clip-backend` script).

    serve     start the ML backend server (port 9090 by default)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import Settings, load_settings
from .errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.LOG_LEVEL, format=LOG_FORMAT)
    result: int = args.run(settings, args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="start the ML backend server")
    serve.add_argument("--host", help="listen address (default: HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 9090)")
    serve.add_argument("--workers", type=int, help="server processes (default: WORKERS or 1)")
    serve.set_defaults(run=_serve)
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    workers = args.workers or settings.WORKERS
    uvicorn.run(
        "backend.server:create_app",
        factory=True,
        host=args.host or settings.HOST,
        port=args.port or settings.PORT,
        workers=workers,
        log_level=settings.LOG_LEVEL.lower(),
        timeout_graceful_shutdown=60,
    )
    return 0
