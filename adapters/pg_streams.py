"""The application's StreamLoader and StreamVersions ports on eventsourcing's PostgreSQL events
table, and its events inserted in one round trip."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing import postgres
from eventsourcing.application import Application
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresApplicationRecorder
from psycopg import sql
from psycopg_pool import PoolTimeout

from adapters.per_loop import of_running_loop
from application.executors import snapshot_recorder
from application.ports import VersionUnknown

log = logging.getLogger(__name__)


class PostgresFactory(postgres.PostgresFactory):
    """eventsourcing's, its pool given the database URL's other libpq parameters before it first
    connects (``POSTGRES_URL_PARAMETERS``, JSON: ``sslmode``, ``sslrootcert``, keepalives, …):
    eventsourcing's settings name the target alone, and its pool connected with libpq's defaults
    whatever else the URL said (``sslmode=prefer`` where it said ``verify-full``)."""

    POSTGRES_URL_PARAMETERS = "POSTGRES_URL_PARAMETERS"

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        kwargs = self.datastore.pool.kwargs
        assert isinstance(kwargs, dict)  # as eventsourcing makes it
        kwargs.update(json.loads(self.env.get(self.POSTGRES_URL_PARAMETERS) or "{}"))


class PgStreamLoader:
    """New events of any number of streams in ONE query (the group committer's prefetch), from
    each stream's newest snapshot where it has one (``snapshots``: their recorder, if any)."""

    def __init__(self, recorder: PostgresAggregateRecorder,
                 snapshots: PostgresAggregateRecorder | None = None) -> None:
        self._datastore = recorder.datastore
        events = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)
        # LATERAL: one index range scan per stream, whatever the planner guesses for unnest()
        # (a hash join would scan the whole events table as it grows). Names are identifiers,
        # values are parameters.
        self._query = sql.SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            "FROM unnest(%b::uuid[], %b::int[]) AS v(id, ver) CROSS JOIN LATERAL ("
            " SELECT originator_id, originator_version, topic, state FROM {}"
            " WHERE originator_id = v.id AND originator_version > v.ver ORDER BY originator_version) e"
        ).format(events)
        # The same from snapshots: each stream's newest snapshot past the version given, if any
        # (``s``, read twice, so computed once), then its events from its version on (that one
        # too: the caller checks the snapshot agrees with it); both kinds of row in one answer,
        # told apart by the first column. A stream without snapshots costs one probe of the
        # snapshots' primary key. A snapshot counts only where the stream has an event of its
        # version: one past the stream's end (a store restored behind its snapshots) is not the
        # stream's state.
        self._since_snapshots = None if snapshots is None else sql.SQL(
            "WITH v AS (SELECT * FROM unnest(%b::uuid[], %b::int[]) AS v(id, ver)), "
            "s AS (SELECT v.id, s.originator_version, s.topic, s.state FROM v CROSS JOIN LATERAL ("
            " SELECT originator_version, topic, state FROM {snapshots} n"
            " WHERE originator_id = v.id AND originator_version > v.ver AND EXISTS (SELECT 1 FROM {events} x"
            "  WHERE x.originator_id = v.id AND x.originator_version = n.originator_version)"
            " ORDER BY originator_version DESC LIMIT 1) s) "
            "SELECT true AS snapshot, id AS originator_id, originator_version, topic, state FROM s "
            "UNION ALL "
            "SELECT false, e.originator_id, e.originator_version, e.topic, e.state "
            "FROM v LEFT JOIN s ON s.id = v.id CROSS JOIN LATERAL ("
            " SELECT originator_id, originator_version, topic, state FROM {events}"
            " WHERE originator_id = v.id AND originator_version > coalesce(s.originator_version - 1, v.ver)"
            " ORDER BY originator_version) e"
        ).format(snapshots=sql.Identifier(snapshots.datastore.schema, snapshots.events_table_name), events=events)

    def newer_than(self, versions: Mapping[UUID, int]) -> list[StoredEvent]:
        if not versions:
            return []
        return _stored(self._fetch(self._query, [list(versions), list(versions.values())]))

    def since_snapshots(self, versions: Mapping[UUID, int]) -> tuple[list[StoredEvent], list[StoredEvent]]:
        if self._since_snapshots is None or not versions:
            return [], self.newer_than(versions)
        rows = self._fetch(self._since_snapshots, [list(versions), list(versions.values())])
        return _stored(r for r in rows if r["snapshot"]), _stored(r for r in rows if not r["snapshot"])

    def _fetch(self, query: Any, params: list[Any]) -> list[Any]:
        """The rows of a read. A connection the pool kept idle across a database restart is dead
        and fails its first use (the pool has no pre-ping: ``adapters.bootstrap``), so after a
        restart each of the pool's connections failed one group-commit batch (a 500 for each of
        its commands) long after the database was back. On such a failure the pool's idle
        connections are checked (the dead ones replaced) and the read runs once more."""
        for attempt in (1, 2):
            try:
                with self._datastore.get_connection() as conn, conn.cursor() as cur:
                    cur.execute(query, params, prepare=True)
                    return cur.fetchall()
            except (OperationalError, InterfaceError) as e:
                if attempt == 2 or isinstance(e.__cause__, PoolTimeout):  # no connection: no dead one either
                    raise
                log.warning("a pooled connection to PostgreSQL was dead: checking the pool, reading again")
                self._datastore.pool.check()
        raise AssertionError("unreachable")


