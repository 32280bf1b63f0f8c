"""Rebuild a read model from the event store without downtime: fold the log stream by stream
into shadow tables (COPY, a batch at a time; a batch PostgreSQL refuses again event by event,
each stream stopped where the live model stopped it), catch up
under the model's lock (through the live apply path: what cannot be folded is parked), then swap
the tables atomically."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from domain.contracts.envelope import EventEnvelope
from domain.contracts.streams import stream_topics
from projections.batch import relevant
from projections.log import LogReader, enveloped, events_by_stream, events_table
from projections.models import READ_MODELS
from projections.models.base import ReadModel, Row, Rows
from projections.schema import REBUILD_LOCK, create_model_tables, ensure_schema, lock_id, table, tracking_table
from projections.store import (
    Fill,
    apply_isolating,
    copy_rows,
    describe,
    insert_appended,
    is_transient,
    resolve_dead_letter,
    write_rows,
    write_tracking,
)
from projections.stored_events import from_notification

SHADOW = "__shadow"
PAGE = 5000
log = logging.getLogger("palette.projections")


class RebuildBusy(RuntimeError):
    """Another rebuild (or a `dlq skip`) holds the lock: one rebuild at a time."""


@dataclass
class RebuildReport:
    model: str
    events: int
    seconds: float
    rows: int
    ledger_rows: int
    failed_streams: int
    log_events: int = 0  # the log covered (the model's own events are a part of it)

    @property
    def events_per_s(self) -> float:
        """Log events covered per second (events of other stream types are skipped in SQL)."""
        return self.log_events / self.seconds if self.seconds else 0.0


def iter_envelopes(recorder: Any, transcoder: Any, start: int, stop: int | None,
                   topics: tuple[str, ...] = ()) -> Any:
    """Envelopes of the notification log in commit order, read page by page via the recorder."""
    position = start
    while True:
        page = recorder.select_notifications(start=position, limit=PAGE, stop=stop, topics=topics)
        if not page:
            return
        for n in page:
            yield from_notification(n, transcoder)
        position = page[-1].id + 1


def fold_log(model: ReadModel, envelopes: Any) -> tuple[Rows, list[Row], dict[UUID, int], int, set[UUID]]:
    """The pure fold of a whole log: rows, ledger rows, stream tracking, events seen, failed streams."""
    rows: Rows = {}
    appended: list[Row] = []
    tracking: dict[UUID, int] = {}
    failed: set[UUID] = set()
    count = 0
    for env in envelopes:
        count += 1
        if env.stream_id in failed or not relevant(model, env):
            continue
        try:
            appended.extend(model.apply(rows, env))
        except Exception:  # noqa: BLE001 - the stream stays parked, as in the live projector
            failed.add(env.stream_id)
            continue
        tracking[env.stream_id] = env.version
    return rows, appended, tracking, count, failed


def skipped_events(conn: psycopg.Connection[Any], model: ReadModel) -> dict[UUID, set[int]]:
    """The versions of each stream an operator skipped (`dlq skip`) in ``model``: a rebuild passes
    over them as the live model did. No skip comes while a rebuild runs (``REBUILD_LOCK``)."""
    skipped: dict[UUID, set[int]] = {}
    for stream_id, version in conn.execute(sql.SQL(
            "SELECT stream_id, version FROM {} WHERE model = %s AND status = 'skipped'").format(
            table("dead_letters")), [model.name]).fetchall():
        skipped.setdefault(stream_id, set()).add(version)
    return skipped


def _drop_shadow(conn: psycopg.Connection[Any], model: ReadModel) -> None:
    for name in _tables(model):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table(name + SHADOW)))


def _tables(model: ReadModel) -> list[str]:
    names = [model.keyed_table, tracking_table(model)]
    if model.append_table:
        names.append(model.append_table)
    return names


def rebuild(database_url: str, recorder: Any, transcoder: Any, name: str,
            progress: Callable[[int], None] | None = None) -> RebuildReport:
    if name not in READ_MODELS:
        raise KeyError(f"unknown read model {name!r}; choose one of {sorted(READ_MODELS)}")
    model = READ_MODELS[name]
    t0 = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_schema(conn)
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", [REBUILD_LOCK]).fetchone()
        if not got or not got[0]:
            raise RebuildBusy("another rebuild, or a dlq skip, is running; one rebuild at a time")
        try:
            _drop_shadow(conn, model)
            create_model_tables(conn, model, SHADOW)
            upto = recorder.max_notification_id() or 0
            topics = stream_topics(model.stream_type)  # the model's streams only: the rest is skipped in SQL
            folded = _fold_into_shadow(conn, model, _streams(recorder, transcoder, upto, topics), progress,
                                       skipped_events(conn, model),
                                       lambda stream_id: _stream(recorder, transcoder, upto, topics, stream_id))
            with conn.transaction():
                # Exclusive: the live projector's batches (shared holders) pause for the swap.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id(model)])
                tail: list[EventEnvelope] = list(iter_envelopes(recorder, transcoder, upto + 1, None, topics))
                # What came during the fold, through the live apply path: an event that cannot be
                # folded or stored is parked (its stream's later ones held), not the rebuild's end.
                apply_isolating(conn, tail, models=[model], suffix=SHADOW)
                folded.events += len(tail)
                for tbl in _tables(model):
                    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        table(tbl), sql.Identifier(tbl + "__old")))
                    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        table(tbl + SHADOW), sql.Identifier(tbl)))
                    conn.execute(sql.SQL("DROP TABLE {}").format(table(tbl + "__old")))
                _release_folded_letters(conn, model, LogReader(recorder, transcoder).stream_events)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [REBUILD_LOCK])
    return RebuildReport(name, folded.events, time.perf_counter() - t0, folded.rows, folded.ledger_rows,
                         folded.failed, log_events=upto)


def _release_folded_letters(conn: psycopg.Connection[Any], model: ReadModel, fill: Fill) -> None:
    """The model's parked events the rebuild folded (a fold fixed since it parked them, a row
    PostgreSQL refused that a later event of the stream changed before the rebuild wrote it)
    retried, as `dlq retry` does: the folded ones pass as seen, those held behind them are folded
    or parked again. Left alone, they would hold their stream's every later event behind an event
    the model has folded."""
    letters = conn.execute(sql.SQL(
        "SELECT d.id FROM {} d JOIN {} t ON t.stream_id = d.stream_id WHERE d.model = %s "
        "AND d.status = 'parked' AND d.version <= t.version ORDER BY d.id").format(
        table("dead_letters"), table(tracking_table(model))), [model.name]).fetchall()
    for (letter,) in letters:
        try:
            resolve_dead_letter(conn, letter, "retry", fill)
        except LookupError as e:  # written by hand (no envelope): left for the operator
            log.warning("%s: a rebuild leaves dead letter %d as it is: %s", model.name, letter, e)


COPY_ROWS = 20_000  # rows folded (keyed and appended) before they are copied out


@dataclass
class _Folded:
    events: int = 0
    rows: int = 0
    ledger_rows: int = 0
    failed: int = 0


def _streams(recorder: Any, transcoder: Any, upto: int,
             topics: tuple[str, ...]) -> Iterator[tuple[UUID, Iterator[EventEnvelope]]]:
    """Each stream of ``topics`` with its events up to position ``upto``, by stream id and version:
    a server-side cursor over the primary key, so a stream's rows are complete when it ends.

    The fold copies out between its fetches, so its transaction may stay idle for a while: it
    lifts the idle_in_transaction_session_timeout the event store's pool sets (eventsourcing's
    5 s ended a rebuild whose copy took longer). Read a page a statement instead (keyset on the
    key, each page on its own), rebuilding users at 1M events took 14.2-17.0 s against 6.7-7.0."""
    with (recorder.datastore.get_connection() as conn, conn.transaction(),
          conn.cursor(name="rebuild_log", row_factory=tuple_row) as cur):
        conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        cur.itersize = PAGE
        cur.execute(events_by_stream(events_table(recorder)), {"topics": list(topics), "upto": upto})
        for stream_id, rows in itertools.groupby(cur, key=itemgetter(0)):
            yield stream_id, (enveloped(row, transcoder) for row in rows)


def _stream(recorder: Any, transcoder: Any, upto: int, topics: tuple[str, ...],
            stream_id: UUID) -> list[EventEnvelope]:
    """One stream's events up to position ``upto``, as ``_streams`` gave them: read again when
    the rows folded from them cannot all be stored (``_isolate``)."""
    with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(events_by_stream(events_table(recorder), one=True),
                    {"topics": list(topics), "upto": upto, "stream": stream_id})
        return [enveloped(row, transcoder) for row in cur.fetchall()]


def _fold_into_shadow(conn: psycopg.Connection[Any], model: ReadModel,
                      streams: Iterator[tuple[UUID, Iterator[EventEnvelope]]],
                      progress: Callable[[int], None] | None,
                      skipped: dict[UUID, set[int]],
                      reread: Callable[[UUID], list[EventEnvelope]]) -> _Folded:
    """Fold each stream as the live projector would (``fold_log``'s rules: a stream whose event
    cannot be folded keeps what it had and stops there; an event an operator skipped is passed
    over, its stream's tracking past it, as `dlq skip` left the live model) and copy the rows into
    the model's shadow tables every ``COPY_ROWS``, a batch in one transaction: memory holds one
    stream's keyed rows (a job's 200 items at most) and one batch, not the model. A long stream's
    appended rows (a user's ledger) go out in batches as it is folded, with its keyed rows and
    tracking so far (upserted in its next batches).

    A batch PostgreSQL refuses (a value it cannot store: a NUL or a lone surrogate in text, an
    integer past its column) is written again stream by stream, each read again from the log
    (``reread``) and written event by event as the live projector's isolation does (``_isolate``):
    a stream stops at the event whose rows cannot be stored, its rows and tracking as before that
    event (the live projector parked it; the rebuild leaves its letter as it is)."""
    shadow = _Shadow(conn, model, skipped, reread)
    for stream_id, envelopes in streams:
        shadow.fold(stream_id, envelopes, progress)
    shadow.copy_out()
    return shadow.folded


def _live(rows: Rows) -> int:
    return sum(r is not None for r in rows.values())


NO_SKIPS: frozenset[int] = frozenset()


class _Shadow:
    """``_fold_into_shadow``'s batch: the rows folded since its last copy into the shadow tables,
    and what the copies stored (``folded``)."""

    def __init__(self, conn: psycopg.Connection[Any], model: ReadModel, skipped: dict[UUID, set[int]],
                 reread: Callable[[UUID], list[EventEnvelope]]) -> None:
        self.conn = conn
        self.model = model
        self.skipped = skipped
        self.reread = reread
        self.folded = _Folded()
        self.keyed: list[Row] = []  # the rows and tracking of the streams new to the shadow tables (COPY)
        self.tracking: list[tuple[UUID, int]] = []
        # A long stream's rows and tracking so far, and the versions stored of it before (upserts).
        self.again: dict[UUID, tuple[Rows, int | None, int]] = {}
        self.appended: list[Row] = []
        self.ids: list[UUID] = []  # the batch's streams
        self.ended_rows = 0  # the batch's keyed rows of streams that ended
        self.failures = 0  # the batch's streams that failed to fold

    def fold(self, stream_id: UUID, envelopes: Iterator[EventEnvelope],
             progress: Callable[[int], None] | None) -> None:
        """One stream into the batch, and the batch out when it is full (a long stream's rows go
        out as it is folded)."""
        rows: Rows = {}
        version: int | None = None
        after = 0
        failed = isolated = False
        passed = self.skipped.get(stream_id, NO_SKIPS)
        for env in envelopes:
            self.folded.events += 1
            if progress and self.folded.events % 50_000 == 0:
                progress(self.folded.events)
            if failed or not relevant(self.model, env):
                continue
            if env.version in passed:  # the operator's decision stands: not folded, tracked past
                version = env.version
                continue
            try:
                self.appended.extend(self.model.apply(rows, env))
            except Exception:  # noqa: BLE001 - the stream stays parked, as in the live projector
                failed = True
                self.failures += 1
                continue
            version = env.version
            if len(self.appended) >= COPY_ROWS:  # a long stream's ledger rows go out as it goes
                self._add(stream_id, after, rows, version)
                failed = isolated = self.copy_out()  # refused: _isolate wrote the stream to its end
                after = env.version
        if isolated:
            return
        self._add(stream_id, after, rows, version)
        self.ended_rows += _live(rows)
        if len(self.keyed) + len(self.appended) >= COPY_ROWS:
            self.copy_out()

    def _add(self, stream_id: UUID, after: int, rows: Rows, version: int | None) -> None:
        """A stream's rows so far into the batch (those it appended are there)."""
        if after:
            self.again[stream_id] = rows, version, after
        else:
            self.keyed.extend(r for r in rows.values() if r is not None)
            if version is not None:
                self.tracking.append((stream_id, version))
        self.ids.append(stream_id)

    def copy_out(self) -> bool:
        """The batch into the shadow tables, or, if PostgreSQL refuses it, each of its streams
        to its end through ``_isolate``: whether it refused."""
        try:
            self._copy()
            refused = False
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("%s: a rebuild's batch of %d stream(s) failed (%s); writing them event by event",
                        self.model.name, len(self.ids), describe(exc))
            self._isolate_each()
            refused = True
        self.keyed.clear()
        self.tracking.clear()
        self.again.clear()
        self.appended.clear()
        self.ids.clear()
        self.ended_rows = self.failures = 0
        return refused

    def _copy(self) -> None:
        conn, model = self.conn, self.model
        with conn.transaction():
            names = model.column_names
            copy_rows(conn, table(model.keyed_table + SHADOW), names, ([r[c] for c in names] for r in self.keyed))
            for rows, _, _ in self.again.values():  # a long stream's rows so far are there: an upsert (and its deletes)
                write_rows(conn, model, model.keyed_table + SHADOW, rows, list(rows))
            if model.append:
                columns = model.append.columns
                copy_rows(conn, table(model.append.name + SHADOW), columns,
                          ([r[c] for c in columns] for r in self.appended))
            copy_rows(conn, table(tracking_table(model, SHADOW)), ("stream_id", "version"), self.tracking)
            write_tracking(conn, model, SHADOW, {s: v for s, (_, v, _) in self.again.items() if v is not None})
        self.folded.rows += self.ended_rows
        self.folded.ledger_rows += len(self.appended)
        self.folded.failed += self.failures

    def _isolate_each(self) -> None:
        """Each of the batch's streams written to its end, read again from the log, event by event."""
        for stream_id in self.ids:
            after = self.again[stream_id][2] if stream_id in self.again else 0
            rows, ledger, stopped = _isolate(self.conn, self.model, stream_id, after, self.reread(stream_id),
                                             self.skipped.get(stream_id, set()))
            self.folded.rows += _live(rows)
            self.folded.ledger_rows += ledger
            self.folded.failed += stopped


def _isolate(conn: psycopg.Connection[Any], model: ReadModel, stream_id: UUID, after: int,
             events: list[EventEnvelope], passed: set[int]) -> tuple[Rows, int, bool]:
    """A stream written event by event, as the live projector's isolation writes it (each event's
    changed rows and appended ones, then its tracking), from its ``events`` after version ``after``
    (stored in earlier batches): it stops at the first event that cannot be folded or whose rows
    PostgreSQL refuses. Its rows, how many rows it appended, and whether it stopped."""
    rows: Rows = {}
    ledger = 0
    version: int | None = after or None
    stopped = False
    with conn.transaction():
        for env in events:
            if not relevant(model, env):
                continue
            if env.version in passed:
                version = env.version
                continue
            if env.version <= after:  # stored in an earlier batch: folded, not written again
                model.apply(rows, env)
                continue
            try:
                changed, appended = model.evolve(rows, env)
                with conn.transaction():  # a savepoint: a refused write undoes only this event
                    write_rows(conn, model, model.keyed_table + SHADOW, changed, list(changed))
                    insert_appended(conn, model, SHADOW, appended)
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.warning("%s: a rebuild stops stream %s at v%d (position %d), as the live model: %s",
                            model.name, env.stream_id, env.version, env.id, describe(exc))
                stopped = True
                break
            rows.update(changed)
            ledger += len(appended)
            version = env.version
        if version is not None:
            write_tracking(conn, model, SHADOW, {stream_id: version})
    return rows, ledger, stopped
