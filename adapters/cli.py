"""The `palette` command line: start the stack, print settings, serve the API."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

from adapters.settings import SettingsError, load_settings
from infra.supervisor import StackError


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


def _cmd_serve_api(_: argparse.Namespace) -> int:
    import uvicorn

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    settings = load_settings()
    container = build(settings, pool_size=16)
    try:
        uvicorn.run(create_asgi(container), host=settings.api_host, port=settings.api_port,
                    log_level="warning", access_log=False)
    finally:
        container.close()
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
    up.add_argument("--apps", nargs="*", default=["api"], choices=["api"],
                    help="application processes to run (default: all)")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve-api", help="serve the HTTP API (what `palette up` runs)")
    serve.set_defaults(func=_cmd_serve_api)
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
