"""The `palette` command line: start the stack, print settings, serve the API."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from adapters.settings import Settings, SettingsError, load_settings
from adapters.tokens import STAFF_TTL_MAX_S
from infra.supervisor import StackError

APP_PROCESSES = ("api", "relay", "projector", "dispatcher", "gpu", "webhooks")


def _settings() -> Settings:
    """load_settings for a command that uses a running stack. Run where no stack ran (outside the
    checkout, the data directory being the relative ``.palette`` unless PALETTE_DATA_DIR says
    otherwise), a command gets development secrets made afresh, which nothing running knows: it
    says so, rather than fail later for a reason that seems unrelated (a token refused, a
    database password wrong)."""
    def fresh(path: Path) -> None:
        if "PALETTE_DATA_DIR" not in os.environ:
            print(f"palette: no development secrets were in {path.parent}: made new ones, which no running stack "
                  "uses (run palette from the checkout that ran `make run`, or set PALETTE_DATA_DIR)", file=sys.stderr)

    return load_settings(fresh)


def _cmd_env(args: argparse.Namespace) -> int:
    settings = _settings()
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
    from adapters.bootstrap import embedded_stack

    settings = load_settings()
    stack = embedded_stack(settings, echo=sys.stdout)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    t0 = time.monotonic()
    # signed ledger checkpoints on a schedule, when one is set (adapters/checkpoints.py)
    checkpointer = ("checkpointer",) if settings.audit_checkpoint_interval_s > 0 else ()
    # retention and unfinished erasures (adapters/retention.py), with the API
    sweeper = ("sweeper",) if "api" in args.apps else ()
    apps = tuple(args.apps) + checkpointer + sweeper
    try:
        _check_ports(stack, settings, apps, infra=not args.external)
        if not args.external:
            stack.start_infra()
        stack.start_apps(apps)
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


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path``, as the OS says it (None: it can), found by
    opening it for writing (permission bits say nothing for root, a read-only mount or /proc);
    a file this made is removed again. Through a symbolic link, its target is what is tried. A
    FIFO without a reader is refused, not waited on. Checked before the work whose result goes
    there."""
    target = path.resolve()
    if target.is_dir():
        return os.strerror(errno.EISDIR)
    existed = target.exists()
    try:  # nothing written, nothing cut
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    if not existed:
        target.unlink(missing_ok=True)
    return None


def _serve_loop(worker: object, ready_file: str | None, observed: tuple[str, Settings] | None = None) -> None:
    """Run a worker's loop until SIGTERM/SIGINT, finishing the step in flight. The ready file
    appears once the worker has done its first step (a consumer: once it holds partitions).
    ``observed`` (the process's name and settings) opens its metrics and probes port."""
    import threading
    from pathlib import Path

    from adapters.runtime import serving_gc

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if observed is not None:
        from adapters import observability

        observability.start(observed[0], worker, observed[1])
    try:
        started = time.monotonic()
        worker.warm_up(stop)  # type: ignore[attr-defined]
        if not stop.is_set():  # one line per start: how long joining took (a group's rebalance)
            logging.getLogger("palette.serve").info("ready after %.1f s", time.monotonic() - started)
        if ready_file:
            Path(ready_file).touch()
        serving_gc()
        worker.run(stop)  # type: ignore[attr-defined]
    finally:
        worker.close()  # type: ignore[attr-defined]


