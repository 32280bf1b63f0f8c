"""Reading the whole log: `projections rebuild jobs_log` against a projector that commits once
per event, and `replay all` to JSON lines."""

from __future__ import annotations

import io
import statistics
import time

import psycopg

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from application.services import PaletteApplication
from tests.bench.harness import Profile, Results, say


def bench_rebuild_and_replay(settings: Settings, prof: Profile, results: Results) -> None:
    from projections.models.jobs_log import JOBS_LOG
    from projections.rebuild import iter_envelopes, rebuild
    from projections.replay import Replayer
    from projections.schema import create_model_tables
    from projections.store import apply_batch

    app = PaletteApplication(env=event_store_env(settings, pool_size=2))
    url = settings.effective_database_url
    try:
        results["rebuild_log_events"] = app.recorder.max_notification_id() or 0
        rates = [rebuild(url, app.recorder, app.mapper.transcoder, "jobs_log").events_per_s
                 for _ in range(prof.repeats)]
        results["rebuild_events_per_s"] = round(statistics.median(rates), 1)
        # The naive projector: one transaction per event, into its own tables (reading is untimed).
        envelopes = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))[: prof.naive_rebuild_events]
        with psycopg.connect(url, autocommit=True) as conn:
            for tbl in ("jobs_log__naive", "jobs_log_tracking__naive"):
                conn.execute(f"DROP TABLE IF EXISTS palette_read.{tbl}")  # fixed names of this module
            create_model_tables(conn, JOBS_LOG, "__naive")
            t0 = time.perf_counter()
            for env in envelopes:
                apply_batch(conn, [env], [JOBS_LOG], suffix="__naive", park=False)
            results["naive_rebuild_events_per_s"] = round(len(envelopes) / (time.perf_counter() - t0), 1)
        say(f"rebuild jobs_log {results['rebuild_events_per_s']:,.0f} log events/s over "
            f"{results['rebuild_log_events']:,} events; one transaction per event "
            f"{results['naive_rebuild_events_per_s']:,.0f} log events/s (first {len(envelopes):,})")
        replay_rates = []
        sink = io.BytesIO()
        for _ in range(prof.repeats):
            sink.seek(0)
            sink.truncate()
            t0 = time.perf_counter()
            n = 0
            for chunk in Replayer(app).all_jsonl():
                sink.write(chunk)
                n += 1
            replay_rates.append(n / (time.perf_counter() - t0))
        results["replay_events_per_s"] = round(statistics.median(replay_rates), 1)
        say(f"replay all to JSON lines (in memory) {results['replay_events_per_s']:,.0f} events/s")
    finally:
        app.close()
