"""Positions in PostgreSQL: each consumer's named position (the relay's, the projector's, the
dispatcher's, the webhooks'), the relay's schema (``palette_relay``), and the broker losses the
relay records, which every consumer of the broker watches (``LossSignal``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, LiteralString, Protocol, Self

import psycopg
from psycopg import sql

from adapters.ddl import run_locked

log = logging.getLogger(__name__)

RELAY_NAME = "palette.events"  # the live relay's name: its position and acknowledged offsets
DDL = (
    "CREATE SCHEMA IF NOT EXISTS palette_relay",
    "CREATE TABLE IF NOT EXISTS palette_relay.positions (name text PRIMARY KEY, position bigint NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    # A release before acknowledged offsets were kept left the relay's position alone: the broker
    # then held what it had published, and the broker started now (memory storage, the default) may
    # hold none of it. An offset acknowledged on partition 0 makes the live relay's (RELAY_NAME's) first probe tell.
    "DO $$ BEGIN IF to_regclass('palette_relay.acked_offsets') IS NULL THEN "
    "CREATE TABLE palette_relay.acked_offsets (name text NOT NULL, partition integer NOT NULL, "
    "acked bigint NOT NULL, PRIMARY KEY (name, partition)); "
    "INSERT INTO palette_relay.acked_offsets (name, partition, acked) SELECT name, 0, 0 "
    "FROM palette_relay.positions WHERE name = 'palette.events' AND position > 0; END IF; END $$",
    "CREATE TABLE IF NOT EXISTS palette_relay.broker_losses (id bigserial PRIMARY KEY, name text NOT NULL, "
    "republish_from bigint NOT NULL, detected_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS palette_relay.losses_handled (consumer text PRIMARY KEY, loss_id bigint NOT NULL)",
    # The consumer groups the relay saw reading a topic it starts afresh (adapters.rollover).
    "CREATE TABLE IF NOT EXISTS palette_relay.log_readers (topic text NOT NULL, reader text NOT NULL, "
    "seen_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (topic, reader))",
)


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """``DDL``, once, under a lock: the relay, projector, dispatcher and webhook consumer each run
    it as they start, and ``CREATE ... IF NOT EXISTS`` side by side on a fresh database fails
    with a unique violation on PostgreSQL's catalog (the process exited at its start)."""
    run_locked(conn, "palette-relay-ddl", DDL)


class _OwnConnection:
    """A connection of one's own to PostgreSQL that a database restart (or a pooler's or an idle
    timeout's kill) does not end for good: a statement that finds it dead runs once more on a fresh
    one (the statements here are idempotent: reads, upserts, an UPDATE to a value). A second
    failure (the database still away), or an error of the statement's own, is raised as before.
    Without ``conninfo`` the connection is someone else's, or holds what dies with it (the relay's
    session lock: ``RelayState.lead``), and is never replaced."""

    conn: psycopg.Connection[Any]
    conninfo: str | None

    def _execute(self, query: LiteralString | sql.Composed, params: Any = None) -> psycopg.Cursor[Any]:
        for attempt in (1, 2):
            if self.conninfo is not None and self.conn.closed:  # e.g. by a failure in a caller's statement
                self._reconnect()
            try:
                return self.conn.execute(query, params)
            except psycopg.OperationalError:
                if attempt == 2 or self.conninfo is None or not self.conn.broken:
                    raise
                log.warning("a connection to PostgreSQL was dead (a restart?): connecting again")
                self._reconnect()
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        assert self.conninfo is not None
        self.conn.close()
        self.conn = psycopg.connect(self.conninfo, autocommit=True)  # the database away: raised


