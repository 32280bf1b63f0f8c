"""The analysts' commands: `palette replay` (streams, the log, state as of a point), `palette
export` (a read model as Parquet) and `palette query` (one SELECT in DuckDB)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.cli.arguments import path_value, row_limit, time_value, uuid_value
from adapters.cli.connect import erased_users, event_store, running_settings
from adapters.cli.outputs import progress_lines, with_progress
from domain.contracts.envelope import MAX_POSITION
from domain.text import one_line

if TYPE_CHECKING:
    from collections.abc import Iterator

    from adapters.cli.arguments import Subcommands
    from domain.contracts.envelope import EventEnvelope
    from projections.replay import Replayer


def _cmd_replay(args: argparse.Namespace) -> int:
    from projections.replay import Replayer

    if why := _replay_refused(args):
        print(why, file=sys.stderr)
        return 2
    settings = running_settings()
    app = event_store(settings)
    replayer = Replayer(app, erased_users(settings))
    try:
        if args.action == "state":
            return _replay_state(args, replayer)
        if args.action == "stream":
            return _replay_stream(args, replayer)
        if args.format == "parquet":
            return _replay_parquet(args, app, replayer)
        return _replay_all(args, replayer)
    finally:
        app.close()


def _replay_refused(args: argparse.Namespace) -> str | None:
    """Why the command line asks for what no replay can give, said before a setting is read or the store opened."""
    if getattr(args, "out", None) is not None and args.format != "parquet":
        return (f"palette replay all: --out is for --format parquet; {args.format} goes to stdout "
                f"(redirect it: > FILE)")
    if args.action == "state" and args.version is not None and args.version < 1:
        return f"palette replay state: --version must be 1 or more, not {args.version}"
    if args.action == "all" and (why := _bad_window(args.from_position, args.since, args.until)):
        return f"palette replay all: {why}"
    return None


def _replay_state(args: argparse.Namespace, replayer: Replayer) -> int:
    """A stream folded to a version or a time, as JSON; one it never had is exit 2, not an empty state."""
    import json

    try:  # no such stream, none of its events by then, or not that many versions
        state = replayer.state(args.id, version=args.version, as_of=args.as_of)
    except LookupError as e:
        print(f"palette replay state: {e.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(state, indent=2))
    return 0


def _replay_stream(args: argparse.Namespace, replayer: Replayer) -> int:
    """One stream's events; an unknown stream is exit 2, not an empty answer."""
    try:
        envelopes = replayer.existing_stream(args.id)
    except LookupError as e:
        print(f"palette replay stream: {e.args[0]}", file=sys.stderr)
        return 2
    _write_envelopes(envelopes, args.format)
    return 0


def _replay_all(args: argparse.Namespace, replayer: Replayer) -> int:
    """The log from --from, of --type, in --since/--until; unwindowed JSON lines go out as stored, never decoded."""
    out = sys.stdout
    try:
        if args.format == "jsonl" and args.since is None and args.until is None:
            for line in with_progress(replayer.all_jsonl(args.from_position, args.type or None)):
                out.buffer.write(line)
            out.flush()
            return 0
        envelopes = replayer.all(start=args.from_position, since=args.since, until=args.until,
                                 types=args.type or None)
        envelopes = with_progress(envelopes)
    except ValueError as e:
        print(f"palette replay all: {e}", file=sys.stderr)
        return 2
    _write_envelopes(envelopes, args.format)
    return 0


def _write_envelopes(envelopes: Iterator[EventEnvelope], fmt: str) -> None:
    """Events on stdout as CSV text or as JSON lines (bytes: UTF-8 whatever the locale)."""
    from projections.replay import as_csv, as_jsonl

    out = sys.stdout
    if fmt == "csv":
        for line in as_csv(envelopes):
            out.write(line)
    else:
        for chunk in as_jsonl(envelopes):
            out.buffer.write(chunk)
    out.flush()


def _bad_window(from_position: int, since: datetime | None, until: datetime | None) -> str | None:
    """Why ``replay all``'s window holds nothing by construction (None: it may hold events)."""
    if not 1 <= from_position <= MAX_POSITION:
        return f"--from must be a notification id (1 to {MAX_POSITION:,}), not {from_position}"
    if since is not None and until is not None and until < since:
        return "the period's end (--until) must be after its start (--since)"
    return None


