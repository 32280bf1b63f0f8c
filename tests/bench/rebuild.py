"""Reading the whole log: `projections rebuild jobs_log` against a projector that commits once
per event, and `replay all` to JSON lines. Rebuild rates count the events the model folds (its
own streams' events), not the whole log: the rest is skipped in SQL and costs nearly nothing."""

from __future__ import annotations

import io
import statistics
import time

import psycopg

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from application.services import PaletteApplication
from domain.contracts.streams import stream_topics
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
        reports = [rebuild(url, app.recorder, app.mapper.transcoder, "jobs_log") for _ in range(prof.repeats)]
        results["rebuild_events"] = reports[-1].events
        results["rebuild_events_per_s"] = round(statistics.median(r.events / r.seconds for r in reports), 1)
        results["rebuild_log_events_per_s"] = round(statistics.median(r.events_per_s for r in reports), 1)
        # The naive projector: one transaction per event of the model's streams, into its own
        # tables (reading is untimed).
        topics = stream_topics(JOBS_LOG.stream_type)
        envelopes = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None, topics))
        envelopes = envelopes[: prof.naive_rebuild_events]
        with psycopg.connect(url, autocommit=True) as conn:
            for tbl in ("jobs_log__naive", "jobs_log_tracking__naive"):
                conn.execute(f"DROP TABLE IF EXISTS palette_read.{tbl}")  # fixed names of this module
            create_model_tables(conn, JOBS_LOG, "__naive")
            t0 = time.perf_counter()
            for env in envelopes:
                apply_batch(conn, [env], [JOBS_LOG], suffix="__naive", park=False)
            results["naive_rebuild_events_per_s"] = round(len(envelopes) / (time.perf_counter() - t0), 1)
        say(f"rebuild jobs_log {results['rebuild_events_per_s']:,.0f} folded events/s ({results['rebuild_events']:,} "
            f"job events; {results['rebuild_log_events_per_s']:,.0f}/s over the {results['rebuild_log_events']:,} "
            f"events of the log); one transaction per event {results['naive_rebuild_events_per_s']:,.0f} events/s "
            f"(first {len(envelopes):,} job events)")
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
