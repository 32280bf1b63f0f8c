"""The `palette` command line: start the stack, print settings, serve the API."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

from adapters.settings import SettingsError, load_settings
from infra.supervisor import StackError

APP_PROCESSES = ("api", "relay", "projector", "dispatcher")


def _cmd_env(args: argparse.Namespace) -> int:
    settings = load_settings()
    values = settings.as_env()
    if args.key:
        key = args.key if args.key.startswith("PALETTE_") else f"PALETTE_{args.key.upper()}"
        if key not in values:
            print(f"palette env: unknown setting {args.key}", file=sys.stderr)
            return 2
        print(values[key])
        return 0
    for key in sorted(values):
        print(f"{key}={values[key]}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from infra.stack import EmbeddedStack

    settings = load_settings()
    stack = EmbeddedStack(settings, echo=sys.stdout)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    t0 = time.monotonic()
    try:
        if not args.external:
            stack.start_infra()
        stack.start_apps(tuple(args.apps))
        url = f"http://{settings.api_host}:{settings.api_port}"
        print(f"[palette] up in {time.monotonic() - t0:.1f}s: API on {url} "
              f"(data and logs in {settings.data_dir}); Ctrl-C stops everything", flush=True)
        while not stopping:
            stack.supervisor.check()
            time.sleep(0.5)
    except StackError as e:
        stack.stop()
        print(f"palette up: {e}", file=sys.stderr)
        return 1
    stack.stop()
    print("[palette] stopped", flush=True)
    return 0


def _serve_loop(worker: object, ready_file: str | None) -> None:
    """Run a worker's loop until SIGTERM/SIGINT, finishing the step in flight. The ready file
    appears once the worker has done its first step (a consumer: once it holds partitions)."""
    import threading
    from pathlib import Path

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        worker.warm_up(stop)  # type: ignore[attr-defined]
        if ready_file:
            Path(ready_file).touch()
        worker.run(stop)  # type: ignore[attr-defined]
    finally:
        worker.close()  # type: ignore[attr-defined]


def _cmd_serve(args: argparse.Namespace) -> int:
    from adapters import bootstrap

    settings = load_settings()
    if args.process == "api":
        import uvicorn

        from adapters.api.app import create_asgi

        container = bootstrap.build(settings, pool_size=16)
        try:
            uvicorn.run(create_asgi(container), host=settings.api_host, port=settings.api_port,
                        log_level="warning", access_log=False)
        finally:
            container.close()
    elif args.process == "relay":
        _serve_loop(bootstrap.build_relay(settings), args.ready_file)
    elif args.process == "projector":
        _serve_loop(bootstrap.build_projector(settings), args.ready_file)
    elif args.process == "dispatcher":
        _serve_loop(bootstrap.build_dispatcher(settings), args.ready_file)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palette", description="Palette: event-sourced photo-editing backend.")
    sub = p.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="print the effective settings as KEY=value lines (secrets included)")
    env.add_argument("key", nargs="?", help="print only this setting's value, e.g. PALETTE_DATABASE_URL")
    env.set_defaults(func=_cmd_env)

    up = sub.add_parser("up", help="start the embedded stack and the application processes")
    up.add_argument("--external", action="store_true",
                    help="start only the application processes, against PostgreSQL/Kafka/S3 from settings")
    up.add_argument("--apps", nargs="*", default=list(APP_PROCESSES), choices=APP_PROCESSES,
                    help="application processes to run (default: all)")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="run one application process (what `palette up` runs)")
    serve.add_argument("process", choices=APP_PROCESSES)
    serve.add_argument("--ready-file", help="touch this file once the process is ready (used by `palette up`)")
    serve.set_defaults(func=_cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SettingsError, StackError) as e:
        print(f"palette {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
