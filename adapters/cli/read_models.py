"""`palette projections`: the read models' positions and lag, their rebuild, their dead letters."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from adapters.cli.connect import event_store, running_settings
from domain.text import one_line

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands
    from application.services import PaletteApplication


def _cmd_projections(args: argparse.Namespace) -> int:
    import psycopg

    from projections import rebuild as rebuilding
    from projections import schema, store
    from projections.log import LogReader

    settings = running_settings()
    app = event_store(settings)
    url = settings.effective_database_url
    try:
        if args.action == "status":
            print(_projection_status(app, url))
        elif args.action == "rebuild":
            def progress(n: int) -> None:
                print(f"  folded {n:,} events...", file=sys.stderr, flush=True)

            try:
                report = rebuilding.rebuild(url, app.recorder, app.mapper.transcoder, args.name, progress)
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
                              f"\tposition {d['position']}\t{one_line(d['error'])}")
                else:
                    try:
                        result = store.resolve_dead_letter(conn, args.id, args.dlq_action,
                                                           LogReader(app.recorder, app.mapper.transcoder).stream_events)
                    except (LookupError, store.RebuildRunning) as e:
                        print(f"palette projections dlq: {e.args[0]}", file=sys.stderr)
                        return 2
                    print(f"{args.dlq_action}: applied {result.applied}, parked again {result.parked}")
    finally:
        app.close()
    return 0


def _projection_status(app: PaletteApplication, url: str) -> str:
    from datetime import UTC, datetime

    import psycopg

    from projections import schema, store
    from projections.log import events_table
    from projections.models import READ_MODELS
    from projections.stored_events import from_notification

    head = app.recorder.max_notification_id() or 0
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
            lag, oldest = store.unapplied(conn, model, events_table(app.recorder))
            lag_s = 0.0
            if oldest is not None:
                nxt = app.recorder.select_notifications(start=oldest, limit=1)
                lag_s = (now - from_notification(nxt[0], app.mapper.transcoder).timestamp).total_seconds()
            lines.append(f"{name:<16}{int(positions.get(name, 0)):>10}{lag:>12}{lag_s:>9.2f}")
    lines.append(f"dead letters (parked or held): {parked[0] if parked else 0}")
    return "\n".join(lines)


def add_commands(sub: Subcommands) -> None:
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
