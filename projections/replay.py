"""Analysts' view of the log: replay streams or the whole log as envelopes, and fold an
aggregate's state as of a version or a time."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
from collections.abc import Container, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import PersistenceError
from psycopg import sql

from domain.contracts.envelope import EventEnvelope, encode
from domain.contracts.personal import SEALED_PREFIX, redact
from domain.contracts.streams import TIME_SLACK_S, event_classes
from projections.log import LogReader, StoredRow, events_table
from projections.rebuild import PAGE
from projections.stored_events import UNREADABLE, from_notification, from_stored, stored_message

CSV_COLUMNS = ("id", "stream_id", "stream_type", "version", "type", "timestamp", "data")
PROBE = 10  # events the search for a time reads at a position (the first readable one counts)
SEALED_MARK = SEALED_PREFIX.encode()  # in a stored state's bytes: the event has a personal field


def event_topics() -> dict[str, list[str]]:
    """Event type name -> stored topics (``domain.job:Job.ItemCompleted``)."""
    out: dict[str, list[str]] = {}
    for topic, name, _ in event_classes():
        out.setdefault(name, []).append(topic)
    return out


@dataclass(frozen=True)
class _Row:
    id: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


class Replayer:
    """Events as analysts see them: a sealed personal field of an ``erased`` user reads as
    "erased" (one not erased stays sealed: replays never hold clear personal data)."""

    def __init__(self, app: Any, erased: Container[UUID] = frozenset()) -> None:
        self.app = app
        self.recorder = app.recorder
        self.transcoder = app.mapper.transcoder
        self.log = LogReader(self.recorder, self.transcoder)  # the relay's read of the log: plain rows
        self.erased = erased

    def _shown(self, env: EventEnvelope) -> EventEnvelope:
        data = redact(env.data, self.erased)
        return env if data is env.data else dataclasses.replace(env, data=data)

    def stream(self, stream_id: UUID) -> Iterator[EventEnvelope]:
        """One stream's events in version order, read a page of versions per query (a User
        stream grows with every job: memory holds a page, and no connection is held between
        pages while a reader takes its time)."""
        query = sql.SQL("SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
                        "WHERE originator_id = %s AND originator_version > %s ORDER BY originator_version "
                        "LIMIT %s").format(events_table(self.recorder))
        after = 0
        while True:
            with self.recorder.datastore.get_connection() as conn, conn.cursor() as cur:
                cur.execute(query, [stream_id, after, PAGE])
                rows = cur.fetchall()
            for r in rows:
                yield self._shown(from_notification(_Row(r["notification_id"], r["originator_id"],
                                                         r["originator_version"], r["topic"], bytes(r["state"])),
                                                    self.transcoder))
            if len(rows) < PAGE:
                return
            after = rows[-1]["originator_version"]

    def existing_stream(self, stream_id: UUID) -> Iterator[EventEnvelope]:
        """``stream``, its events read now: LookupError when the log holds no such stream."""
        envelopes = self.stream(stream_id)
        first = next(envelopes, None)
        if first is None:
            raise LookupError(f"no stream {stream_id}")
        return itertools.chain([first], envelopes)

    def _timestamp_at(self, position: int, end: int) -> datetime | None:
        """The stamp of the first readable event in [``position``, ``end``) (None: none there). An
        event whose stored state cannot be decoded has none (the epoch stands in for it): taken
        for the log's time there, it sent the search past the events before it. Read no further
        than ``end``, where the search knows the answer, in pages doubling from PROBE: a long
        unreadable stretch (a key since lost) was read to its end at every probe, ten a query."""
        limit = PROBE
        while position < end and (page := self.recorder.select_notifications(
                start=position, limit=min(limit, end - position), stop=end - 1)):
            for n in page:
                env = from_notification(n, self.transcoder)
                if UNREADABLE not in env.data:
                    return env.timestamp
            position = page[-1].id + 1
            limit = min(2 * limit, PAGE)
        return None

    def position_at(self, since: datetime) -> int:
        """The first position whose event may be at or after ``since`` (binary search, with slack,
        over the readable events' stamps). A probe with no readable event before ``hi`` decides as
        ``hi`` did: the first readable event after it is the one after ``hi``."""
        head = self.recorder.max_notification_id() or 0
        lo, hi = 1, head + 1
        target = since.timestamp() - TIME_SLACK_S
        while lo < hi:
            mid = (lo + hi) // 2
            ts = self._timestamp_at(mid, hi)
            if ts is None or ts.timestamp() >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def all(self, start: int = 1, since: datetime | None = None, until: datetime | None = None,
            types: list[str] | None = None) -> Iterator[EventEnvelope]:
        """The global log in commit order, optionally by time range and event type (checked now,
        before the first event is read)."""
        topics = self._topics(types)
        position = max(start, self.position_at(since) if since else 1)
        return self._scan(position, topics, since, until)

    def all_jsonl(self, start: int = 1, types: list[str] | None = None) -> Iterator[bytes]:
        """The global log as envelope JSON lines, straight from the stored bytes (no time filter:
        the fast path of `palette replay all`). Pages are read as plain rows, the stream id as its
        text, as the relay reads them: a ``Notification`` and a ``UUID`` per event were most of the
        time here."""
        topics = self._topics(types)

        def scan(position: int) -> Iterator[bytes]:
            transcoder = self.transcoder
            while True:
                page: list[StoredRow] = self.log.rows(position, PAGE, topics)
                if not page:
                    return
                for row in page:
                    # rare: only events with a personal field take the slow path
                    if self.erased and SEALED_MARK in row[4]:
                        position_, stream_id, version, topic, state = row
                        yield encode(self._shown(from_stored(position_, UUID(stream_id), version, topic, state,
                                                             transcoder))) + b"\n"
                    else:
                        yield stored_message(*row, transcoder)[0] + b"\n"
                position = page[-1][0] + 1

        return scan(start)

    def _topics(self, types: list[str] | None) -> list[str]:
        if not types:
            return []
        known = event_topics()
        unknown = [t for t in types if t not in known]
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; known: {sorted(known)}")
        return [topic for t in types for topic in known[t]]

    def _scan(self, position: int, topics: list[str], since: datetime | None,
              until: datetime | None) -> Iterator[EventEnvelope]:
        stop_after = until.timestamp() + TIME_SLACK_S if until else None
        while True:
            page = self.recorder.select_notifications(start=position, limit=PAGE, topics=topics)
            if not page:
                return
            for n in page:
                env = self._shown(from_notification(n, self.transcoder))
                ts = env.timestamp.timestamp()
                if stop_after is not None and ts > stop_after:
                    return
                if since is not None and env.timestamp < since:
                    continue
                if until is not None and env.timestamp > until:
                    continue
                yield env
            position = page[-1].id + 1

    def state(self, stream_id: UUID, version: int | None = None, as_of: datetime | None = None) -> dict[str, Any]:
        """An aggregate's state folded from its events up to a version or a time (LookupError: no
        such stream, none of its events by then, fewer versions than asked for, or one of them
        unreadable)."""
        if as_of is not None:
            versions = [e.version for e in self.stream(stream_id) if e.timestamp <= as_of]
            if not versions:
                raise LookupError(f"stream {stream_id} has no events at or before {as_of.isoformat()}")
            version = versions[-1]
        try:
            aggregate = self.app.repository.get(stream_id, version=version)
        except AggregateNotFoundError:
            raise LookupError(f"no stream {stream_id}") from None
        except (PersistenceError, psycopg.Error):
            raise
        except Exception:
            bad = self._unreadable(stream_id, version)
            if bad is None:
                raise
            raise LookupError(f"stream {stream_id} cannot be folded: its event at version {bad.version} ({bad.type}) "
                              f"is unreadable ({bad.data[UNREADABLE]})") from None
        if version is not None and aggregate.version < version:
            raise LookupError(f"stream {stream_id} has only {aggregate.version} version(s)")
        return {"stream_id": str(stream_id), "stream_type": type(aggregate).__name__,
                "version": aggregate.version, "state": redact(_plain_state(aggregate), self.erased)}

    def _unreadable(self, stream_id: UUID, version: int | None) -> EventEnvelope | None:
        """The first event up to ``version`` whose stored state could not be decoded (no fold takes it)."""
        for env in self.stream(stream_id):
            if version is not None and env.version > version:
                return None
            if UNREADABLE in env.data:
                return env
        return None


def _plain_state(aggregate: Any) -> dict[str, Any]:
    from fastapi.encoders import jsonable_encoder

    state = {k.lstrip("_"): v for k, v in vars(aggregate).items() if k not in ("_pending_events",)}
    return dict(jsonable_encoder(state, custom_encoder={set: lambda s: sorted(str(x) for x in s)}))


def as_jsonl(envelopes: Iterator[EventEnvelope]) -> Iterator[bytes]:
    for env in envelopes:
        yield encode(env) + b"\n"


def as_csv(envelopes: Iterator[EventEnvelope]) -> Iterator[str]:
    """No cell here can begin a spreadsheet formula (``domain.text.csv_cell``): ids, numbers, the
    server's names, a time, and the event's data as a JSON object, ``{`` first."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    for env in envelopes:
        buf.seek(0)
        buf.truncate()
        writer.writerow([env.id, env.stream_id, env.stream_type, env.version, env.type,
                         env.timestamp.isoformat(), json.dumps(env.data, separators=(",", ":"))])
        yield buf.getvalue()
