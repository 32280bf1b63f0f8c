"""Reading the event log for projectors and the relay: pages in commit order (the sweep; the
relay's, as plain rows) and the versions of given streams (filling a hole a lost broker message
left). Works on eventsourcing's PostgreSQL recorder (one SQL query for all streams) and its
in-memory recorder (a scan, for tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.utils import retry
from psycopg import sql
from psycopg.rows import tuple_row

from domain.contracts.envelope import EventEnvelope
from domain.contracts.streams import topic_prefix
from projections.stored_events import from_notification, from_stored

SCAN_PAGE = 5000
# A stored event as the relay publishes it: (position, stream id as its text, version, topic, state).
StoredRow = tuple[int, str, int, str, bytes]


def events_table(recorder: Any) -> sql.Identifier:
    """The event store's table on PostgreSQL, in its schema (a store may have one of its own)."""
    return sql.Identifier(recorder.datastore.schema, recorder.events_table_name)


def events_by_stream(table: sql.Identifier, upto: bool = True, one: bool = False) -> sql.Composed:
    """The stored events of the topics ``%(topics)s`` (at positions up to ``%(upto)s`` with
    ``upto``; of the stream ``%(stream)s`` alone with ``one``) by stream id and version, the
    primary key's order: each stream's events together, in the order a fold takes them, the
    stream id first (``enveloped`` reads a row)."""
    return sql.SQL("SELECT originator_id, originator_version, notification_id, topic, state FROM {} "
                   "WHERE topic = ANY(%(topics)s){}{} ORDER BY originator_id, originator_version").format(
        table, sql.SQL(" AND notification_id <= %(upto)s") if upto else sql.SQL(""),
        sql.SQL(" AND originator_id = %(stream)s") if one else sql.SQL(""))


def enveloped(row: Sequence[Any], transcoder: Any) -> EventEnvelope:
    """The envelope of a row of ``events_by_stream``."""
    stream_id, version, position, topic, state = row
    return from_stored(position, stream_id, version, topic, bytes(state), transcoder)


class LogReader:
    def __init__(self, recorder: Any, transcoder: Any, owner: Any = None) -> None:
        self.recorder = recorder
        self.transcoder = transcoder
        # The application that owns the recorder's connection pool: an eventsourcing Application
        # closes its pool when it is garbage-collected, so the reader keeps it alive.
        self.owner = owner

    @classmethod
    def of(cls, app: Any) -> LogReader:
        return cls(app.recorder, app.mapper.transcoder, owner=app)

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()

    def read(self, after: int, upto: int, limit: int, stream_types: Sequence[str] = ()) -> list[EventEnvelope]:
        """Up to ``limit`` events with ``after < position <= upto``, in commit order; with
        ``stream_types``, only those streams' events. On PostgreSQL one query of plain rows (no
        ``Notification`` per row) and one UUID object per stream (the fold's dict lookups then
        match by identity)."""
        if upto <= after:
            return []
        prefixes = tuple(topic_prefix(st) for st in stream_types)  # as unapplied() and oldest_needed() match
        if self.events_table is None:  # the in-memory recorder (tests): a scan
            found: list[Any] = []
            start = after + 1
            while len(found) < limit and (page := self.recorder.select_notifications(start=start, limit=limit,
                                                                                     stop=upto)):
                found += [n for n in page if not prefixes or n.topic.startswith(prefixes)]
                start = page[-1].id + 1
            return [from_notification(n, self.transcoder) for n in found[:limit]]
        query = sql.SQL("SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
                        "WHERE notification_id > %s AND notification_id <= %s{} ORDER BY notification_id LIMIT %s"
                        ).format(self.events_table, sql.SQL(" AND topic LIKE ANY(%s)") if prefixes else sql.SQL(""))
        params: list[Any] = [after, upto, [p + "%" for p in prefixes], limit] if prefixes else [after, upto, limit]
        with self.recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(query, params, prepare=True).fetchall()
        streams: dict[UUID, UUID] = {}
        return [from_stored(position, streams.setdefault(stream_id, stream_id), version, topic, state, self.transcoder)
                for position, stream_id, version, topic, state in rows]

    # As the recorder's reads: its pool raises eventsourcing's errors (a dropped connection), not psycopg's.
    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def rows(self, start: int, limit: int, topics: Sequence[str] = ()) -> list[StoredRow]:
        """Up to ``limit`` stored events from position ``start`` on, in commit order (of ``topics``
        alone with some), as the relay publishes them and `palette replay all` prints them.
        eventsourcing's ``select_notifications`` makes a ``Notification`` and a ``UUID`` of each row
        (from a dictionary), most of the relay's time over a backlog; on PostgreSQL these are
        binary tuples, the stream id as its text (the message's key)."""
        if self.events_table is None:
            return [(n.id, str(n.originator_id), n.originator_version, n.topic, n.state)
                    for n in self.recorder.select_notifications(start=start, limit=limit, topics=topics)]
        query = sql.SQL("SELECT notification_id, originator_id::text, originator_version, topic, state FROM {} "
                        "WHERE notification_id >= %s{} ORDER BY notification_id LIMIT %s").format(
            self.events_table, sql.SQL(" AND topic = ANY(%s)") if topics else sql.SQL(""))
        params = [start, list(topics), limit] if topics else [start, limit]
        with self.recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row, binary=True) as cur:
            rows: list[StoredRow] = cur.execute(query, params, prepare=True).fetchall()
        return rows

    @property
    def events_table(self) -> sql.Identifier | None:
        """The events table on PostgreSQL (None for the in-memory recorder)."""
        return events_table(self.recorder) if hasattr(self.recorder, "events_table_name") else None

    def head(self) -> int:
        return int(self.recorder.max_notification_id() or 0)

    def stream_events(self, gaps: dict[UUID, tuple[int, int]]) -> list[EventEnvelope]:
        """For each stream, its events with ``after < version <= upto``, positions included."""
        if not gaps:
            return []
        table = self.events_table
        if table is None:
            return self._scan(gaps)
        ids, afters, uptos = zip(*[(s, a, u) for s, (a, u) in gaps.items()], strict=True)
        query = sql.SQL(
            "SELECT e.notification_id, e.originator_id, e.originator_version, e.topic, e.state "
            "FROM unnest(%s::uuid[], %s::int[], %s::int[]) AS g(id, after, upto) "
            "JOIN {} e ON e.originator_id = g.id AND e.originator_version > g.after "
            "AND e.originator_version <= g.upto ORDER BY e.notification_id"
        ).format(table)
        with self.recorder.datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(query, [list(ids), list(afters), list(uptos)])
            rows = cur.fetchall()
        return [from_stored(r["notification_id"], r["originator_id"], r["originator_version"], r["topic"],
                            bytes(r["state"]), self.transcoder) for r in rows]

    def _scan(self, gaps: dict[UUID, tuple[int, int]]) -> list[EventEnvelope]:
        found: list[EventEnvelope] = []
        start = 1
        while page := self.recorder.select_notifications(start=start, limit=SCAN_PAGE):
            for n in page:
                window = gaps.get(n.originator_id)
                if window and window[0] < n.originator_version <= window[1]:
                    found.append(from_notification(n, self.transcoder))
            start = page[-1].id + 1
        return found
