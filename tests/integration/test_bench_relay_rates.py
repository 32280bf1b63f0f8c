"""The relay's backlog figure (tests/bench/relay_rates.py), measured in a process of its own on the
session's stack: the relay it times publishes the whole log, its position ends at the head, and
its figure counts the events it published."""

from __future__ import annotations

import uuid

import psycopg
from psycopg import sql

from adapters.bootstrap import open_event_store
from adapters.positions import DDL
from adapters.settings import Settings
from application.services import PaletteService
from infra.kafka_admin import ensure_topics
from projections.log import events_table
from tests.bench import relay_rates


def test_the_timed_relay_publishes_the_whole_log_and_records_its_position(
        settings: Settings, service: PaletteService) -> None:
    user = service.register(f"rates-{uuid.uuid4().hex}").value[0]
    app = open_event_store(settings, pool_size=1)
    try:
        table = events_table(app.recorder)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            # Positions no event holds, as a rolled-back insert leaves them: the log's head is
            # past its count of events.
            conn.execute(sql.SQL("SELECT nextval(pg_get_serial_sequence(%s, 'notification_id')) "
                                 "FROM generate_series(1, 5)"), [table.as_string(conn)])
        service.create_job(user, "interior", 2)
        head = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    topic = f"test.relay-rates.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], settings.kafka_partitions)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        for statement in DDL:  # the relay's tables, as any relay makes them
            conn.execute(statement)
        before = {name for (name,) in conn.execute("SELECT name FROM palette_relay.positions").fetchall()}
        published, rate = relay_rates.in_own_process(relay_rates.relay_rate, settings, topic)
        after: dict[str, int] = dict(conn.execute("SELECT name, position FROM palette_relay.positions").fetchall())
        [name] = set(after) - before  # the timed relay's own position, saved once the broker acknowledged
        (events,) = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE notification_id <= %s").format(table),
                                 [after[name]]).fetchone() or (0,)
    assert name.startswith("bench-") and after[name] >= head
    assert published == events < after[name] and rate > 0  # the events it published, the figure's count
