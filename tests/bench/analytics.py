"""Analysts' export: `replay all --format parquet` over a generated log, timed, and its size
against `replay all` as JSON lines of the same log.

The log is the main log's events copied into schema ``analytics`` until it holds about the
asked number (each copy on new stream ids, every ten copies a day later, so that partitions by day
are exercised): real stored states in the real table layout, without hours of commands."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from application.services import PaletteApplication
from tests.bench.harness import Results, say

SCHEMA = "analytics"
QUICK_EVENTS = 200_000
FULL_EVENTS = 1_000_000
COPIES_PER_DAY = 10
# Where a stored state's date starts: states begin {"timestamp":{"_type_":"datetime_iso","_data_":"YYYY-MM-DD...
DATE_AT = len('{"timestamp":{"_type_":"datetime_iso","_data_":"') + 1


def make_log(settings: Settings, events: int) -> PaletteApplication:
    """An event store in schema ``analytics`` holding about ``events`` copies of the main log's
    events (the main log must not be empty)."""
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")  # a fixed identifier of this module
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    app = PaletteApplication(env=event_store_env(settings, pool_size=2, schema=SCHEMA))
    table = app.recorder.events_table_name  # type: ignore[attr-defined]  # the same name in every schema
    source, target = sql.Identifier("public", table), sql.Identifier(SCHEMA, table)
    with psycopg.connect(url, autocommit=True) as conn:
        (have,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(source)).fetchone() or (0,)
        if not have:
            raise RuntimeError("the main log is empty: write a backlog first")
        copies = max(1, -(-events // have))
        # Copy k: new stream ids, timestamps k // COPIES_PER_DAY days later (commit order kept).
        conn.execute(sql.SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state) "
            "SELECT md5(originator_id::text || k)::uuid, originator_version, topic, "
            "overlay(state placing convert_to(to_char(convert_from(substring(state from %s for 10), 'UTF8')::date "
            "+ k / %s, 'YYYY-MM-DD'), 'UTF8') from %s for 10) "
            "FROM generate_series(0, %s) AS k, {} ORDER BY k, notification_id").format(target, source),
            [DATE_AT, COPIES_PER_DAY, DATE_AT, copies - 1])
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(target))  # settled, as an old log's pages are
    return app


def bench_analytics(settings: Settings, events: int, results: Results, repeats: int = 3) -> None:
    """``parquet_export_events_per_s`` (median of ``repeats``) and ``parquet_vs_jsonl_size``
    (Parquet bytes / JSONL bytes) over a generated log of about ``events`` events."""
    from projections.parquet import export_log
    from projections.replay import Replayer

    say(f"generating a log of ~{events:,} events for the Parquet export")
    app = make_log(settings, events)
    out = Path(tempfile.mkdtemp(prefix="palette-parquet-"))
    try:
        rates = []
        for n in range(repeats):
            t0 = time.perf_counter()
            stats = export_log(app.recorder, app.mapper.transcoder, out / str(n))
            rates.append(stats.events / (time.perf_counter() - t0))
            shutil.rmtree(out / str(n))
        t0 = time.perf_counter()
        jsonl = sum(len(line) for line in Replayer(app).all_jsonl())
        jsonl_s = time.perf_counter() - t0
        results["parquet_export_events"] = stats.events
        results["parquet_export_events_per_s"] = round(statistics.median(rates), 1)
        results["parquet_bytes"] = stats.bytes
        results["jsonl_bytes"] = jsonl
        results["parquet_vs_jsonl_size"] = round(stats.bytes / jsonl, 4)
        say(f"parquet export {results['parquet_export_events_per_s']:,.0f} events/s (median of {repeats}) over "
            f"{stats.events:,} events ({stats.files} files, {stats.bytes / 1e6:.1f} MB); JSON lines "
            f"{stats.events / jsonl_s:,.0f} events/s, {jsonl / 1e6:.1f} MB: Parquet is "
            f"{results['parquet_vs_jsonl_size']:.1%} of the JSONL size")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        app.close()
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
