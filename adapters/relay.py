"""The relay (transactional outbox): event store notification log -> Kafka ``palette.events``.

Publishes in notification order, keyed by stream id (one partition per stream keeps its order),
and records its position in PostgreSQL only after the broker acknowledged. At-least-once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import sql

from domain.contracts.envelope import EventEnvelope, encode_notification, from_notification
from domain.contracts.topics import EVENTS as EVENTS_TOPIC

log = logging.getLogger("palette.relay")
RELAY_NAME = "palette.events"
DDL = (
    "CREATE SCHEMA IF NOT EXISTS palette_relay",
    "CREATE TABLE IF NOT EXISTS palette_relay.positions (name text PRIMARY KEY, position bigint NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
)


class Positions(Protocol):
    def get(self, name: str) -> int: ...
    def save(self, name: str, position: int) -> None: ...


class PgPositions:
    """Named positions in a PostgreSQL table keyed by ``key`` (with ``position`` and
    ``updated_at``): the relay's (``palette_relay.positions``) and the read store's."""

    def __init__(self, conn: psycopg.Connection[Any], table: tuple[str, str] = ("palette_relay", "positions"),
                 key: str = "name") -> None:
        self.conn = conn
        tbl, column = sql.Identifier(*table), sql.Identifier(key)
        self._select = sql.SQL("SELECT position FROM {} WHERE {} = %s").format(tbl, column)
        self._upsert = sql.SQL(
            "INSERT INTO {t} ({k}, position) VALUES (%s, %s) ON CONFLICT ({k}) "
            "DO UPDATE SET position = EXCLUDED.position, updated_at = now()").format(t=tbl, k=column)

    @classmethod
    def connect(cls, database_url: str) -> PgPositions:
        """The relay's positions, on a connection of their own (the schema created if missing)."""
        conn = psycopg.connect(database_url, autocommit=True)
        for statement in DDL:
            conn.execute(statement)
        return cls(conn)

    def get(self, name: str) -> int:
        row = self.conn.execute(self._select, [name]).fetchone()
        return int(row[0]) if row else 0

    def save(self, name: str, position: int) -> None:
        self.conn.execute(self._upsert, [name, position])

    def close(self) -> None:
        self.conn.close()


class Relay:
    def __init__(self, app: Any, producer: Any, positions: Positions, name: str = RELAY_NAME,
                 topic: str = EVENTS_TOPIC, batch_size: int = 2000,
                 on_acked: Callable[[list[EventEnvelope]], None] | None = None) -> None:
        self.app = app  # owns the recorder's connection pool
        self.recorder = app.recorder
        self.transcoder = app.mapper.transcoder
        self.producer = producer
        self.positions = positions
        self.name = name
        self.topic = topic
        self.batch_size = batch_size
        self.published = 0
        self.acked = 0
        self._in_flight: tuple[int, list[Any], Any] | None = None
        self.on_acked = on_acked  # measurement hook (commit-to-ack latency in the benchmark)

    def position(self) -> int:
        return self.positions.get(self.name)

    def step(self, position: int) -> int:
        """Publish the next batch after ``position`` and return the position published up to.

        Pipelined: the batch just sent is acknowledged while the next one is read and encoded;
        the saved position only ever covers acknowledged events (``acked``)."""
        notifications = self.recorder.select_notifications(start=position + 1, limit=self.batch_size)
        if not notifications:
            self.drain()
            return position
        futures = [
            self.producer.send(self.topic, key=str(n.originator_id).encode(),
                               value=encode_notification(n, self.transcoder))
            for n in notifications
        ]
        self.drain()  # the previous batch: its acks arrived while this one was read and sent
        self._in_flight = (int(notifications[-1].id), futures, notifications)
        return int(notifications[-1].id)

    def drain(self) -> None:
        """Wait for the batch in flight to be acknowledged, then record its position."""
        if self._in_flight is None:
            return
        last, futures, notifications = self._in_flight
        self.producer.flush()
        for f in futures:
            f.get(timeout=30)  # raises if the broker did not acknowledge: the position stays put
        self.positions.save(self.name, last)
        self.acked = last
        self._in_flight = None
        self.published += len(futures)
        if self.on_acked is not None:
            self.on_acked([from_notification(n, self.transcoder) for n in notifications])

    def warm_up(self, stop: threading.Event) -> None:
        """The relay is ready once its position table answers."""
        self.position()

    def run(self, stop: threading.Event, idle_s: float = 0.005, max_idle_s: float = 0.02) -> None:
        position = self.position()
        log.warning("relay starting after position %d", position)
        wait = idle_s
        while not stop.is_set():
            new_position = self.step(position)
            if new_position == position:
                # Polling the log (an indexed, empty query); backing off a little when idle keeps
                # the relay off the CPU without costing more than ~20 ms of latency.
                time.sleep(wait)
                wait = min(max_idle_s, wait * 1.5)
            else:
                wait = idle_s
            position = new_position
        self.drain()  # SIGTERM: what was sent is acknowledged and recorded before exiting

    def close(self) -> None:
        self.producer.close()
        close = getattr(self.positions, "close", None)
        if close is not None:
            close()
        self.app.close()