def _stored(rows: Iterable[Any]) -> list[StoredEvent]:
    return [StoredEvent(r["originator_id"], r["originator_version"], r["topic"], bytes(r["state"])) for r in rows]


class PgStreamVersions:
    """Streams' current versions for coroutines, each event loop's on a connection of its own:
    the ids asked for while a query runs go together in the next query, so a round trip serves
    every read that arrived meanwhile (at most ``max_batch`` ids a query). When a query fails or
    takes over ``timeout_s``, every caller waiting gets VersionUnknown (they read another way),
    and so does every caller for ``pause_s``; the next query reconnects."""

    def __init__(self, conninfo: str, recorder: PostgresAggregateRecorder, max_batch: int = 1000,
                 timeout_s: float = 5.0, pause_s: float = 1.0) -> None:
        self.conninfo = conninfo
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        # max() of the primary key (originator_id, originator_version): one index probe per id.
        self.query = sql.SQL(
            "SELECT v.id, (SELECT max(originator_version) FROM {}.{} WHERE originator_id = v.id) "
            "FROM unnest(%b::uuid[]) AS v(id)"
        ).format(sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name))
        self._by_loop: dict[asyncio.AbstractEventLoop, _LoopVersions] = {}

    def _here(self) -> _LoopVersions:
        return of_running_loop(self._by_loop, lambda: _LoopVersions(self, asyncio.get_running_loop()))

    async def current(self, aggregate_id: UUID) -> int:
        return await self._here().current(aggregate_id)

    @property
    def backend_pid(self) -> int | None:
        """The server process of the running loop's connection (None: none open)."""
        return self._here().backend_pid

    async def close(self) -> None:
        here = self._by_loop.pop(asyncio.get_running_loop(), None)
        if here is not None:
            await here.close()


