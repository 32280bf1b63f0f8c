"""Positions in PostgreSQL: each consumer's named position (the relay's, the projector's, the
dispatcher's, the webhooks'), the relay's schema (``palette_relay``), and the broker losses the
relay records, which every consumer of the broker watches (``LossSignal``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, Self

import psycopg
from psycopg import sql

RELAY_NAME = "palette.events"  # the live relay's name: its position and acknowledged offsets
DDL = (
    "CREATE SCHEMA IF NOT EXISTS palette_relay",
    "CREATE TABLE IF NOT EXISTS palette_relay.positions (name text PRIMARY KEY, position bigint NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS palette_relay.acked_offsets (name text NOT NULL, partition integer NOT NULL, "
    "acked bigint NOT NULL, PRIMARY KEY (name, partition))",
    "CREATE TABLE IF NOT EXISTS palette_relay.broker_losses (id bigserial PRIMARY KEY, name text NOT NULL, "
    "republish_from bigint NOT NULL, detected_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS palette_relay.losses_handled (consumer text PRIMARY KEY, loss_id bigint NOT NULL)",
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
    def connect(cls, database_url: str) -> Self:
        """The relay's positions, on a connection of their own (the schema created if missing)."""
        conn = psycopg.connect(database_url, autocommit=True)
        for statement in DDL:
            conn.execute(statement)
        return cls(conn)

    def get(self, name: str) -> int:
        return self.find(name) or 0

    def find(self, name: str) -> int | None:
        """The saved position; None when none was ever saved."""
        row = self.conn.execute(self._select, [name]).fetchone()
        return int(row[0]) if row else None

    def save(self, name: str, position: int) -> None:
        self.conn.execute(self._upsert, [name, position])

    def close(self) -> None:
        self.conn.close()


class LossSignal:
    """What a consumer of the broker watches: the losses the relay recorded that this consumer
    (``name``) has not handled yet. Checked at most every ``every_s`` (one indexed query on a
    connection of its own); a loss counts as handled only once ``handled`` says so, so a consumer
    that crashes in its ``after_loss`` does it again after its restart. (What ``after_loss`` starts
    — a sweep, tasks sent again — is not awaited: the consumer's own sweeps cover the rest.)"""

    def __init__(self, database_url: str, name: str, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True)
        for statement in DDL:
            self.conn.execute(statement)
        self.name = name
        self.every_s = every_s
        self.clock = clock
        self._next = 0.0
        # A consumer seen for the first time starts from the losses recorded so far.
        self.conn.execute(
            "INSERT INTO palette_relay.losses_handled (consumer, loss_id) "
            "SELECT %s, coalesce(max(id), 0) FROM palette_relay.broker_losses ON CONFLICT (consumer) DO NOTHING",
            [name])
        row = self.conn.execute("SELECT loss_id FROM palette_relay.losses_handled WHERE consumer = %s",
                                [name]).fetchone()
        self.seen = int(row[0]) if row else 0
        self._pending = 0
        self.republish_from = 0  # of the pending losses: the relay publishes again from here

    def new_loss(self) -> bool:
        """Whether a loss this consumer has not handled was recorded (then call ``handled``)."""
        if self.clock() < self._next:
            return False
        self._next = self.clock() + self.every_s
        if self._pending:  # not handled yet (it failed): once an interval, as a new one
            return True
        row = self.conn.execute("SELECT max(id), min(republish_from) FROM palette_relay.broker_losses WHERE id > %s",
                                [self.seen]).fetchone()
        if row is not None and row[0] is not None:
            self._pending, self.republish_from = int(row[0]), int(row[1])
        return bool(self._pending)

    def published_offsets(self) -> tuple[int, dict[int, int]]:
        """The (live) relay's position and, by partition, the offset of the last of its messages
        the broker acknowledged up to there (saved in one statement: read here as one snapshot); an
        empty dict when it has none (a loss forgot them)."""
        rows = self.conn.execute(
            "SELECT p.position, a.partition, a.acked FROM palette_relay.positions p LEFT JOIN "
            "palette_relay.acked_offsets a ON a.name = p.name WHERE p.name = %s", [RELAY_NAME]).fetchall()
        if not rows:
            return 0, {}
        return int(rows[0][0]), {int(partition): int(acked) for _, partition, acked in rows if partition is not None}

    def handled(self) -> None:
        """The pending losses are dealt with (recorded, so a restart does not do it again)."""
        if self._pending:
            self.conn.execute("UPDATE palette_relay.losses_handled SET loss_id = %s WHERE consumer = %s",
                              [self._pending, self.name])
            self.seen, self._pending = self._pending, 0

    def close(self) -> None:
        self.conn.close()