def _serve_api(settings: Any, naive: bool) -> None:
    """uvicorn on the API port: this process, or PALETTE_API_WORKERS processes sharing the port,
    each with its own container (uvicorn starts them from a factory, as it must for workers)."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from adapters import bootstrap, observability
    from adapters.api.app import API_POOL_SIZE, bound_connections, create_asgi
    from adapters.api.http_limits import SERVER_OPTIONS
    from adapters.runtime import serving_gc

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
        uvicorn.run(f"adapters.api.app:{factory}", factory=True, workers=settings.api_workers, **options)
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
        from adapters.retention import Sweeper

        _serve_loop(Sweeper(settings), args.ready_file)
    return 0


def _event_store(settings: object) -> object:
    from adapters.bootstrap import open_event_store

    return open_event_store(settings, pool_size=2, saves=False)  # type: ignore[arg-type]


def _cmd_projections(args: argparse.Namespace) -> int:
    import psycopg

    from projections import rebuild as rebuilding
    from projections import schema, store

    settings = _settings()
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
            print(f"rebuilt {report.model}: {report.events:,} of its events (log of {report.log_events:,}) "
                  f"in {report.seconds:.2f}s ({report.events_per_s:,.0f} log events/s), {report.rows:,} rows"
                  + (f", {report.ledger_rows:,} ledger rows" if report.ledger_rows else "")
                  + (f", {report.failed_streams} stream(s) held by a failing event" if report.failed_streams else ""))
        elif args.action == "dlq":
            with psycopg.connect(url, autocommit=True) as conn:
                schema.ensure_schema(conn)
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

    from domain.contracts.envelope import from_notification
    from projections import schema, store
    from projections.models import READ_MODELS

    head = app.recorder.max_notification_id() or 0  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as conn:
        schema.ensure_schema(conn)
        positions: dict[str, int] = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
        relay = conn.execute("SELECT position FROM palette_relay.positions WHERE name = 'palette.events'"
                             ).fetchone() if conn.execute("SELECT to_regclass('palette_relay.positions')"
                                                          ).fetchone()[0] else None  # type: ignore[index]
        parked = conn.execute(
            "SELECT count(*) FROM palette_read.dead_letters WHERE status IN ('parked','held')").fetchone()
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


def _when(value: str) -> datetime:
    """An ISO-8601 time; naive times are UTC."""
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a stream/user id (UUID): {value!r}") from None


def _cmd_replay(args: argparse.Namespace) -> int:
    import json

    from projections.replay import Replayer, as_csv, as_jsonl

    if getattr(args, "out", None) is not None and args.format != "parquet":
        print(f"palette replay all: --out is for --format parquet; {args.format} goes to stdout "
              f"(redirect it: > FILE)", file=sys.stderr)
        return 2
    if args.action == "state" and args.version is not None and args.version < 1:
        print(f"palette replay state: --version must be 1 or more, not {args.version}", file=sys.stderr)
        return 2
    if args.action == "all" and (why := _bad_window(args.from_position, args.since, args.until)):
        print(f"palette replay all: {why}", file=sys.stderr)
        return 2
    settings = _settings()
    app = _event_store(settings)
    replayer = Replayer(app, _erased_users(settings))
    out = sys.stdout
    try:
        if args.action == "state":
            try:  # no such stream, none of its events by then, or not that many versions
                state = replayer.state(args.id, version=args.version, as_of=args.as_of)
            except LookupError as e:
                print(f"palette replay state: {e.args[0]}", file=sys.stderr)
                return 2
            print(json.dumps(state, indent=2))
            return 0
        if args.action == "stream":
            try:
                envelopes = replayer.existing_stream(args.id)
            except LookupError as e:
                print(f"palette replay stream: {e.args[0]}", file=sys.stderr)
                return 2
        elif args.format == "parquet":
            return _replay_parquet(args, app, replayer)
        else:
            try:
                if args.format == "jsonl" and args.since is None and args.until is None:
                    for line in _with_progress(replayer.all_jsonl(args.from_position, args.type or None)):
                        out.buffer.write(line)
                    out.flush()
                    return 0
                envelopes = replayer.all(start=args.from_position, since=args.since, until=args.until,
                                         types=args.type or None)
                envelopes = _with_progress(envelopes)
            except ValueError as e:
                print(f"palette replay all: {e}", file=sys.stderr)
                return 2
        if args.format == "csv":
            for line in as_csv(envelopes):
                out.write(line)
        else:
            for chunk in as_jsonl(envelopes):
                out.buffer.write(chunk)
        out.flush()
    finally:
        app.close()  # type: ignore[attr-defined]
    return 0


def _bad_window(from_position: int, since: datetime | None, until: datetime | None) -> str | None:
    """Why ``replay all``'s window holds nothing by construction (None: it may hold events)."""
    if from_position < 1:
        return f"--from must be a notification id (1 or more), not {from_position}"
    if since is not None and until is not None and until < since:
        return "the period's end (--until) must be after its start (--since)"
    return None


