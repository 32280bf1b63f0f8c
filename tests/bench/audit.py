"""`palette bench --audit-events N`: a log of about N events, then the auditors' tools over it,
timed: rebuilding ``users`` and ``billing_events``, `audit reconcile` and `replay all`."""

from __future__ import annotations

import time

import psycopg

from adapters.bootstrap import event_store_env
from application.services import PaletteApplication
from tests.bench.core import make_backlog
from tests.bench.harness import Results, running_stack, say

EVENTS_PER_COMMAND = 2  # a mixed session: about 6 commands and 12 events


def bench_audit_at_scale(events: int) -> Results:
    from projections import audit
    from projections.rebuild import rebuild
    from projections.replay import Replayer

    results: Results = {"audit_events_target": events}
    with running_stack() as stack:
        settings = stack.settings
        say(f"writing ~{events:,} events")
        t0 = time.monotonic()
        make_backlog(settings, events // EVENTS_PER_COMMAND)
        app = PaletteApplication(env=event_store_env(settings, pool_size=2))
        try:
            results["audit_events"] = app.recorder.max_notification_id()
            say(f"{results['audit_events']:,} events written in {time.monotonic() - t0:.0f}s; building the "
                "billing projection (a rebuild folds exactly what the live projector would)")
            for name in ("users", "billing_events"):
                built = rebuild(settings.effective_database_url, app.recorder, app.mapper.transcoder, name)
                results[f"rebuild_{name}_seconds"] = round(built.seconds, 1)
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                t0 = time.monotonic()
                report = audit.reconcile(conn, app.recorder, app.mapper.transcoder)
                results["reconcile_seconds"] = round(time.monotonic() - t0, 1)
                results["reconcile_ok"] = report.ok
            t0 = time.monotonic()
            n = sum(1 for _ in Replayer(app).all_jsonl())
            results["replay_at_scale_events_per_s"] = round(n / (time.monotonic() - t0), 1)
        finally:
            app.close()
        say(f"reconcile over {results['audit_events']:,} events: {results['reconcile_seconds']}s "
            f"({'OK' if report.ok else 'DIFFERENCES'}); replay all to JSON lines (counted, not kept) "
            f"{results['replay_at_scale_events_per_s']:,.0f} events/s")
    return results
