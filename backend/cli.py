"""Command line: `python -m backend <command>` (or the `clip-backend` script).

    serve                start the ML backend server (port 9090 by default)
    doctor               check settings, store, Label Studio, device and model
    export corrections   write the corrections dataset (JSONL, CSV or Parquet)
    export summary       print the model-vs-human summary (JSON)
    heads list           a project's adapted heads and their held-out numbers
    heads activate       roll a project back (or forward) to a head, or to zero-shot
    report               write an HTML report of a project's heads (reliability, learning curve)
    export selection     tasks to label next (uncertainty, coreset, cold start, …)
    export review        tasks to check: likely label errors, disagreements, low confidence
    export dead-letters  spooled entries the store could never apply, with why (JSONL)
    replay dead-letters  apply (fixed) dead letters to the store; the applied ones leave the file
    prelabel             pre-label a whole Label Studio project (resumable, with progress)
    worker               work pre-label jobs from Redis (RQ); loads the model once

Exit status: 0 done, 1 the store failed (unreachable, I/O), 2 bad arguments or settings
(doctor: 1 if any check failed;
replay dead-letters: 2 if some still cannot be applied).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapt.registry import HeadRegistry
from .adapt.report import render
from .config import Settings, load_settings
from .corrections.dead_letters import DeadLetters, read_letters, replay
from .corrections.export import correction_rows, export_corrections
from .corrections.summary import summary
from .errors import (
    ConfigError,
    ExportError,
    HeadNotFound,
    JobRunning,
    LabelConfigError,
    LabelStudioError,
    ModelUnavailable,
    ReviewError,
    StoreUnavailable,
)
from .formats import jsonl_chunks
from .logs import configure_logging, logging_config
from .review.queues import FORMATS, write
from .review.selection import STRATEGIES
from .store import Store, open_store
from .web.middleware import OPEN_ROUTES_FIX, exposure

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)
KEEP_ALIVE_S = 75
MAX_HEADER_BYTES = 16 * 1024
"""Request line and headers one connection may send before uvicorn (h11) refuses it."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.command == "doctor":  # it reports invalid settings itself, as a failed check
        return _doctor(args)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
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
    _export_parser(commands.add_parser("export", help="export the corrections log"))
    _heads_parser(commands.add_parser("heads", help="list or activate adapted heads"))
    report = commands.add_parser("report", help="HTML report of a project's adapted heads")
    report.add_argument("--project", metavar="ID", required=True)
    report.add_argument("--output", "-o", type=Path, metavar="FILE",
                        default=Path("adaptation-report.html"))
    report.set_defaults(run=_store_command, export=_write_report)
    _prelabel_parsers(commands)
    _replay_parser(commands.add_parser("replay", help="apply dead letters (fixed) to the store"))
    _doctor_parser(commands.add_parser("doctor", help="check the deployment: settings, store, "
                                       "Label Studio, device, model"))
    return parser


def _heads_parser(heads: argparse.ArgumentParser) -> None:
    kinds = heads.add_subparsers(dest="kind", required=True, metavar="{list,activate}")
    listing = kinds.add_parser("list", help="a project's heads as JSON (newest last)")
    listing.set_defaults(run=_store_command, export=_list_heads)
    activate = kinds.add_parser("activate", help="serve this head (h1, h2, …) or zero-shot")
    activate.add_argument("head", metavar="HEAD", help="a head id from `heads list`, or zero-shot")
    activate.set_defaults(run=_store_command, export=_activate_head)
    for command in (listing, activate):
        command.add_argument("--project", metavar="ID", required=True)


