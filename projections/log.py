"""Reading the event log for projectors: pages in commit order (the sweep) and the versions of
given streams (filling a hole a lost broker message left). Works on eventsourcing's PostgreSQL
recorder (one SQL query for all streams) and its in-memory recorder (a scan, for tests)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification
from psycopg import sql

from domain.contracts.envelope import EventEnvelope, from_notification

SCAN_PAGE = 5000


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

    def read(self, after: int, upto: int, limit: int) -> list[EventEnvelope]:
        """Up to ``limit`` events with ``after < position <= upto``, in commit order."""
        if upto <= after:
            return []
        page = self.recorder.select_notifications(start=after + 1, limit=limit, stop=upto)
        return [from_notification(n, self.transcoder) for n in page]

    def head(self) -> int:
        return int(self.recorder.max_notification_id() or 0)

    def stream_events(self, gaps: dict[UUID, tuple[int, int]]) -> list[EventEnvelope]:
        """For each stream, its events with ``after < version <= upto``, positions included."""
        if not gaps:
            return []
        table = getattr(self.recorder, "events_table_name", None)
        if table is None:
            return self._scan(gaps)
        schema = getattr(self.recorder.datastore, "schema", "") or ""
        ids, afters, uptos = zip(*[(s, a, u) for s, (a, u) in gaps.items()], strict=True)
        query = sql.SQL(
            "SELECT e.notification_id, e.originator_id, e.originator_version, e.topic, e.state "
            "FROM unnest(%s::uuid[], %s::int[], %s::int[]) AS g(id, after, upto) "
            "JOIN {} e ON e.originator_id = g.id AND e.originator_version > g.after "
            "AND e.originator_version <= g.upto ORDER BY e.notification_id"
        ).format(sql.Identifier(schema, table) if schema else sql.Identifier(table))
        with self.recorder.datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(query, [list(ids), list(afters), list(uptos)])
            rows = cur.fetchall()
        return [self._envelope(r["notification_id"], r["originator_id"], r["originator_version"],
                               r["topic"], bytes(r["state"])) for r in rows]

    def _envelope(self, position: int, stream_id: UUID, version: int, topic: str, state: bytes) -> EventEnvelope:
        return from_notification(Notification(originator_id=stream_id, originator_version=version,
                                              topic=topic, state=state, id=position), self.transcoder)

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
