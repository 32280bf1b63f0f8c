"""Rebuild a read model from the event store without downtime: fold the log stream by stream
into shadow tables (COPY, a batch at a time; a batch PostgreSQL refuses again stream by stream,
and the stream it refuses event by event, stopped where the live model stopped it), catch up
under the model's lock (through the live apply path: what cannot be folded is parked), then swap
the tables atomically."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from array import array
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
from projections.log import enveloped, events_by_stream, events_table
from projections.models import READ_MODELS
from projections.models.base import ReadModel, Row, Rows
from projections.schema import REBUILD_LOCK, create_model_tables, ensure_schema, lock_id, table, tracking_table
from projections.store import (
    apply_isolating,
    copy_rows,
    describe,
    insert_appended,
    is_transient,
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
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [REBUILD_LOCK])
    return RebuildReport(name, folded.events, time.perf_counter() - t0, folded.rows, folded.ledger_rows,
                         folded.failed, log_events=upto)


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


@dataclass(slots=True)
class _Part:
    """What one stream added to a batch, as ``_isolate`` reads it: the versions it read (``seen``;
    all of them once it ended) and those the shadow tables held of it before (``after``: a long
    stream's earlier batches)."""

    stream_id: UUID
    seen: int
    after: int
    failed: bool  # an event of it could not be folded (counted already)
    ended: bool


def _fold_into_shadow(conn: psycopg.Connection[Any], model: ReadModel,
                      streams: Iterator[tuple[UUID, Iterator[EventEnvelope]]],
                      progress: Callable[[int], None] | None,
                      skipped: dict[UUID, set[int]] | None = None,
                      reread: Callable[[UUID], list[EventEnvelope]] | None = None) -> _Folded:
    """Fold each stream as the live projector would (``fold_log``'s rules: a stream whose event
    cannot be folded keeps what it had and stops there; an event an operator skipped is passed
    over, its stream's tracking past it, as `dlq skip` left the live model) and copy the rows into
    the model's shadow tables every ``COPY_ROWS``, a batch in one transaction: memory holds one
    stream's keyed rows (a job's 200 items at most) and one batch, not the model. A long stream's
    appended rows (a user's ledger) go out in batches as it is folded, with its keyed rows and
    tracking so far (upserted in its next batches).

    A batch PostgreSQL refuses (a value it cannot store: a NUL or a lone surrogate in text, an
    integer past its column) is written again stream by stream, and a stream it refuses is read
    again from the log (``reread``) and written event by event as the live projector's isolation
    does (``_isolate``): it stops at the event whose rows cannot be stored, its rows and tracking
    as before that event (the live projector parked it; the rebuild leaves its letter as it is)."""
    folded = _Folded()
    keyed: list[Row] = []  # the rows of the streams new to the shadow tables (COPY)
    appended: list[Row] = []
    tracking: list[tuple[UUID, int]] = []  # of the streams new to the shadow tables (COPY)
    # A long stream's rows and tracking so far, and the versions the shadow tables held of it
    # before (written as upserts).
    again: dict[UUID, tuple[Rows, int | None, int]] = {}
    # Each stream of the batch and where its keyed and appended rows end: a list and two arrays,
    # not an object a stream (a batch holds thousands, which the collector would walk).
    ids: list[UUID] = []
    ends = array("q")
    open_part: dict[UUID, int] = {}  # a stream not ended yet: the versions it read
    failed_ids: set[UUID] = set()  # streams with an event they could not fold (counted already)
    batch_rows = [0]  # keyed rows of the streams that ended
    passed_over = skipped or {}

    def store(rows: list[Row], added: list[Row], tracked: list[tuple[UUID, int]],
              upserts: dict[UUID, tuple[Rows, int | None, int]]) -> None:
        names = model.column_names
        copy_rows(conn, table(model.keyed_table + SHADOW), names, ([r[c] for c in names] for r in rows))
        for found, _, _ in upserts.values():  # a long stream's rows so far are there: an upsert (and its deletes)
            write_rows(conn, model, model.keyed_table + SHADOW, found, list(found))
        if model.append:
            columns = model.append.columns
            copy_rows(conn, table(model.append.name + SHADOW), columns, ([r[c] for c in columns] for r in added))
        copy_rows(conn, table(tracking_table(model, SHADOW)), ("stream_id", "version"), tracked)
        write_tracking(conn, model, SHADOW, {s: v for s, (_, v, _) in upserts.items() if v is not None})

    def live(rows: Rows) -> int:
        return sum(r is not None for r in rows.values())

    def copy_out() -> dict[UUID, tuple[Rows, int | None]]:
        """The batch into the shadow tables; the streams stopped at an event PostgreSQL refused,
        with their rows and tracking as before it."""
        stopped: dict[UUID, tuple[Rows, int | None]] = {}
        try:
            with conn.transaction():
                store(keyed, appended, tracking, again)
            folded.ledger_rows += len(appended)
            folded.rows += batch_rows[0]
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("%s: a rebuild's batch of %d stream(s) failed (%s); writing it stream by stream",
                        model.name, len(ids), describe(exc))
            tracked = dict(tracking)
            k0 = a0 = 0
            for n, sid in enumerate(ids):
                k, a = ends[2 * n], ends[2 * n + 1]
                mine, theirs = appended[a0:a], keyed[k0:k]
                k0, a0 = k, a
                upsert = {sid: again[sid]} if sid in again else {}
                ended = sid not in open_part
                try:
                    with conn.transaction():
                        store(theirs, mine, [(sid, tracked[sid])] if sid in tracked else [], upsert)
                except Exception as refused:
                    if is_transient(refused) or reread is None:
                        raise
                    part = _Part(sid, open_part.get(sid, sys.maxsize), upsert[sid][2] if upsert else 0,
                                 sid in failed_ids, ended)
                    rows, version, stop, ledger = _isolate(conn, model, part, reread(sid),
                                                           passed_over.get(sid, set()))
                    folded.ledger_rows += ledger
                    if stop and not part.failed:
                        folded.failed += 1
                    if stop or ended:
                        folded.rows += live(rows)
                    if stop:
                        stopped[sid] = rows, version
                    continue
                folded.ledger_rows += len(mine)
                if ended:
                    folded.rows += live(upsert[sid][0]) if upsert else len(theirs)
        keyed.clear()
        appended.clear()
        tracking.clear()
        again.clear()
        ids.clear()
        del ends[:]
        open_part.clear()
        failed_ids.clear()
        batch_rows[0] = 0
        return stopped

    def add(stream_id: UUID, after: int, failed: bool, rows: Rows, version: int | None) -> None:
        """A stream's rows so far into the batch (those it appended are there)."""
        if after:
            again[stream_id] = rows, version, after
        else:
            keyed.extend(r for r in rows.values() if r is not None)
            if version is not None:
                tracking.append((stream_id, version))
        if failed:
            failed_ids.add(stream_id)
        ids.append(stream_id)
        ends.append(len(keyed))
        ends.append(len(appended))

    no_skips: set[int] = set()
    for stream_id, envelopes in streams:
        rows: Rows = {}
        version: int | None = None
        after = 0
        failed = isolated = False
        passed = passed_over.get(stream_id, no_skips)
        for env in envelopes:
            folded.events += 1
            if progress and folded.events % 50_000 == 0:
                progress(folded.events)
            if failed or not relevant(model, env):
                continue
            if env.version in passed:  # the operator's decision stands: not folded, tracked past
                version = env.version
                continue
            try:
                appended.extend(model.apply(rows, env))
            except Exception:  # noqa: BLE001 - the stream stays parked, as in the live projector
                failed = True
                folded.failed += 1
                continue
            version = env.version
            if len(appended) >= COPY_ROWS:  # a long stream's ledger rows go out as it goes
                add(stream_id, after, failed, rows, version)
                open_part[stream_id] = env.version
                stopped = copy_out()
                if stream_id in stopped:  # stored as before the refused event: the rest is not folded
                    failed = isolated = True
                    rows, version = stopped[stream_id]
                after = env.version
        if isolated:
            continue
        k = len(keyed)
        add(stream_id, after, failed, rows, version)
        batch_rows[0] += live(rows) if after else len(keyed) - k
        if len(keyed) + len(appended) >= COPY_ROWS:
            copy_out()
    copy_out()
    return folded


def _isolate(conn: psycopg.Connection[Any], model: ReadModel, part: _Part, events: list[EventEnvelope],
             passed: set[int]) -> tuple[Rows, int | None, bool, int]:
    """``part``'s stream written event by event, as the live projector's isolation writes it (each
    event's changed rows and appended ones, then its tracking), from its events after
    ``part.after`` to ``part.seen``: it stops at the first event that cannot be folded or whose
    rows PostgreSQL refuses. Its rows and tracking as written, whether it stopped, and how many
    rows it appended."""
    rows: Rows = {}
    ledger = 0
    version: int | None = part.after or None
    stop = False
    with conn.transaction():
        for env in events:
            if env.version > part.seen:
                break
            if not relevant(model, env):
                continue
            if env.version in passed:
                version = env.version
                continue
            if env.version <= part.after:  # stored in an earlier batch: folded, not written again
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
                stop = True
                break
            rows.update(changed)
            ledger += len(appended)
            version = env.version
        if version is not None:
            write_tracking(conn, model, SHADOW, {part.stream_id: version})
    return rows, version, stop, ledger