def _export_parser(export: argparse.ArgumentParser) -> None:
    kinds = export.add_subparsers(dest="kind", required=True,
                                  metavar="{corrections,summary,selection,review,dead-letters}")
    rows = kinds.add_parser("corrections", help="the corrections dataset, one row per "
                            "annotation and control")
    rows.add_argument("--format", choices=("jsonl", "csv", "parquet"),
                      help="default: from --output's suffix (.csv, .parquet), else jsonl")
    rows.add_argument("--output", "-o", type=Path, metavar="FILE",
                      help="file to write (default: stdout; required for parquet)")
    rows.add_argument("--only-changed", action="store_true",
                      help="only controls the annotator changed, added or removed")
    rows.add_argument("--include-deleted", action="store_true",
                      help="include annotations deleted in Label Studio")
    rows.add_argument("--embeddings", action="store_true",
                      help="add image embeddings (parquet column, or a .npy next to --output)")
    rows.set_defaults(run=_store_command, export=_write_corrections)
    summary = kinds.add_parser("summary", help="model-vs-human summary as JSON")
    summary.set_defaults(run=_store_command, export=_print_summary)
    _review_parsers(kinds)
    dead = kinds.add_parser("dead-letters", help="spooled entries the store could never apply, "
                            "each with why: fix `entry`, then `replay dead-letters --input`")
    dead.add_argument("--output", "-o", type=Path, metavar="FILE", help="default: stdout")
    dead.set_defaults(run=_export_dead_letters)
    for command in (rows, summary):
        command.add_argument("--project", metavar="ID",
                             help="Label Studio project id (default: all)")
        command.add_argument("--since", metavar="WHEN",
                             help="annotations updated since: ISO 8601 date/time (UTC unless "
                             "it says) or epoch seconds")


def _review_parsers(kinds: Any) -> None:
    pick = kinds.add_parser("selection", help="tasks to label next (loads the model)")
    pick.add_argument("--strategy", default="uncertainty", choices=STRATEGIES)
    pick.add_argument("--budget", type=int, default=50)
    pick.add_argument("--seed", type=int, default=0)
    pick.add_argument("--uncertainty", default="margin",
                      choices=("margin", "entropy", "least_confidence"))
    pick.add_argument("--random-fraction", type=float, default=0.1,
                      help="share of the budget picked at random, for honest evaluation")
    check = kinds.add_parser("review", help="tasks a human should check (loads the model)")
    check.add_argument("--target-precision", type=float, default=0.95)
    for command in (pick, check):
        command.add_argument("--project", metavar="ID", required=True)
        command.add_argument("--label-config", type=Path, metavar="XML", required=True,
                             help="the project's label config (Settings → Labeling Interface "
                             "→ Code)")
        command.add_argument("--control", help="control name (default: the first one)")
        command.add_argument("--format", choices=FORMATS, default="jsonl",
                             help="labelstudio: tasks to import, with al_* fields to sort by")
        command.add_argument("--output", "-o", type=Path, metavar="FILE",
                             help="default: stdout")
        command.set_defaults(run=_review_command)


def _review_command(settings: Settings, args: argparse.Namespace) -> int:
    params = ({"strategy": args.strategy, "budget": args.budget, "seed": args.seed,
               "uncertainty": args.uncertainty, "random_fraction": args.random_fraction}
              if args.kind == "selection" else {"target_precision": args.target_precision})
    try:
        config = args.label_config.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot read --label-config: {exc}", file=sys.stderr)
        return 2
    try:
        rows, header, data_key = asyncio.run(_review_rows(settings, args, config, params))
        body = b"".join(write(rows, header, args.format, args.kind, data_key))
        if args.output:
            args.output.write_bytes(body)
        else:
            sys.stdout.write(body.decode())
    except (ConfigError, ReviewError, LabelConfigError, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(rows)} rows ({args.kind}) for project {args.project}", file=sys.stderr)
    return 0