# A session holding a lock others wait for ends once its peer is silent for 30 s, on both ends:
# keepalives from 10 s idle, every 5 s, 3 missed (25 s), and data unacknowledged for 30 s (a
# statement sent into a cut). With the system's TCP defaults the server sends its first keepalive
# after two idle hours, and keeps the lock until then. Over a Unix socket they are ignored.
# libpq's names; the server's are the same with ``tcp_`` before each keepalive's.
SILENT_PEER: dict[str, Any] = {"keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                               "tcp_user_timeout": 30_000}
_SERVER_SIDE = sql.SQL("SELECT {}").format(sql.SQL(", ").join(
    sql.SQL("set_config({}, {}, false)").format(sql.Literal(name if name.startswith("tcp_") else f"tcp_{name}"),
                                                sql.Literal(str(value)))
    for name, value in SILENT_PEER.items()))


def lock_holder(database_url: str) -> psycopg.Connection[Any]:
    """An autocommit connection for session locks, both of its ends set as ``SILENT_PEER`` says."""
    conn = psycopg.connect(database_url, autocommit=True, keepalives=1, **SILENT_PEER)
    conn.execute(_SERVER_SIDE)
    return conn


class Positions(Protocol):
    def get(self, name: str) -> int: ...
    def save(self, name: str, position: int) -> None: ...


class PgPositions(_OwnConnection):
    """Named positions in a PostgreSQL table keyed by ``key`` (with ``position`` and
    ``updated_at``): the relay's (``palette_relay.positions``) and the read store's. With
    ``conninfo`` (an autocommit connection of its own, to that database) a dead connection is
    replaced (``_OwnConnection``)."""

    def __init__(self, conn: psycopg.Connection[Any], table: tuple[str, str] = ("palette_relay", "positions"),
                 key: str = "name", conninfo: str | None = None) -> None:
        self.conn = conn
        self.conninfo = conninfo
        tbl, column = sql.Identifier(*table), sql.Identifier(key)
        self._select = sql.SQL("SELECT position FROM {} WHERE {} = %s").format(tbl, column)
        self._upsert = sql.SQL(
            "INSERT INTO {t} ({k}, position) VALUES (%s, %s) ON CONFLICT ({k}) "
            "DO UPDATE SET position = EXCLUDED.position, updated_at = now()").format(t=tbl, k=column)

    @classmethod
    def connect(cls, database_url: str) -> Self:
        """The relay's positions, on a connection of their own (the schema created if missing)."""
        conn = psycopg.connect(database_url, autocommit=True)
        ensure_schema(conn)
        return cls(conn, conninfo=database_url)

    def get(self, name: str) -> int:
        return self.find(name) or 0

    def find(self, name: str) -> int | None:
        """The saved position; None when none was ever saved."""
        row = self._execute(self._select, [name]).fetchone()
        return int(row[0]) if row else None

    def save(self, name: str, position: int) -> None:
        self._execute(self._upsert, [name, position])

    def close(self) -> None:
        self.conn.close()


class LossSignal(_OwnConnection):
    """What a consumer of the broker watches: the losses the relay recorded that this consumer
    (``name``) has not handled yet. Checked at most every ``every_s`` (one indexed query on a
    connection of its own); a loss counts as handled only once ``handled`` says so, so a consumer
    that crashes in its ``after_loss`` does it again after its restart. (What ``after_loss`` starts
    — a sweep, tasks sent again — is not awaited: the consumer's own sweeps cover the rest.) A
    connection that died with a database restart is replaced (``_OwnConnection``)."""

    def __init__(self, database_url: str, name: str, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.conninfo: str | None = database_url
        self.conn = psycopg.connect(database_url, autocommit=True)
        ensure_schema(self.conn)
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
        row = self._execute("SELECT max(id), min(republish_from) FROM palette_relay.broker_losses WHERE id > %s",
                                [self.seen]).fetchone()
        if row is not None and row[0] is not None:
            self._pending, self.republish_from = int(row[0]), int(row[1])
        return bool(self._pending)

    def published_offsets(self) -> tuple[int, dict[int, int]]:
        """The (live) relay's position and, by partition, the offset of the last of its messages
        the broker acknowledged up to there (saved in one statement: read here as one snapshot); an
        empty dict when it has none (a loss forgot them)."""
        rows = self._execute(
            "SELECT p.position, a.partition, a.acked FROM palette_relay.positions p LEFT JOIN "
            "palette_relay.acked_offsets a ON a.name = p.name WHERE p.name = %s", [RELAY_NAME]).fetchall()
        if not rows:
            return 0, {}
        return int(rows[0][0]), {int(partition): int(acked) for _, partition, acked in rows if partition is not None}

    def handled(self) -> None:
        """The pending losses are dealt with (recorded, so a restart does not do it again)."""
        if self._pending:
            self._execute("UPDATE palette_relay.losses_handled SET loss_id = %s WHERE consumer = %s",
                              [self._pending, self.name])
            self.seen, self._pending = self._pending, 0

    def close(self) -> None:
        self.conn.close()
