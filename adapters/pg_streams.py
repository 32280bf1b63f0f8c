"""The application's StreamLoader port on eventsourcing's PostgreSQL events table."""

from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg import sql


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


def pg_stream_loader(app: Application[UUID]) -> PgStreamLoader | None:
    """The one-query loader where ``app`` stores its events in PostgreSQL; None elsewhere (the
    executors then use the generic, one query per stream RecorderStreamLoader)."""
    recorder = app.recorder
    return PgStreamLoader(recorder) if isinstance(recorder, PostgresAggregateRecorder) else None