async def _review_rows(settings: Settings, args: argparse.Namespace, config: str,
                       params: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    from .labelstudio.client import ProjectId, project_key
    from .runtime import Backend

    backend = Backend(settings, store=_existing_store(settings))
    backend.start()
    try:
        project = project_key(args.project) or ProjectId(args.project)
        return await backend.review_export(args.kind, project, label_config=config,
                                           control=args.control, **params)
    finally:
        await backend.aclose()


def _prelabel_parsers(commands: Any) -> None:
    job = commands.add_parser("prelabel", help="pre-label a whole Label Studio project: reads "
                              "its tasks page by page, writes predictions through its API; a "
                              "second run only does what is missing")
    job.add_argument("--project", metavar="ID", required=True)
    job.add_argument("--executor", choices=("local", "rq"), default="local",
                     help="local: predict in this process (default); rq: queue work items for "
                     "`python -m backend worker` processes (needs REDIS_URL)")
    job.add_argument("--no-wait", action="store_true",
                     help="rq: return once every item is queued, without following the workers")
    job.set_defaults(run=_prelabel)
    worker = commands.add_parser("worker", help="work pre-label jobs from Redis (RQ), loading "
                                 "the model once")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(run=_worker)


def _prelabel(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bar = tqdm(unit="task", file=sys.stderr, desc=f"project {args.project}", dynamic_ncols=True)

    def show(state: dict[str, Any]) -> None:
        bar.total = state["total"] or None
        bar.n = state["done"] + state["failed"]
        bar.set_postfix(failed=state["failed"], status=state["status"], refresh=False)
        bar.refresh()

    try:
        final = asyncio.run(_run_prelabel(settings, args, show))
    except (ConfigError, LabelConfigError, LabelStudioError, ModelUnavailable,
            JobRunning) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    print(json.dumps(final, indent=2, ensure_ascii=False))
    return 0 if final["status"] in ("done", "running") and not final["failed"] else 1


async def _run_prelabel(settings: Settings, args: argparse.Namespace,
                        show: Any) -> dict[str, Any]:
    from .jobs.prelabel import Prelabeler
    from .runtime import Backend
    from .store.jobs import open_ledger

    backend = Backend(settings)
    backend.start()
    try:
        jobs = Prelabeler(backend, open_ledger(backend.store), settings)
        return await jobs.run(args.project, args.executor, on_progress=show,
                              wait_workers=not args.no_wait)
    finally:
        await backend.aclose()


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from .jobs import rq
    from .runtime import Backend

    try:
        return rq.serve(settings, Backend, burst=args.burst)
    except (ConfigError, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _replay_parser(replay: argparse.ArgumentParser) -> None:
    replay.add_argument("what", choices=["dead-letters"])
    replay.add_argument("--input", "-i", type=Path, metavar="FILE",
                        help="dead letters to apply, e.g. an edited `export dead-letters` "
                        "(default: MODEL_DIR/spool/dead-letters.jsonl itself)")
    replay.set_defaults(run=_store_command, export=_replay_dead_letters)


def _dead_letters(settings: Settings) -> DeadLetters:
    return DeadLetters(settings.MODEL_DIR / "spool")


def _export_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    letters = _dead_letters(settings).read()
    body = b"".join(jsonl_chunks(letters))
    if args.output:
        args.output.write_bytes(body)
    else:
        sys.stdout.write(body.decode())
    print(f"{len(letters)} dead letters", file=sys.stderr)
    return 0


def _replay_dead_letters(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    letters = _dead_letters(settings)
    try:
        done = replay(store, read_letters(args.input) if args.input else letters.read())
    except ValueError as exc:  # the input file is not dead letters
        raise ExportError(str(exc)) from None
    removed = letters.remove(done.keys)
    for reason in done.failed:
        print(f"not applied: {reason}", file=sys.stderr)
    print(f"applied {done.applied} dead letters ({done.already} were applied before), "
          f"{len(done.failed)} failed; {removed} removed from {letters.path}", file=sys.stderr)
    if done.failed:
        raise ExportError(f"{len(done.failed)} dead letters still cannot be applied: fix their "
                          "`entry` as the reasons above say and replay them again")


def _doctor_parser(doctor: argparse.ArgumentParser) -> None:
    doctor.add_argument("--skip-model", action="store_true",
                        help="do not load the model (it may download weights and take minutes)")


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    return doctor.run(sys.stdout, skip_model=args.skip_model)


def _stopped(signum: int, frame: object) -> None:
    """SIGTERM before uvicorn took it over, or re-raised by uvicorn after its graceful shutdown
    (the store and model are closed by then): exit 0 now. The interpreter's own teardown
    (collecting torch's objects) would take seconds more, past `docker stop`'s patience."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    unwritable = _unwritable(settings)
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 2
    workers = args.workers or settings.WORKERS
    host, port = args.host or settings.HOST, args.port or settings.PORT
    warn_if_open(settings, host, port)
    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is over (in-flight
    # requests answered, model.aclose() done): that ends a planned stop with status 0, not as
    # "killed by SIGTERM". Before uvicorn takes the signal over, it stops start-up the same way.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        "backend.web.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.LOG_LEVEL.lower(),
        log_config=logging_config(settings),
        timeout_graceful_shutdown=60,
        # longer than the Retry-After of a shed request, so the retry finds its connection open
        timeout_keep_alive=KEEP_ALIVE_S,
        # bodies have REQUEST_BODY_TIMEOUT_S (middleware.BodyDeadline); headers a size cap
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return 0


def warn_if_open(settings: Settings, host: str, port: int) -> None:
    """Say loudly, before serving, when every route is open to whoever reaches the port."""
    warning = exposure(settings, host, port)
    if warning:
        log.warning("%s. Fix: %s.", warning, OPEN_ROUTES_FIX)


def _unwritable(settings: Settings) -> str | None:
    """Why serve could not write its state or weights cache, naming the fix; None if it can.

    The usual cause: a host directory owned by root bind-mounted at the image's /data, which
    runs as uid 10001."""
    for name in ("MODEL_DIR", "MODEL_CACHE_DIR"):
        path: Path | None = getattr(settings, name)
        if path is None:
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            return (f"{name} {path} is not writable by this process (uid {os.getuid()}, gid "
                    f"{os.getgid()}): {exc.strerror or exc}. Make it writable for that user "
                    "(Docker image: `chown -R 10001:10001 <host directory>` for a directory "
                    f"mounted at /data), or set {name} to a writable directory")
    return None


def _store_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run `args.export` against the backend's existing store."""
    try:
        store = _existing_store(settings)
        try:
            args.export(store, settings, args)
        finally:
            store.close()
    except (ConfigError, ExportError, HeadNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _existing_store(settings: Settings) -> Store:
    """The backend's store; never a new, empty one created by mistake."""
    path = settings.MODEL_DIR / "store.sqlite3"
    if not settings.REDIS_URL and not path.is_file():
        raise ConfigError(f"no corrections store at {path}: set MODEL_DIR to the backend's "
                          "MODEL_DIR, or REDIS_URL to its Redis")
    store = open_store(settings)
    store.ping()
    return store


def _write_corrections(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    fmt = args.format or {".csv": "csv", ".parquet": "parquet"}.get(
        args.output.suffix.lower() if args.output else "", "jsonl")
    if fmt == "parquet" and args.output is None:
        raise ExportError("--format parquet needs --output FILE (Parquet is not streamed)")
    try:
        stats = export_corrections(
            store, args.output or sys.stdout.buffer, fmt, project=args.project,
            since=args.since, only_changed=args.only_changed,
            include_deleted=args.include_deleted, embeddings=args.embeddings,
            model_label=_model_label(settings) if args.embeddings else None)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    print(f"exported {stats.rows} rows ({stats.annotations} annotations, {stats.embeddings} "
          f"with embeddings) to {', '.join(stats.files) or 'stdout'}", file=sys.stderr)


def _model_label(settings: Settings) -> str:
    """The served model's identity (as in embedding keys), from the settings alone."""
    from .zeroshot.encoder import ModelSpec

    return ModelSpec.from_settings(settings).label()


def _print_summary(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    rows = correction_rows(store, project=args.project, since=args.since)
    print(json.dumps(summary(rows), indent=2, ensure_ascii=False))


def _registry(store: Store, settings: Settings) -> HeadRegistry:
    return HeadRegistry(store, _model_label(settings))


def _list_heads(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    listing = _registry(store, settings).listing(args.project)
    print(json.dumps({"project": args.project, "active": store.active_head(args.project),
                      "heads": listing}, indent=2, ensure_ascii=False))


def _activate_head(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    _registry(store, settings).activate(args.project, args.head)
    print(f"project {args.project} now serves {args.head} (running backends pick it up within "
          "seconds)", file=sys.stderr)


def _write_report(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    page = render(args.project, store.heads(args.project), store.active_head(args.project))
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