class _LoopVersions:
    """PgStreamVersions on one event loop: its callers, its query task and its connection."""

    def __init__(self, owner: PgStreamVersions, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.asked: dict[UUID, list[asyncio.Future[int]]] = {}
        self.querying: asyncio.Task[None] | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.paused_until = 0.0

    async def current(self, aggregate_id: UUID) -> int:
        if self.loop.time() < self.paused_until:
            raise VersionUnknown("stream versions paused after a failure")
        future: asyncio.Future[int] = self.loop.create_future()
        self.asked.setdefault(aggregate_id, []).append(future)
        if self.querying is None:
            self.querying = self.loop.create_task(self._answer())
        return await future

    async def _answer(self) -> None:
        waiting: dict[UUID, list[asyncio.Future[int]]] = {}
        try:
            while self.asked:
                ids = list(itertools.islice(self.asked, self.owner.max_batch))
                waiting = {i: self.asked.pop(i) for i in ids}
                try:
                    versions = await asyncio.wait_for(self._versions(ids), self.owner.timeout_s)
                except Exception as e:  # noqa: BLE001 - whatever it is, the callers read another way
                    log.warning("stream versions unavailable (%s: %s)", type(e).__name__, e)
                    self.paused_until = self.loop.time() + self.owner.pause_s
                    await self._disconnect()
                    return  # the finally fails every caller waiting
                for i, futures in waiting.items():
                    for future in futures:
                        if not future.done():  # done: its request went away
                            future.set_result(versions.get(i, 0))
                waiting = {}
        finally:
            self.querying = None
            for futures in [*waiting.values(), *self.asked.values()]:
                for future in futures:
                    if not future.done():
                        future.set_exception(VersionUnknown("stream versions unavailable"))
            self.asked.clear()

    async def _versions(self, ids: list[UUID]) -> dict[UUID, int]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(self.owner.conninfo, autocommit=True)
        async with self.conn.cursor() as cur:
            await cur.execute(self.owner.query, [ids], prepare=True)
            return {i: v or 0 for i, v in await cur.fetchall()}

    @property
    def backend_pid(self) -> int | None:
        return self.conn.info.backend_pid if self.conn is not None and not self.conn.closed else None

    async def close(self) -> None:
        """Stop (the callers waiting get VersionUnknown) and disconnect."""
        if self.querying is not None:
            self.querying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.querying
        await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            await conn.close()


def pg_stream_versions(app: Application[UUID], conninfo: str) -> PgStreamVersions | None:
    """Stream versions where ``app`` stores its events in PostgreSQL; None elsewhere."""
    recorder = app.recorder
    return PgStreamVersions(conninfo, recorder) if isinstance(recorder, PostgresAggregateRecorder) else None


def pg_stream_loader(app: Application[UUID]) -> PgStreamLoader | None:
    """The one-query loader where ``app`` stores its events in PostgreSQL; None elsewhere (the
    executors then use the generic, one query per stream RecorderStreamLoader)."""
    recorder = app.recorder
    if not isinstance(recorder, PostgresAggregateRecorder):
        return None
    snapshots = snapshot_recorder(app)
    return PgStreamLoader(recorder, snapshots if isinstance(snapshots, PostgresAggregateRecorder) else None)


# An arbitrary constant: the advisory lock processes starting together take to (re)create the
# insert function one at a time (concurrent CREATE OR REPLACE fails "tuple concurrently updated").
INSERT_FUNCTION_LOCK = 0x70616C65


def insert_in_one_round_trip(app: Application[UUID]) -> bool:
    """Make ``app`` store a save's events with ONE statement: a function that does what
    eventsourcing's pipeline does in seven (SET LOCAL lock_timeout, LOCK TABLE ... IN EXCLUSIVE
    MODE, NOTIFY, the INSERT, its notification ids). A save of one new user took 1.06 ms of CPU
    and 1.6 ms against 0.59 and 1.05 this way (3 rounds of 200 saves, alternated).

    eventsourcing's own function (``POSTGRES_ENABLE_DB_FUNCTIONS``) leaves out the table lock, so
    a transaction could commit its notification ids after a later one's and a reader of the log
    (the relay) pass over them; this one takes it, as the pipeline does. Only an application
    recorder's plain saves take this path (a process recorder's tracking records would not be
    written). False where the app does not store in PostgreSQL that way."""
    recorder = app.recorder
    if type(recorder) is not PostgresApplicationRecorder:
        return False
    datastore = recorder.datastore
    datastore.register_type_adapters()
    if recorder.stored_event_type_name not in datastore.psycopg_python_types:
        return False  # the events' composite type is not there (no tables made): the pipeline it is
    name = f"palette_insert_events_{datastore.originator_id_type}"
    create = sql.SQL(
        "CREATE OR REPLACE FUNCTION {schema}.{name}(events {schema}.{event}[]) RETURNS SETOF bigint "
        "LANGUAGE plpgsql AS $BODY$ BEGIN "
        "SET LOCAL lock_timeout = '{lock_timeout}s'; "
        "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
        "NOTIFY {channel}; "
        "RETURN QUERY INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
        "SELECT originator_id, originator_version, topic, state FROM unnest(events) RETURNING notification_id; "
        "END; $BODY$"
    ).format(
        schema=sql.Identifier(datastore.schema), name=sql.Identifier(name),
        event=sql.Identifier(recorder.stored_event_type_name), lock_timeout=datastore.lock_timeout,
        table=sql.Identifier(recorder.events_table_name), channel=sql.Identifier(recorder.channel_name),
    )
    with datastore.get_connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [INSERT_FUNCTION_LOCK])
        conn.execute(create)
    recorder.pg_function_name_insert_events = name
    recorder.sql_invoke_pg_function_insert_events = sql.SQL("SELECT * FROM {}.{}((%s))").format(
        sql.Identifier(datastore.schema), sql.Identifier(name))
    datastore.enable_db_functions = True
    return True