def _with_progress(envelopes: Iterator[Any], every: int = 100_000) -> Iterator[Any]:
    t0 = time.monotonic()
    n = 0
    for n, env in enumerate(envelopes, 1):
        if n % every == 0:
            rate = n / max(time.monotonic() - t0, 1e-9)
            print(f"  {n:,} events ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        yield env
    if n >= every:
        print(f"  done: {n:,} events in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)


def _replay_parquet(args: argparse.Namespace, app: Any, replayer: Any) -> int:
    from projections.parquet import ExportError, export_log

    if args.out is None:
        print("palette replay all: --format parquet writes a dataset: give --out DIR", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    shown = [0]

    def progress(n: int) -> None:
        if n - shown[0] >= 100_000:
            shown[0] = n
            print(f"  {n:,} events ({n / max(time.monotonic() - t0, 1e-9):,.0f}/s)", file=sys.stderr, flush=True)

    try:
        start = max(args.from_position, replayer.position_at(args.since) if args.since else 1)
        stats = export_log(app.recorder, app.mapper.transcoder, args.out, start, args.since, args.until,
                           args.type or None, progress, replayer.erased)
    except ExportError as e:
        print(f"palette replay all: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"palette replay all: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - t0
    print(f"wrote {stats.events:,} events in {seconds:.1f}s ({stats.events / max(seconds, 1e-9):,.0f}/s) to "
          f"{args.out}: {len(stats.partitions)} partitions (type, day), {stats.files} files, "
          f"{stats.bytes / 1e6:.1f} MB", file=sys.stderr)
    return 0


def _erased_users(settings: Settings) -> frozenset[UUID]:
    import psycopg

    from adapters.keyring import all_erased

    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        return all_erased(conn)


def _cmd_export(args: argparse.Namespace) -> int:
    import psycopg

    from adapters.keyring import all_erased
    from projections.parquet import ExportError, export_table

    settings = _settings()
    with psycopg.connect(settings.effective_database_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            with conn.transaction():
                stats = export_table(conn, args.name, args.out, all_erased(conn))
        except ExportError as e:
            print(f"palette export: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"palette export: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
    print(f"exported {args.name}: {stats.events:,} rows to {args.out / args.name} ({stats.bytes / 1e6:.2f} MB)",
          file=sys.stderr)
    return 0


def _row_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {value!r}") from None
    if not 1 <= limit <= 10_000_000:
        raise argparse.ArgumentTypeError("--limit must be between 1 and 10,000,000")
    return limit


def _cmd_query(args: argparse.Namespace) -> int:
    from adapters.query import QueryError, render, run

    settings = _settings()
    try:
        result = run(args.sql, args.data, None if args.no_db else settings.effective_database_url, args.limit,
                     args.timeout)
    except QueryError as e:
        print(f"palette query: {e}", file=sys.stderr)
        return 2
    print(render(result, args.format))
    if result.truncated:
        print(f"palette query: showing the first {args.limit:,} rows (--limit N for more)", file=sys.stderr)
    return 0


def _report_text(report: Any, fmt: str) -> str:
    """An audit period report as a table, CSV or JSON."""
    import csv
    import io
    import json

    from projections.audit import FIGURES

    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    rows = [p.as_dict() for p in [*report.plans, report.total]]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["plan", *FIGURES, "balanced"])
        writer.writerows([[r["plan"], *(r[f] for f in FIGURES), r["balanced"]] for r in rows])
        return buf.getvalue().rstrip("\n")
    t = report.total
    where = (f"reconciled to the log at position {report.position:,}: every user event up to it folded, "
             "none after it counted" if not report.unfolded else
             f"INCOMPLETE: {report.unfolded:,} user event(s) at or before position {report.position:,} not folded "
             "into billing_events (see `palette projections status` / `dlq list`)")
    widths = {f: 2 + max(len(f), *(len(f"{r[f]:,}") for r in rows)) for f in FIGURES}
    plan_w = 2 + max(len("plan"), *(len(r["plan"]) for r in rows))
    lines = [f"period {report.since.isoformat()} (inclusive) to {report.until.isoformat()} (exclusive)", where, "",
             "plan".ljust(plan_w) + "".join(f.rjust(widths[f]) for f in FIGURES)]
    lines += [r["plan"].ljust(plan_w) + "".join(f"{r[f]:,}".rjust(widths[f]) for f in FIGURES) for r in rows]
    verdict = "holds" if report.ok else "DOES NOT HOLD"
    lines += ["", f"opening + granted - spent = closing + reserved: {t.opening:,} + {t.granted:,} - {t.spent:,} = "
              f"{t.opening + t.granted - t.spent:,}; {t.closing:,} + {t.reserved:,} = {t.closing + t.reserved:,}: "
              f"{verdict}" + ("" if all(p.balanced for p in report.plans) else " (for some plan)"),
              "opening/closing: spendable balance; reserved: net credits moved into reservations in the period "
              "(placed - spent - refunded = held_closing - held_opening); outstanding: owed to users at the end "
              "(closing + held_closing)"]
    return "\n".join(lines)


def _audit_report(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from projections import audit

    app = _event_store(settings)
    try:
        if (refused := _refused_position(args.at, app)) is not None:
            print(f"palette audit report: {refused}", file=sys.stderr)
            return 2
        report = audit.period_report(conn, app.recorder, app.mapper.transcoder, args.since, args.until,  # type: ignore[attr-defined]
                                     at=args.at)
    except ValueError as e:
        print(f"palette audit report: {e}", file=sys.stderr)
        return 2
    finally:
        app.close()  # type: ignore[attr-defined]
    print(_report_text(report, args.format))
    return 0 if report.ok else 1


def _audit_checkpoint(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from adapters import checkpoints
    from adapters.system import SystemClock

    if args.out is not None and (why := _unwritable(args.out)) is not None:
        print(f"palette audit checkpoint: cannot write {args.out}: {why}", file=sys.stderr)
        return 2
    try:
        key = checkpoints.private_key(settings)
        store = checkpoints.CheckpointStore.of(settings, use_s3=not args.no_s3)
        if args.out is None and store.directory is None and args.no_s3:
            raise checkpoints.CheckpointError("--no-s3 needs --out FILE or PALETTE_AUDIT_CHECKPOINT_DIR")
        app = _event_store(settings)
        try:
            doc = checkpoints.take(conn, app.recorder, key, SystemClock().now())  # type: ignore[attr-defined]
        finally:
            app.close()  # type: ignore[attr-defined]
        where = store.put(doc) if (store.s3 is not None or store.directory is not None) else []
    except checkpoints.CheckpointError as e:
        print(f"palette audit checkpoint: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        import json

        try:
            args.out.write_text(json.dumps(doc, separators=(",", ":")))
        except OSError as e:
            kept = f" (the checkpoint is kept at {', '.join(where)})" if where else ""
            print(f"palette audit checkpoint: cannot write {args.out}: {e.strerror or e}{kept}", file=sys.stderr)
            return 2
        where.append(str(args.out))
    payload = doc["payload"]
    print(f"checkpoint of {len(payload['heads']):,} chain heads at log position {payload['log_position']:,}"
          + ("" if payload["complete"] else " (INCOMPLETE: the ledger had not folded every event up to it)")
          + f" signed and kept at {', '.join(where)}")
    print(f"public key (Ed25519, hex): {doc['public_key']}")
    return 0


def _audit_verify(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from adapters import checkpoints
    from projections import audit

    anchored = ""
    head_breaks: list[Any] = []
    if args.checkpoint:
        try:
            key = checkpoints.trusted_key(settings, args.public_key)
            if args.checkpoint == "latest":
                where, doc = checkpoints.CheckpointStore.of(settings).latest()
            else:
                where, doc = args.checkpoint, checkpoints.read_file(Path(args.checkpoint))
            payload = checkpoints.verified_payload(doc, key)
        except checkpoints.CheckpointError as e:
            print(f"palette audit verify: {e}", file=sys.stderr)
            return 2
        head_breaks = audit.verify_heads(conn, payload["heads"])
        anchored = (f"; {len(payload['heads']):,} chain heads of the checkpoint at log position "
                    f"{payload['log_position']:,} ({where}, signature valid): "
                    + ("all match" if not head_breaks else f"{len(head_breaks)} do not match"))
    checked, breaks = audit.verify(conn)
    for b in [*breaks, *head_breaks]:
        where_ = f"position {b.position}" if b.position is not None else "its end"
        print(f"BROKEN user {b.user_id} at seq {b.seq} ({where_}): {b.reason}")
    bad = len(breaks) + len(head_breaks)
    print(f"verified {checked:,} ledger rows: {'OK' if not bad else f'{bad} broken chain(s)'}{anchored}")
    return 0 if not bad else 1


def _cmd_audit(args: argparse.Namespace) -> int:
    import csv
    import json

    import psycopg

    from projections import audit, schema

    settings = _settings()
    if args.action == "keygen":
        return _audit_keygen(args)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        schema.ensure_schema(conn)
        if args.action == "report":
            return _audit_report(args, conn, settings)
        if args.action == "checkpoint":
            return _audit_checkpoint(args, conn, settings)
        if args.action == "ledger":
            rows = audit.ledger(conn, args.user, args.since, args.until)
            print(f"{'seq':>5} {'occurred_at':<33}{'type':<8}{'amount':>8}{'delta':>8}{'balance':>9}  ref")
            for r in rows:
                print(f"{r['seq']:>5} {r['occurred_at'].isoformat():<33}{r['type']:<8}{r['amount']:>8}"
                      f"{r['balance_delta']:>8}{r['balance']:>9}  {r['ref']}")
            if not rows:
                print("no ledger entries for this user in that range")
        elif args.action == "balance":
            print(json.dumps(audit.balance_as_of(conn, args.user, args.as_of), indent=2))
        elif args.action == "export":
            exported = audit.export(conn)
            if args.format == "csv":
                writer = csv.writer(sys.stdout)
                writer.writerow(audit.LEDGER_COLUMNS)
                for r in exported:
                    writer.writerow([r[c] for c in audit.LEDGER_COLUMNS])
            else:
                for r in exported:
                    sys.stdout.write(json.dumps(r, default=str) + "\n")
        elif args.action == "verify":
            return _audit_verify(args, conn, settings)
        elif args.action == "reconcile":
            app = _event_store(settings)
            try:
                if (refused := _refused_position(args.at, app)) is not None:
                    print(f"palette audit reconcile: {refused}", file=sys.stderr)
                    return 2
                t0 = time.monotonic()
                report = audit.reconcile(
                    conn, app.recorder, app.mapper.transcoder,  # type: ignore[attr-defined]
                    progress=lambda n: print(f"... {n:,} user events folded", file=sys.stderr, flush=True),
                    at=args.at)
                log_size = app.recorder.max_notification_id() or 0  # type: ignore[attr-defined]
            finally:
                app.close()  # type: ignore[attr-defined]
            for d in report.differences:
                print(f"DIFF {d}")
            verdict = "OK" if report.ok else (f"{len(report.differences)} difference(s), of which "
                                              f"{len(report.balance_mismatches)} ledger/aggregate balance mismatch(es)")
            print(f"reconciled {report.events:,} user events (of {log_size:,} in the log; folded up to "
                  f"position {report.position:,} at least), "
                  f"{report.ledger_rows:,} ledger rows, {report.users:,} users "
                  f"in {time.monotonic() - t0:.1f}s: {verdict}")
            return 0 if report.ok else 1
    return 0


def _refused_position(at: int | None, app: Any) -> str | None:
    """Why ``--at`` names no position of the log (None: it does, or it is not given)."""
    if at is None:
        return None
    if at < 0:
        return f"--at must be a log position (0 or more), not {at}"
    head = int(app.recorder.max_notification_id() or 0)
    return f"--at {at:,} is past the log's head (position {head:,})" if at > head else None


def _audit_keygen(args: argparse.Namespace) -> int:
    from adapters import checkpoints

    try:
        public = checkpoints.keygen(args.out)
    except checkpoints.CheckpointError as e:
        print(f"palette audit keygen: {e}", file=sys.stderr)
        return 2
    print(f"signing key written to {args.out} (mode 0600): keep it off the database host's backups, and set "
          f"PALETTE_AUDIT_SIGNING_KEY_FILE={args.out} where checkpoints are taken")
    print(f"public key (Ed25519, hex), for auditors (PALETTE_AUDIT_PUBLIC_KEY): {checkpoints.public_hex(public)}")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from adapters.system import SystemClock
    from adapters.tokens import TokenIssuer

    settings = _settings()
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_s)
    subject = args.subject or uuid4()
    print(issuer.issue(subject, SystemClock().now(), role=args.role, ttl_s=args.ttl))
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    """Operators: erase a user (what DELETE /me does), or run one sweeper pass now."""
    from adapters import bootstrap

    settings = _settings()
    if args.action == "sweep":
        from adapters.retention import Sweeper

        sweeper = Sweeper(settings)
        try:
            r = sweeper.step()
        finally:
            sweeper.close()
        print(f"swept: {r.jobs_expired} job(s) expired (past {settings.retention_days} days, or "
              f"{settings.unpaid_retention_days} having spent nothing), "
              f"{r.erasures_finished} erasure(s) finished, {r.objects_deleted} object(s) deleted")
        return 0
    from adapters.erasure import erase
    from domain.errors import DomainError

    container = bootstrap.build(settings, pool_size=2)
    try:
        done = erase(container.service, container.read_pool, container.s3, settings.s3_bucket, args.user_id)
    except DomainError as e:
        print(f"palette admin erase: {e}", file=sys.stderr)
        return 1
    finally:
        container.close()
    print(f"erased {args.user_id}: {'recorded now' if done.recorded else 'already erased, finished again'}; "
          f"{done.objects} object(s) and {done.webhooks} webhook endpoint(s) deleted, "
          f"{'key destroyed' if done.recorded else 'its key gone'}")
    return 0


def _duration(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration like 30m, 1h, 7d: {value!r}") from None
    if not 60 <= seconds <= STAFF_TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"ttl must be between 1m and {STAFF_TTL_MAX_S // 86400}d")
    return seconds


def _cmd_bench(args: argparse.Namespace) -> int:
    """The harness is no part of the installed packages: it is imported from tests/bench."""
    import importlib
    from pathlib import Path

    for option, path in (("--json", args.json_path), ("--plot", args.plot_path)):
        if path is not None and (why := _unwritable(Path(path))) is not None:
            print(f"palette bench: cannot write {path} ({option}): {why}", file=sys.stderr)
            return 2
    # A console script's sys.path starts with its own directory, not the working directory
    # (`python -m` would put it first): from a checkout's root, tests/ becomes importable.
    root = Path.cwd()
    if (root / "tests" / "bench" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench = importlib.import_module("tests.bench")
    except ModuleNotFoundError as e:
        if e.name not in ("tests", "tests.bench"):
            print(f"palette bench: {e} (the benchmark needs the dev extras: pip install -e '.[dev]')",
                  file=sys.stderr)
            return 2
        print("palette bench runs from a source checkout: tests/bench is not importable here", file=sys.stderr)
        return 2
    if args.quality:
        quality = importlib.import_module("tests.bench.quality")
        return int(quality.main(args.quick, args.json_path))
    return int(bench.main(args.quick, args.json_path, args.plot_path, args.audit_events))


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
    serve.add_argument("process", choices=(*APP_PROCESSES, "checkpointer", "sweeper"),
                       help="checkpointer: signed ledger checkpoints every PALETTE_AUDIT_CHECKPOINT_INTERVAL_S; "
                            "sweeper: deletes the objects of jobs finished PALETTE_RETENTION_DAYS ago and "
                            "finishes erasures a crash cut short (`palette up` starts it with the api)")
    serve.add_argument("--ready-file", help="touch this file once the process is ready (used by `palette up`)")
    serve.add_argument("--naive", action="store_true",
                       help="api only: serve commands with one load-decide-save each and no cache "
                            "(the benchmark's baseline, started by `palette bench`)")
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

    replay = sub.add_parser("replay", help="analysts: replay streams or the log; state as of a point")
    rsub = replay.add_subparsers(dest="action", required=True)
    rs = rsub.add_parser("stream", help="one stream's events in version order")
    rs.add_argument("id", type=_uuid)
    ra = rsub.add_parser("all", help="the global log in commit order")
    ra.add_argument("--from", dest="from_position", type=int, default=1, help="first notification id")
    ra.add_argument("--since", type=_when, metavar="TIME", help="first event time (ISO-8601; no offset: UTC)")
    ra.add_argument("--until", type=_when, metavar="TIME", help="last event time (ISO-8601; no offset: UTC)")
    ra.add_argument("--type", action="append", help="only these event types (repeatable)")
    rs.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    ra.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                    help="parquet: a dataset under --out partitioned by event type and day "
                    "(type=<Event>/day=<date>/), each event's data as typed columns")
    ra.add_argument("--out", type=Path, help="the Parquet dataset's directory (--format parquet; must not hold one)")
    rst = rsub.add_parser("state", help="an aggregate's state folded up to a version or a time")
    rst.add_argument("id", type=_uuid)
    point = rst.add_mutually_exclusive_group(required=True)
    point.add_argument("--version", type=int)
    point.add_argument("--as-of", type=_when)
    replay.set_defaults(func=_cmd_replay)

    aud = sub.add_parser("audit", help="auditors: queries over the billing_events projection")
    asub = aud.add_subparsers(dest="action", required=True)
    al = asub.add_parser("ledger", help="a user's ledger with running balance")
    al.add_argument("--user", type=_uuid, required=True)
    al.add_argument("--from", dest="since", type=_when, metavar="TIME", help="period start (ISO-8601; no offset: UTC)")
    al.add_argument("--to", dest="until", type=_when, metavar="TIME", help="period end (ISO-8601; no offset: UTC)")
    ab = asub.add_parser("balance", help="a user's balance as of a time, with the positions used")
    ab.add_argument("--user", type=_uuid, required=True)
    ab.add_argument("--as-of", type=_when, required=True)
    rec = asub.add_parser("reconcile", help="prove the projection equals the fold of the event log (exit 1 if not); "
                          "safe on a live system: one snapshot of the projection, the log folded to match it")
    rec.add_argument("--at", type=int, metavar="POSITION", default=None,
                     help="every event up to this log position must be folded (default: the log's head at start)")
    ae = asub.add_parser("export", help="every ledger row, paged by position")
    ae.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    av = asub.add_parser("verify", help="recompute the per-user hash chains (exit 1 at a break); with --checkpoint, "
                         "also check every chain head a signed checkpoint holds (catches a consistent rewrite)")
    av.add_argument("--checkpoint", metavar="FILE|latest",
                    help="a checkpoint file, or `latest` from the object store / PALETTE_AUDIT_CHECKPOINT_DIR")
    av.add_argument("--public-key", metavar="HEX|PEM_FILE",
                    help="the public key to trust (default: PALETTE_AUDIT_PUBLIC_KEY, else the signing key's)")
    ar = asub.add_parser("report", help="a period's opening, granted, reserved, spent, refunded, closing and "
                         "outstanding credits by plan, at one log position (exit 1 if the identity fails)",
                         description="Figures for [--from, --to): opening/closing = spendable balance; reserved = "
                         "net credits moved into reservations in the period (placed - spent - refunded); "
                         "outstanding = owed to users at --to (closing + still held). Checks opening + granted - "
                         "spent = closing + reserved.")
    ar.add_argument("--from", dest="since", type=_when, required=True, help="period start (inclusive), ISO-8601")
    ar.add_argument("--to", dest="until", type=_when, required=True, help="period end (exclusive), ISO-8601")
    ar.add_argument("--at", type=int, metavar="POSITION", help="count the log up to here (default: its head)")
    ar.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ack = asub.add_parser("checkpoint", help="sign the ledger's chain heads and log position (Ed25519) and keep "
                          "the checkpoint in the object store (audit/checkpoints/) and/or a file")
    ack.add_argument("--out", type=Path, help="also write the checkpoint to this file")
    ack.add_argument("--no-s3", action="store_true", help="do not use the object store")
    akg = asub.add_parser("keygen", help="make an Ed25519 signing key file for checkpoints; prints the public key")
    akg.add_argument("--out", type=Path, required=True, help="the key file to create (never overwritten)")
    aud.set_defaults(func=_cmd_audit)

    exp = sub.add_parser("export", help="analysts: a read model as Parquet (one read-only snapshot)")
    exp.add_argument("name", choices=("jobs_log", "job_items_log", "billing_events", "users", "rules"))
    exp.add_argument("--format", choices=("parquet",), default="parquet")
    exp.add_argument("--out", type=Path, required=True, help="writes OUT/<name>/part-00000.parquet")
    exp.set_defaults(func=_cmd_export)

    qry = sub.add_parser("query", help="analysts: one SQL SELECT (DuckDB) over Parquet exports and the read models",
                         description="Views: one per event type (JobCreated, ...) and `events` over the dataset of "
                         "`palette replay all --format parquet --out DIR`, and each read model exported under DIR "
                         "by `palette export`. A read model the SQL names without an export is loaded from "
                         "PostgreSQL via psycopg in one read-only transaction (DuckDB's postgres extension would "
                         "need a download at runtime). Only a single SELECT runs; file access is confined to DIR.")
    qry.add_argument("sql", help='e.g. "SELECT preset, count(*) FROM JobCreated GROUP BY 1"')
    qry.add_argument("--data", type=Path, help="the directory of the Parquet exports")
    qry.add_argument("--format", choices=("table", "csv", "json"), default="table")
    qry.add_argument("--limit", type=_row_limit, default=1000, help="at most this many rows (default 1000)")
    qry.add_argument("--no-db", action="store_true", help="never connect to PostgreSQL")
    qry.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                     help="interrupt the query after this long (default 300; 0: no limit)")
    qry.set_defaults(func=_cmd_query)

    bench = sub.add_parser("bench", help="measure every performance goal against a naive baseline "
                           "(from a source checkout: runs tests/bench)",
                           description="Starts its own embedded stack on free ports and measures every performance "
                           "goal next to a naive baseline. The harness is tests/bench: run it from the root of a "
                           "source checkout.")
    bench.add_argument("--quick", action="store_true", help="the short profile (about 10 minutes on a 2-core machine)")
    bench.add_argument("--quality", action="store_true",
                       help="edit quality against ground truth instead (generated scenes, both mask sources)")
    bench.add_argument("--json", dest="json_path", help="write the results as JSON here")
    bench.add_argument("--plot", dest="plot_path", help="write a PNG chart of measured/goal here")
    bench.add_argument("--audit-events", type=int, metavar="N",
                       help="instead: write a log of about N events, then time `audit reconcile` and replay over it")
    bench.set_defaults(func=_cmd_bench)

    tok = sub.add_parser("token", help="mint an analyst or auditor token from the server secret")
    tok.add_argument("--role", choices=("analyst", "auditor"), required=True)
    tok.add_argument("--ttl", type=_duration, default=3600, help="lifetime, e.g. 30m, 1h (default 1h)")
    tok.add_argument("--subject", type=_uuid, help="who the token names (default: a fresh id)")
    tok.set_defaults(func=_cmd_token)
    adm = sub.add_parser("admin", help="operators: erase a user; run the sweeper once")
    adm_sub = adm.add_subparsers(dest="action", required=True)
    er = adm_sub.add_parser("erase", help="erase a user as DELETE /me does: jobs canceled and refunded, personal "
                            "fields' key destroyed, objects and webhooks deleted, tokens refused; the ledger "
                            "keeps its amounts (idempotent: finishes an erasure cut short)")
    er.add_argument("user_id", type=_uuid)
    adm_sub.add_parser("sweep", help="one sweeper pass now: expire jobs past PALETTE_RETENTION_DAYS (or "
                       "PALETTE_UNPAID_RETENTION_DAYS having spent nothing), finish erasures cut short, delete "
                       "late and oversized uploads")
    adm.set_defaults(func=_cmd_admin)
    return p


def _is_unreachable(e: BaseException) -> bool:
    import psycopg
    from eventsourcing.persistence import OperationalError

    return isinstance(e, (psycopg.OperationalError, OperationalError))


def _reason(e: BaseException) -> str:
    """The driver's last line (``password authentication failed for user ...``), a password
    in it masked (libpq quotes a connection string it cannot parse, or the host name an unescaped
    ``@`` in a password made), or the error's class."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    line = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", lines[-1].strip())
    line = re.sub(r'"[^"]*@[^"]*"', '"***"', line)  # a host name holding part of a URL's password
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", line, flags=re.IGNORECASE)[:200]


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # 141: what a shell shows for a tool stopped by a closed pipe


def _stdout_closed() -> bool:
    """Whether stdout's reader went away (a pipe whose reading end is closed polls as an error)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def _stdout_gone() -> int:
    """stdout's reader went away (`| head`): stop quietly, as Unix tools do. What is still
    buffered goes to /dev/null (Python's recipe), so the interpreter's last flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return SIGPIPE_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader gone away shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's peer went away, not stdout's reader
        return _stdout_gone()
    except (SettingsError, StackError) as e:
        print(f"palette {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if _is_unreachable(e):
            print(f"palette {args.command}: cannot reach PostgreSQL ({_reason(e)}); "
                  "is the stack up (`make run`) and PALETTE_DATABASE_URL right?", file=sys.stderr)
            return 3
        if isinstance(e, OSError) and e.filename is not None:  # a file we read or write
            print(f"palette {args.command}: {e.filename}: {e.strerror or e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
