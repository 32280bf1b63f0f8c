"""Where the webhook consumer's sweep of the event log starts, on PostgreSQL."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import psycopg
from psycopg import sql

from adapters import kafka_io
from adapters.positions import RELAY_NAME, PgPositions
from adapters.settings import Settings
from adapters.webhooks import store
from adapters.webhooks.consumer import SWEEP, DeliveryRecorder, WebhookConsumer
from adapters.webhooks.events import EVENT_TYPES
from application.services import PaletteService
from infra.kafka_admin import ensure_topics
from projections.log import LogReader

from .test_projections import EDITS
from .test_stack import wait_until


def test_a_restart_keeps_a_sweep_that_is_still_at_the_start_of_the_log(settings: Settings) -> None:
    """A new group's sweep starts at the relay (the group reads the topic from its start); a
    restarted one goes on from its saved position, 0 included. Taking a saved 0 for "never saved"
    moved a consumer killed early in a chaos run past the events the broker had lost meanwhile:
    their webhooks were never sent."""
    schema = f"sweep_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.positions (name text PRIMARY KEY, position bigint NOT NULL, "
                             "updated_at timestamptz NOT NULL DEFAULT now())").format(sql.Identifier(schema)))
        try:
            positions = PgPositions(conn, (schema, "positions"))
            relay = [0]

            store.ensure_schema(conn)

            def start() -> None:
                none = cast(Any, None)
                WebhookConsumer(none, DeliveryRecorder(conn, none, none), none, none, positions,
                                published=lambda: relay[0])

            start()
            assert positions.find(SWEEP) == 0
            relay[0] = 50  # published on while the consumer was down, some of it lost by the broker
            start()
            assert positions.find(SWEEP) == 0
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


class _Sender:
    """The sender's side the consumer's step reaches (a wake-up): posting is not tested here."""

    def wake(self) -> None:
        pass


def test_a_new_group_records_the_events_a_log_started_afresh_before_its_first_start_no_longer_holds(
        apps: Any, service: PaletteService, settings: Settings) -> None:
    """The relay starts the broker's log afresh without waiting for a group that never started
    (adapters.rollover: what it missed reaches it through its own sweep). A webhook consumer's
    first start put its sweep at the relay's position, taking the broker's log to hold everything
    before: an endpoint registered while the webhook process had not started yet never got the
    deliveries of the jobs whose events were in the log started afresh since."""
    url = settings.effective_database_url
    schema, topic, group = (f"{prefix}_{uuid.uuid4().hex[:8]}" for prefix in ("sweep", "fresh", "webhooks"))
    with psycopg.connect(url, autocommit=True) as conn:
        store.ensure_schema(conn)
        user = service.register(f"hook-{uuid.uuid4()}", plan="pro").value[0]
        endpoint = store.create_endpoint(conn, user, "http://127.0.0.1:9/hooks", list(EVENT_TYPES.values()),
                                         "whsec_x", limit=10)["id"]
        job = service.create_job(user, "interior", 1).value
        service.confirm_upload(user, job)
        service.execute_job(user, job, EDITS, None, None)
        service.record_item_result(job, 0, "done", f"{job}:0")
        head = LogReader.of(service.app).head()
        relay = PgPositions.connect(url)
        wait_until(lambda: relay.get(RELAY_NAME) >= head, timeout_s=60, what="the relay to publish the job")
        # The broker's log as the relay leaves it once started afresh: none of those events in it.
        ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.positions (name text PRIMARY KEY, position bigint NOT NULL, "
                             "updated_at timestamptz NOT NULL DEFAULT now())").format(sql.Identifier(schema)))
        records = psycopg.connect(url, autocommit=True)
        log_reader = LogReader.of(service.app)
        consumer = WebhookConsumer(kafka_io.consumer(settings, group, topic),
                                   DeliveryRecorder(records, log_reader, service.app.repository.event_store),
                                   cast(Any, _Sender()), log_reader, PgPositions(conn, (schema, "positions")),
                                   published=lambda: relay.get(RELAY_NAME), sweep_every_s=0.01)

        def delivered() -> set[str]:
            consumer.step(timeout_ms=10)
            rows = conn.execute("SELECT event_type FROM palette_webhooks.deliveries WHERE endpoint_id = %s",
                                [endpoint]).fetchall()
            return {row[0] for row in rows}

        try:
            wait_until(lambda: {"job.queued", "item.completed", "job.finished"} <= delivered(), timeout_s=60,
                       what="the job's deliveries, recorded by the new group's sweep")
        finally:
            consumer.consumer.close()
            records.close()
            relay.close()
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_a_redelivered_or_swept_record_of_a_deleted_job_records_no_delivery(
        service: PaletteService, settings: Settings) -> None:
    """Deleting a job forgets its deliveries (they hold its public view): a record of it the
    broker delivers again, or the sweep reads, must not bring them back. A job kept beside it is
    recorded as usual."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)
        user = service.register(f"hook-{uuid.uuid4()}", plan="pro").value[0]
        endpoint = store.create_endpoint(conn, user, "http://127.0.0.1:9/deleted", list(EVENT_TYPES.values()),
                                         "whsec_x", limit=10)["id"]
        kept, deleted = (service.create_job(user, "interior", 1).value for _ in range(2))
        for job in (kept, deleted):
            service.confirm_upload(user, job)
            service.execute_job(user, job, EDITS, None, None)
            service.cancel_job(user, job)
        assert service.executor.execute(service.delete_job_command(user, deleted)).value is True
        records = [SimpleNamespace(stream_type="Job", type="JobCanceled", stream_id=job,
                                   version=service.executor.read(job).version) for job in (kept, deleted)]
        recorder = DeliveryRecorder(conn, LogReader.of(service.app), service.app.repository.event_store)
        try:
            recorder.record(cast(Any, records))
            jobs = conn.execute("SELECT DISTINCT job_id FROM palette_webhooks.deliveries WHERE endpoint_id = %s",
                                [endpoint]).fetchall()
            assert jobs == [(kept,)]
        finally:
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])
