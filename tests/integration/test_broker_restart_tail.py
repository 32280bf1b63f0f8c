"""A broker restarted empty has forgotten the projector's consumer group, and the embedded broker
takes half a session timeout to let a member join again: the projector does not wait for it.
Once the relay has recorded the loss, the projector folds what the relay has published straight
from the event log (never past it), until its consumer has partitions again and delivers; the
broker's copies of what it folded that way are dropped before the database (they would change
nothing either)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from adapters import kafka_io
from adapters.bootstrap import build_relay
from adapters.projector import PgReadStore, Projector
from adapters.settings import Settings
from application.services import PaletteService
from infra.kafka_admin import ensure_topics
from projections.log import LogReader

from .test_relay_sweep import job_positions, new_job, reader, store  # noqa: F401 - fixtures
from .test_stack import wait_until


def test_after_a_loss_the_projector_tails_the_event_log_until_the_broker_delivers_again(
        settings: Settings, service: PaletteService, conn: psycopg.Connection[Any], store: PgReadStore,  # noqa: F811
        reader: LogReader) -> None:  # noqa: F811
    topic = f"test.tail.{uuid.uuid4().hex[:8]}"  # the restarted broker's log: empty, the group unknown
    ensure_topics(settings.effective_kafka_bootstrap, [topic], settings.kafka_partitions)
    published = [reader.head()]  # how far the relay has published
    projector = Projector(kafka_io.consumer(settings, f"test-tail-{uuid.uuid4().hex[:8]}", topic), store, reader,
                          published=lambda: published[0], sweep_every_s=3600.0)
    relay = build_relay(settings, name=f"test-tail-{uuid.uuid4().hex[:8]}", topic=topic)
    start = published[0]
    try:
        # In the group first: how long the embedded broker takes to let a member in varies (5 s to
        # over a minute here, rejoining after a metadata update), and is not what is tested.
        wait_until(lambda: (projector.consumer.poll(100), projector.consumer.assignment())[1], timeout_s=180,
                   what="the consumer to join its group")
        projector.after_loss(republish_from=start + 1)  # the relay saw the loss: everything before is folded
        job = new_job(service)
        positions = job_positions(conn, job)
        for _ in range(3):  # not published yet: the tail stays behind the relay
            projector.step()
        assert projector.caught_up_to == start
        published[0] = head = reader.head()

        def tailed() -> bool:
            projector.step()
            return projector.caught_up_to >= head

        wait_until(tailed, timeout_s=30, what="the projector to fold what the relay published, from the event log")
        assert projector.tailing and positions[-1] <= head
        row = conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s", [job]).fetchone()
        assert row is not None and row[0] == "created"

        relay.positions.save(relay.name, start)  # the relay publishes them to the broker, then a later job
        position = start
        later = new_job(service)
        later_head = reader.head()
        while position < later_head:
            before, position = position, relay.step(position)
            assert position > before, "the relay stopped short of the log's head"
        relay.drain()

        def delivered_again() -> bool:
            projector.step()
            return not projector.tailing

        wait_until(delivered_again, timeout_s=120, what="the consumer to deliver past the tail")
        assert projector.caught_up_to == head  # the tail never went past what the relay had published

        def later_folded() -> bool:
            projector.step()
            return conn.execute("SELECT 1 FROM palette_read.jobs_log WHERE id = %s", [later]).fetchone() is not None

        wait_until(later_folded, timeout_s=30, what="the later job, delivered by the broker, folded")
    finally:
        relay.close()
        projector.consumer.close()
        conn.execute("DELETE FROM palette_relay.positions WHERE name = %s", [relay.name])
