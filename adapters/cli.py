"""The `palette` command line: start the stack, print settings, serve the API."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

from adapters.settings import SettingsError, load_settings
from infra.supervisor import StackError

APP_PROCESSES = ("api", "relay", "projector", "dispatcher", "gpu")


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
    elif args.process == "gpu":
        _serve_loop(bootstrap.build_gpu_worker(settings), args.ready_file)
    return 0


def _event_store(settings: object) -> object:
    from adapters.bootstrap import event_store_env
    from application.services import PaletteApplication

    return PaletteApplication(env=event_store_env(settings, pool_size=2, cache=False))  # type: ignore[arg-type]


def _cmd_projections(args: argparse.Namespace) -> int:
    import psycopg

    from projections import rebuild as rebuilding
    from projections import store

    settings = load_settings()
    app = _event_store(settings)
    url = settings.effective_database_url
    try:
        if args.action == "status":
            print(_projection_status(app, url))
        elif args.action == "rebuild":
            def progress(n: int) -> None:
                print(f"  folded {n:,} events...", file=sys.stderr, flush=True)

            try:
                report = rebuilding.rebuild(url, app.recorder, app.mapper.transcoder, args.name, progress)  # type: ignore[attr-defined]
            except (KeyError, rebuilding.RebuildBusy) as e:
                print(f"palette projections rebuild: {e.args[0]}", file=sys.stderr)
                return 2
            print(f"rebuilt {report.model}: {report.events:,} events in {report.seconds:.2f}s "
                  f"({report.events_per_s:,.0f} events/s), {report.rows:,} rows"
                  + (f", {report.ledger_rows:,} ledger rows" if report.ledger_rows else "")
                  + (f", {report.failed_streams} stream(s) held by a failing event" if report.failed_streams else ""))
        elif args.action == "dlq":
            with psycopg.connect(url, autocommit=True) as conn:
                store.ensure_schema(conn)
                if args.dlq_action == "list":
                    letters = store.dead_letters(conn)
                    if not letters:
                        print("no parked events")
                    for d in letters:
                        print(f"{d['id']}\t{d['status']}\t{d['model']}\t{d['stream_id']}@{d['version']}"
                              f"\tposition {d['position']}\t{d['error']}")
                else:
                    try:
                        result = store.resolve_dead_letter(conn, args.id, args.dlq_action)
                    except LookupError as e:
                        print(f"palette projections dlq: {e.args[0]}", file=sys.stderr)
                        return 2
                    print(f"{args.dlq_action}: applied {result.applied}, parked again {result.parked}")
    finally:
        app.close()  # type: ignore[attr-defined]
    return 0


def _projection_status(app: object, url: str) -> str:
    from datetime import UTC, datetime

    import psycopg

    from adapters.envelope import from_notification
    from projections import store
    from projections.read_models import READ_MODELS

    head = app.recorder.max_notification_id() or 0  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as conn:
        store.ensure_schema(conn)
        positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
        relay = conn.execute("SELECT position FROM palette_relay.positions WHERE name = 'palette.events'"
                             ).fetchone() if conn.execute("SELECT to_regclass('palette_relay.positions')"
                                                          ).fetchone()[0] else None  # type: ignore[index]
        parked = conn.execute("SELECT count(*) FROM palette_read.dead_letters WHERE status IN ('parked','held')").fetchone()
    lines = [f"event store head: {head}", f"relay position:   {relay[0] if relay else 0}",
             f"{'model':<16}{'position':>10}{'lag events':>12}{'lag s':>9}"]
    now = datetime.now(UTC)
    with psycopg.connect(url, autocommit=True) as conn:
        for name, model in READ_MODELS.items():
            lag, oldest = store.unapplied(conn, model, app.recorder.events_table_name)  # type: ignore[attr-defined]
            lag_s = 0.0
            if oldest is not None:
                nxt = app.recorder.select_notifications(start=oldest, limit=1)  # type: ignore[attr-defined]
                lag_s = (now - from_notification(nxt[0], app.mapper.transcoder).timestamp).total_seconds()  # type: ignore[attr-defined]
            lines.append(f"{name:<16}{int(positions.get(name, 0)):>10}{lag:>12}{lag_s:>9.2f}")
    lines.append(f"dead letters (parked or held): {parked[0] if parked else 0}")
    return "\n".join(lines)


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
    proj = sub.add_parser("projections", help="read models: status, rebuild, dead letters")
    proj_sub = proj.add_subparsers(dest="action", required=True)
    proj_sub.add_parser("status", help="position and lag (events, seconds) of each read model")
    rb = proj_sub.add_parser("rebuild", help="rebuild a read model from the event store (shadow table, then swap)")
    rb.add_argument("name", help="users, rules, jobs_log, job_items_log or billing_events")
    dlq = proj_sub.add_parser("dlq", help="list, retry or skip parked events")
    dlq_sub = dlq.add_subparsers(dest="dlq_action", required=True)
    dlq_sub.add_parser("list", help="parked events and the ones held behind them")
    for verb, text in (("retry", "apply a parked event (and those held behind it) again"),
                       ("skip", "skip a parked event and apply those held behind it")):
        v = dlq_sub.add_parser(verb, help=text)
        v.add_argument("id", type=int, help="the dead letter's id (from `dlq list`)")
    proj.set_defaults(func=_cmd_projections)
    return p


def _is_unreachable(e: BaseException) -> bool:
    import psycopg
    from eventsourcing.persistence import OperationalError

    return isinstance(e, (psycopg.OperationalError, OperationalError))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SettingsError, StackError) as e:
        print(f"palette {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if _is_unreachable(e):
            print(f"palette {args.command}: cannot reach PostgreSQL ({type(e).__name__}); "
                  "is the stack up (`make run`) and PALETTE_DATABASE_URL right?", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