def _replay_parquet(args: argparse.Namespace, app: Any, replayer: Any) -> int:
    from projections.parquet import ExportError, export_log

    if args.out is None:
        print("palette replay all: --format parquet writes a dataset: give --out DIR", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        start = max(args.from_position, replayer.position_at(args.since) if args.since else 1)
        stats = export_log(app.recorder, app.mapper.transcoder, args.out, start, args.since, args.until,
                           args.type or None, progress_lines("events"), replayer.erased)
    except (ExportError, OSError) as e:
        return _not_exported("palette replay all", args.out, e)
    seconds = time.monotonic() - t0
    print(f"wrote {stats.events:,} events in {seconds:.1f}s ({stats.events / max(seconds, 1e-9):,.0f}/s) to "
          f"{args.out}: {len(stats.partitions)} partitions (type, day), {stats.files} files, "
          f"{stats.bytes / 1e6:.1f} MB", file=sys.stderr)
    if stats.unreadable or stats.nulled:  # a null reads as a field never there: said, not left to be found
        print(f"palette replay all: {stats.unreadable:,} event(s) read whose stored state cannot be decoded (at "
              f"1970-01-01, every field null) and {stats.nulled:,} field(s) of another type than their column "
              "(null there); `palette replay stream ID` shows them as stored", file=sys.stderr)
    return 0


def _not_exported(command: str, out: Path, e: Exception) -> int:
    """An export refused (projections.parquet.ExportError) or a file it could not write: one line, exit 2."""
    if isinstance(e, OSError):
        print(f"{command}: cannot write {one_line(e.filename or out)}: {e.strerror or e}", file=sys.stderr)
    else:
        print(f"{command}: {e}", file=sys.stderr)
    return 2


def _cmd_export(args: argparse.Namespace) -> int:
    import psycopg

    from adapters.keyring import all_erased
    from projections.parquet import ExportError, export_table

    settings = running_settings()
    with psycopg.connect(settings.effective_database_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            with conn.transaction():
                stats = export_table(conn, args.name, args.out, all_erased(conn), progress_lines("rows"))
        except (ExportError, OSError) as e:
            return _not_exported("palette export", args.out, e)
    print(f"exported {args.name}: {stats.events:,} rows to {args.out / args.name} ({stats.bytes / 1e6:.2f} MB)",
          file=sys.stderr)
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from adapters.query import QueryError, render, run

    settings = running_settings()
    try:
        result = run(args.sql, args.data, None if args.no_db else settings.effective_database_url, args.limit,
                     args.timeout)
        text = render(result, args.format)
    except QueryError as e:
        print(f"palette query: {e}", file=sys.stderr)
        return 2
    # UTF-8 whatever the locale's encoding, as replay's lines are: print() in a latin-1 or ASCII
    # locale met a client's emoji (a concept name, say) as a UnicodeEncodeError, a traceback
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode() + b"\n")
    if result.truncated:
        print(f"palette query: showing the first {args.limit:,} rows (--limit N for more)", file=sys.stderr)
    return 0


def add_commands(sub: Subcommands) -> None:
    replay = sub.add_parser("replay", help="analysts: replay streams or the log; state as of a point")
    rsub = replay.add_subparsers(dest="action", required=True)
    rs = rsub.add_parser("stream", help="one stream's events in version order")
    rs.add_argument("id", type=uuid_value)
    ra = rsub.add_parser("all", help="the global log in commit order")
    ra.add_argument("--from", dest="from_position", type=int, default=1, help="first notification id")
    ra.add_argument("--since", type=time_value, metavar="TIME", help="first event time (ISO-8601; no offset: UTC)")
    ra.add_argument("--until", type=time_value, metavar="TIME", help="last event time (ISO-8601; no offset: UTC)")
    ra.add_argument("--type", action="append", help="only these event types (repeatable)")
    rs.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    ra.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                    help="parquet: a dataset under --out partitioned by event type and day "
                    "(type=<Event>/day=<date>/), each event's data as typed columns")
    ra.add_argument("--out", type=path_value,
                    help="the Parquet dataset's directory (--format parquet; must not hold one)")
    rst = rsub.add_parser("state", help="an aggregate's state folded up to a version or a time")
    rst.add_argument("id", type=uuid_value)
    point = rst.add_mutually_exclusive_group(required=True)
    point.add_argument("--version", type=int, help="fold the stream's events up to this version (1 or more)")
    point.add_argument("--as-of", type=time_value, metavar="TIME",
                       help="fold its events stamped at or before this time (ISO-8601; no offset: UTC)")
    replay.set_defaults(func=_cmd_replay)

    exp = sub.add_parser("export", help="analysts: a read model as Parquet (one read-only snapshot)")
    exp.add_argument("name", choices=("jobs_log", "job_items_log", "billing_events", "users", "rules"))
    exp.add_argument("--format", choices=("parquet",), default="parquet")
    exp.add_argument("--out", type=path_value, required=True, help="writes OUT/<name>/part-00000.parquet")
    exp.set_defaults(func=_cmd_export)

    qry = sub.add_parser("query", help="analysts: one SQL SELECT (DuckDB) over Parquet exports and the read models",
                         description="Views: one per event type (JobCreated, ...) and `events` over the dataset of "
                         "`palette replay all --format parquet --out DIR`, and each read model exported under DIR "
                         "by `palette export`. A read model the SQL names without an export is loaded from "
                         "PostgreSQL via psycopg in one read-only transaction (DuckDB's postgres extension would "
                         "need a download at runtime). Only a single SELECT runs; file access is confined to DIR.")
    qry.add_argument("sql", help='e.g. "SELECT preset, count(*) FROM JobCreated GROUP BY 1"')
    qry.add_argument("--data", type=path_value, help="the directory of the Parquet exports")
    qry.add_argument("--format", choices=("table", "csv", "json"), default="table")
    qry.add_argument("--limit", type=row_limit, default=1000, help="at most this many rows (default 1000)")
    qry.add_argument("--no-db", action="store_true", help="never connect to PostgreSQL")
    qry.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                     help="interrupt the query after this long (default 300; 0: no limit)")
    qry.set_defaults(func=_cmd_query)
