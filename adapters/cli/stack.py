"""Start and serve: `palette env`, `palette up` (the embedded stack and every process) and
`palette serve` (one application process, what `palette up` runs)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from adapters.cli.connect import running_settings
from adapters.settings import Settings, load_settings
from domain.text import one_line
from infra.supervisor import StackError, stop_strays

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands

APP_PROCESSES = ("api", "relay", "projector", "dispatcher", "gpu", "webhooks")


class Served(Protocol):
    """A process `palette serve` runs (domain.contracts.loop for the consumers)."""

    def warm_up(self, stop: threading.Event) -> None:
        """Be ready: a consumer holds its partitions."""

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop``, finishing the step in flight."""

    def close(self) -> None: ...


def _cmd_env(args: argparse.Namespace) -> int:
    settings = running_settings()
    values = settings.as_env()
    if args.key is not None:  # an empty name too ("$UNSET"): not every setting, secrets included, for one
        key = args.key if args.key.startswith("PALETTE_") else f"PALETTE_{args.key.upper()}"
        if key not in values:
            print(f"palette env: unknown setting {one_line(args.key) or '(an empty name)'}", file=sys.stderr)
            return 2
        print(values[key])
        return 0
    for key in sorted(values):
        print(f"{key}={values[key]}")
    return 0


