"""The application's StreamLoader and StreamVersions ports on eventsourcing's PostgreSQL events
table."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg import sql

from application.ports import VersionUnknown

log = logging.getLogger(__name__)


class PgStreamLoader:
    """New events of any number of streams in ONE query (the group committer's prefetch)."""

    def __init__(self, recorder: PostgresAggregateRecorder) -> None:
        self._datastore = recorder.datastore
        # LATERAL: one index range scan per stream, whatever the planner guesses for unnest()
        # (a hash join would scan the whole events table as it grows). Names are identifiers,
        # values are parameters.
        self._query = sql.SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            "FROM unnest(%s::uuid[], %s::int[]) AS v(id, ver) CROSS JOIN LATERAL ("
            " SELECT originator_id, originator_version, topic, state FROM {}.{}"
            " WHERE originator_id = v.id AND originator_version > v.ver ORDER BY originator_version) e"
        ).format(sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name))

    def newer_than(self, versions: Mapping[UUID, int]) -> list[StoredEvent]:
        if not versions:
            return []
        with self._datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(self._query, [list(versions), list(versions.values())], prepare=True)
            rows = cur.fetchall()
        return [StoredEvent(r["originator_id"], r["originator_version"], r["topic"], bytes(r["state"]))
                for r in rows]


class PgStreamVersions:
    """Streams' current versions for coroutines of one event loop, on one connection of its own:
    the ids asked for while a query runs go together in the next query, so a round trip serves
    every read that arrived meanwhile (at most ``max_batch`` ids a query). A query that fails
    fails its callers with VersionUnknown (they read another way) and the next one reconnects."""

    def __init__(self, conninfo: str, recorder: PostgresAggregateRecorder, max_batch: int = 1000,
                 timeout_s: float = 5.0) -> None:
        self.conninfo = conninfo
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        # max() of the primary key (originator_id, originator_version): one index probe per id.
        self._query = sql.SQL(
            "SELECT v.id, (SELECT max(originator_version) FROM {}.{} WHERE originator_id = v.id) "
            "FROM unnest(%b::uuid[]) AS v(id)"
        ).format(sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name))
        self._asked: dict[UUID, list[asyncio.Future[int]]] = {}
        self._querying: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queries = 0

    async def current(self, aggregate_id: UUID) -> int:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (a test client's): nothing of the old one carries over
            self._loop, self._asked, self._querying, self._conn = loop, {}, None, None
        future: asyncio.Future[int] = loop.create_future()
        self._asked.setdefault(aggregate_id, []).append(future)
        if self._querying is None:
            self._querying = asyncio.create_task(self._answer())
        return await future

    async def _answer(self) -> None:
        try:
            while self._asked:
                ids = list(self._asked)[:self.max_batch]
                waiting = {i: self._asked.pop(i) for i in ids}
                try:
                    versions = await asyncio.wait_for(self._versions(ids), self.timeout_s)
                    outcome: BaseException | None = None
                except (psycopg.Error, OSError, TimeoutError) as e:
                    log.warning("stream versions unavailable (%s: %s)", type(e).__name__, e)
                    versions, outcome = {}, VersionUnknown(str(e))
                    await self.close()
                for i, futures in waiting.items():
                    for future in futures:
                        if future.done():  # its request went away
                            continue
                        if outcome is not None:
                            future.set_exception(outcome)
                        else:
                            future.set_result(versions.get(i, 0))
        finally:
            self._querying = None
            for futures in self._asked.values():  # cancelled (the loop is closing): nobody left hanging
                for future in futures:
                    if not future.done():
                        future.set_exception(VersionUnknown("stream versions stopped"))
            self._asked.clear()

    async def _versions(self, ids: list[UUID]) -> dict[UUID, int]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        self.queries += 1
        async with self._conn.cursor() as cur:
            await cur.execute(self._query, [ids], prepare=True)
            return {i: v or 0 for i, v in await cur.fetchall()}

    @property
    def backend_pid(self) -> int | None:
        """The server process of its connection (None: none open)."""
        return self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
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
    return PgStreamLoader(recorder) if isinstance(recorder, PostgresAggregateRecorder) else None
