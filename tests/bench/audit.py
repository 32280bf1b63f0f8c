"""`palette bench --audit-events N`: a log of about N events, then the auditors' tools over it,
timed: rebuilding ``users``, ``billing_events`` and ``jobs_log`` (the largest model) and `audit
reconcile` (each in a process of its own, whose peak memory growth is a figure too), and
`replay all`."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from application.services import PaletteApplication
from tests.bench import relay_rates
from tests.bench.core import make_backlog
from tests.bench.harness import Results, running_stack, say

EVENTS_PER_COMMAND = 2  # a mixed session: about 6 commands and 12 events


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux reports kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Start this process's peak resident memory (VmHWM) afresh at what it holds now, which is
    returned (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last ``reset_peak_rss``."""
    return _status_mib("VmHWM")


def reconcile_in_child(settings: Settings, out: Any) -> None:
    """`audit reconcile` as the command line runs it, in a fresh interpreter: its seconds, its
    verdict, and how far its peak resident memory rose above what the interpreter held before it."""
    from projections import audit

    app = PaletteApplication(env=event_store_env(settings, pool_size=2))
    try:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            before = reset_peak_rss()
            t0 = time.monotonic()
            report = audit.reconcile(conn, app.recorder, app.mapper.transcoder)
            seconds = time.monotonic() - t0
        out.put((seconds, report.ok, report.events, report.ledger_rows, peak_rss_mib() - before))
    finally:
        app.close()


def rebuild_in_child(settings: Settings, name: str, out: Any) -> None:
    """`palette projections rebuild NAME` in a fresh interpreter: its seconds, and how far its
    peak resident memory rose above what the interpreter held before it."""
    from projections.rebuild import rebuild

    app = PaletteApplication(env=event_store_env(settings, pool_size=2))
    try:
        before = reset_peak_rss()
        built = rebuild(settings.effective_database_url, app.recorder, app.mapper.transcoder, name)
        out.put((built.seconds, peak_rss_mib() - before))
    finally:
        app.close()


def bench_audit_at_scale(events: int) -> Results:
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
            say(f"{results['audit_events']:,} events written in {time.monotonic() - t0:.0f}s; rebuilding users, "
                "billing_events and jobs_log (a rebuild folds exactly what the live projector would)")
            for name in ("users", "billing_events", "jobs_log"):
                seconds, grew = relay_rates.in_own_process(rebuild_in_child, settings, name)
                results[f"rebuild_{name}_seconds"] = round(seconds, 1)
                results[f"rebuild_{name}_memory_growth_mib"] = round(grew, 1)
                say(f"rebuild {name}: {seconds:.1f}s, its process's peak memory {grew:,.0f} MiB above where it started")
            seconds, ok, user_events, ledger_rows, grew = relay_rates.in_own_process(reconcile_in_child, settings)
            results.update(reconcile_seconds=round(seconds, 1), reconcile_ok=ok, reconcile_user_events=user_events,
                           reconcile_ledger_rows=ledger_rows, reconcile_memory_growth_mib=round(grew, 1))
            t0 = time.monotonic()
            n = sum(1 for _ in Replayer(app).all_jsonl())
            results["replay_at_scale_events_per_s"] = round(n / (time.monotonic() - t0), 1)
        finally:
            app.close()
        say(f"reconcile over {results['audit_events']:,} events ({user_events:,} user events, {ledger_rows:,} ledger "
            f"rows): {results['reconcile_seconds']}s ({'OK' if ok else 'DIFFERENCES'}), its process's peak memory "
            f"{grew:,.0f} MiB above where it started; replay all to JSON lines (counted, not kept) "
            f"{results['replay_at_scale_events_per_s']:,.0f} events/s")
    return results