class _Interrupted(BaseException):
    """A signal came while `palette up` was starting: what started is stopped. A BaseException,
    as KeyboardInterrupt is, so that no probe's ``except Exception`` takes it for its failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _cmd_up(args: argparse.Namespace) -> int:
    from adapters.bootstrap import embedded_stack
    from infra.stack import hold_data_dir

    settings = load_settings()
    stack = embedded_stack(settings, echo=sys.stdout)
    stopping = starting = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping, starting
        stopping = True
        if starting:  # a start-up waits up to a minute a process: unwind it now, once
            starting = False
            raise _Interrupted(signum)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's stays ignored
        signal.signal(signal.SIGHUP, _stop)  # its terminal closed: stopped in order, not by the parent-death signal
    t0 = time.monotonic()
    # signed ledger checkpoints on a schedule, when one is set (adapters/checkpoints.py)
    checkpointer = ("checkpointer",) if settings.audit_checkpoint_interval_s > 0 else ()
    # retention and unfinished erasures (adapters/retention.py), with the API
    sweeper = ("sweeper",) if "api" in args.apps else ()
    # each once: the supervisor knows a process by its name (a second relay would be left unstopped)
    apps = tuple(dict.fromkeys(args.apps)) + checkpointer + sweeper
    try:
        starting = True
        held = hold_data_dir(settings.data_dir)  # noqa: F841 - released when this process exits
        _check_ports(stack, settings, apps, infra=not args.external)
        if not args.external:
            stack.start_infra()
        stack.start_apps(apps)
        starting = False
        serving = (f"API on http://{settings.api_host}:{settings.api_port}" if "api" in apps
                   else f"{', '.join(apps) or 'no application process'}, no API")
        print(f"[palette] up in {time.monotonic() - t0:.1f}s: {serving} "
              f"(data and logs in {settings.data_dir}); Ctrl-C stops everything", flush=True)
        while not stopping:
            stack.supervisor.check()
            stack.watch_disks()
            time.sleep(0.5)
    except StackError as e:
        starting = False
        stack.stop()
        print(f"palette up: {e}", file=sys.stderr)
        return 1
    except _Interrupted as e:
        stack.stop()
        stop_strays()  # one launched as the signal came, before the supervisor recorded it
        if isinstance(e.__context__, StackError):  # the signal came while a failed start was stopping
            print(f"palette up: {e.__context__}", file=sys.stderr)
            return 1
        print(f"[palette] stopped while starting ({signal.Signals(e.signum).name})", flush=True)
        return 128 + e.signum
    except Exception:  # a fault of ours: its traceback is wanted, after the services stop in order
        starting = False
        stack.stop()
        raise
    stack.stop()
    print("[palette] stopped", flush=True)
    return 0


def _check_ports(stack: Any, settings: Settings, apps: tuple[str, ...], infra: bool) -> None:
    """Every port `palette up` will bind (the infrastructure's, the API's, each process's metrics
    port) must be free before anything starts: a readiness probe answered by a server already
    on one of them would pass for ours (StackError, in one line, when one is taken)."""
    from adapters.observability import OFFSETS, port_of
    from infra.stack import check_ports

    ports: dict[str, tuple[str, int]] = stack.ports_to_bind(apps, infra=infra)
    for name in apps:
        port = port_of(settings, name)
        if port is not None:
            ports[f"PALETTE_METRICS_PORT (+{OFFSETS[name]}, the {name} metrics port)"] = (settings.metrics_host, port)
    check_ports(ports)


def stop_on_signal(stop: threading.Event) -> Callable[[int, object], None]:
    """A signal handler that sets ``stop`` from a thread of its own. Set from the handler itself,
    it deadlocked: the handler runs in the main thread between two bytecodes, and when the main
    thread held the event's (non-reentrant) lock there, inside a handler interrupted by the next
    signal, say, the handler waited on itself for ever (seen: a webhooks process orphaned by a
    SIGKILLed ``palette up``, three handlers deep in ``Event.set``, kept PostgreSQL in its smart
    shutdown, and a new ``palette up`` found the port taken)."""
    def handler(_signum: int, _frame: object) -> None:
        threading.Thread(target=stop.set, name="stop-on-signal", daemon=True).start()

    return handler


def _serve_loop(worker: Served, ready_file: str | None, observed: tuple[str, Settings] | None = None) -> None:
    """Run a worker's loop until SIGTERM/SIGINT, finishing the step in flight. The ready file
    appears once the worker has done its first step (a consumer: once it holds partitions).
    ``observed`` (the process's name and settings) opens its metrics and probes port."""
    from pathlib import Path

    from adapters.collector import serving_gc

    stop = threading.Event()
    signal.signal(signal.SIGTERM, stop_on_signal(stop))
    signal.signal(signal.SIGINT, stop_on_signal(stop))
    if observed is not None:
        from adapters import observability

        observability.start(observed[0], worker, observed[1])
    try:
        started = time.monotonic()
        worker.warm_up(stop)
        if not stop.is_set():  # one line per start: how long joining took (a group's rebalance)
            logging.getLogger("palette.serve").info("ready after %.1f s", time.monotonic() - started)
        if ready_file:
            Path(ready_file).touch()
        serving_gc()
        worker.run(stop)
    finally:
        worker.close()


def _serve_api(settings: Any, naive: bool) -> None:
    """uvicorn on the API port: this process, or PALETTE_API_WORKERS processes sharing the port,
    each with its own container (uvicorn starts them from a factory, as it must for workers)."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from adapters import bootstrap, observability
    from adapters.api.app import API_POOL_SIZE, bound_connections, create_asgi
    from adapters.api.http_limits import SERVER_OPTIONS
    from adapters.api.sibling_writes import SIBLINGS_ENV, make_siblings_directory
    from adapters.collector import serving_gc

    # Each request's head bounded in size and time, the connections in number, a long keep-alive
    # (adapters.api.http_limits). log_config None: uvicorn's own records go to the process's JSON
    # lines (adapters.logs).
    bound_connections(settings)  # each worker process too (worker_asgi)
    options: dict[str, Any] = {"host": settings.api_host, "port": settings.api_port, "log_config": None,
                               **SERVER_OPTIONS}
    if settings.api_workers > 1:
        from adapters.logs import dict_config

        factory = "naive_worker_asgi" if naive else "group_worker_asgi"
        # Each worker logs JSON lines (uvicorn configures its logging) and counts into files that
        # this process adds up on the API's metrics port.
        options["log_config"] = dict_config("api")
        shared = observability.multiprocess_registry(settings.data_dir / "api-metrics")
        observability.start("api", None, settings, shared)
        # The workers' sockets for read-your-writes across them (adapters.api.sibling_writes).
        siblings = make_siblings_directory()
        os.environ[SIBLINGS_ENV] = str(siblings)  # the workers inherit it
        try:
            uvicorn.run(f"adapters.api.app:{factory}", factory=True, workers=settings.api_workers, **options)
        finally:
            shutil.rmtree(siblings, ignore_errors=True)
        return
    container = bootstrap.build(settings, naive=naive, pool_size=API_POOL_SIZE)
    registry = CollectorRegistry()  # the API's metrics port
    try:
        asgi = create_asgi(container, registry=registry)
        observability.start("api", None, settings, registry)
        serving_gc()
        uvicorn.run(asgi, **options)
    finally:
        container.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    from adapters import bootstrap, tracing
    from adapters.logs import configure as configure_logs

    if args.naive and args.process != "api":
        print("palette serve: --naive applies to the api only", file=sys.stderr)
        return 2
    settings = load_settings()
    configure_logs(args.process)
    tracing.configure(args.process, settings.trace_exporter)
    if args.process == "api":
        _serve_api(settings, args.naive)
    elif args.process == "relay":
        _serve_loop(bootstrap.build_relay(settings), args.ready_file, (args.process, settings))
    elif args.process == "projector":
        _serve_loop(bootstrap.build_projector(settings), args.ready_file, (args.process, settings))
    elif args.process == "dispatcher":
        _serve_loop(bootstrap.build_dispatcher(settings), args.ready_file, (args.process, settings))
    elif args.process == "gpu":
        _serve_loop(bootstrap.build_gpu_worker(settings), args.ready_file, (args.process, settings))
    elif args.process == "webhooks":
        _serve_loop(bootstrap.build_webhooks(settings), args.ready_file, (args.process, settings))
    elif args.process == "checkpointer":
        from adapters.checkpoints import Checkpointer, CheckpointError

        try:
            checkpointer = Checkpointer(settings)
        except CheckpointError as e:
            print(f"palette serve checkpointer: {e}", file=sys.stderr)
            return 2
        _serve_loop(checkpointer, args.ready_file, (args.process, settings))
    elif args.process == "sweeper":
        _serve_loop(bootstrap.build_sweeper(settings), args.ready_file)
    return 0


def add_commands(sub: Subcommands) -> None:
    env = sub.add_parser("env", help="print the effective settings, one KEY=value line each (secrets included)")
    env.add_argument("key", nargs="?",
                     help="print only this setting's value, e.g. PALETTE_DATABASE_URL (or database_url)")
    env.set_defaults(func=_cmd_env)

    up = sub.add_parser("up", help="start the embedded stack and the application processes",
                        description="Start the embedded stack and the application processes in the foreground. "
                                    "Each process's output goes to <data dir>/logs/<process>.log, rotated once "
                                    "past PALETTE_LOG_MAX_BYTES (64 MiB), keeping PALETTE_LOG_KEEP (3) older "
                                    "files (<process>.log.1 the newest).")
    up.add_argument("--external", action="store_true",
                    help="start only the application processes, against PostgreSQL/Kafka/S3 from settings")
    up.add_argument("--apps", nargs="*", default=list(APP_PROCESSES), choices=APP_PROCESSES,
                    help="application processes to run (default: all); the sweeper comes with the api, and "
                         "the checkpointer too once PALETTE_AUDIT_CHECKPOINT_INTERVAL_S > 0")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="run one application process (what `palette up` runs)")
    serve.add_argument("process", choices=(*APP_PROCESSES, "checkpointer", "sweeper"),
                       help="checkpointer: signed ledger checkpoints every PALETTE_AUDIT_CHECKPOINT_INTERVAL_S; "
                            "sweeper: deletes the objects of jobs finished PALETTE_RETENTION_DAYS ago and "
                            "finishes erasures a crash cut short, and deletes snapshots superseded by a newer one a "
                            "load can use (`palette up` starts it with the api)")
    serve.add_argument("--ready-file", help="touch this file once the process is ready (used by `palette up`); "
                       "not the api's, whose readiness is GET /health")
    serve.add_argument("--naive", action="store_true",
                       help="api only: serve commands with one load-decide-save each and no cache "
                            "(the benchmark's baseline, started by `palette bench`)")
    serve.set_defaults(func=_cmd_serve)
