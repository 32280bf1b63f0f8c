"""Rebuild a read model from the event store without downtime: fold the log in memory into a
shadow table (COPY), catch up under the model's lock, then swap the tables atomically."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.contracts.envelope import EventEnvelope
from domain.contracts.streams import stream_topics
from projections.batch import relevant
from projections.models import READ_MODELS
from projections.models.base import ReadModel, Row, Rows
from projections.schema import create_model_tables, ensure_schema, lock_id, table, tracking_table
from projections.store import apply_batch, copy_rows
from projections.stored_events import from_notification

SHADOW = "__shadow"
REBUILD_LOCK = zlib.crc32(b"palette-read:rebuild")
PAGE = 5000


class RebuildBusy(RuntimeError):
    """Another rebuild holds the lock: one rebuild at a time."""


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
            raise RebuildBusy("another rebuild is running; one rebuild at a time")
        try:
            _drop_shadow(conn, model)
            create_model_tables(conn, model, SHADOW)
            upto = recorder.max_notification_id() or 0
            topics = stream_topics(model.stream_type)  # the model's streams only: the rest is skipped in SQL

            def counted() -> Any:
                for n, env in enumerate(iter_envelopes(recorder, transcoder, 1, upto, topics), 1):
                    if progress and n % 50_000 == 0:
                        progress(n)
                    yield env

            rows, appended, tracking, events, failed = fold_log(model, counted())
            names = model.column_names
            copy_rows(conn, table(model.keyed_table + SHADOW), names,
                      ([r[c] for c in names] for r in rows.values() if r is not None))
            if model.append:
                columns = model.append.columns
                copy_rows(conn, table(model.append.name + SHADOW), columns, ([r[c] for c in columns] for r in appended))
            copy_rows(conn, table(tracking_table(model, SHADOW)), ("stream_id", "version"), tracking.items())
            with conn.transaction():
                # Exclusive: the live projector's batches (shared holders) pause for the swap.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id(model)])
                tail: list[EventEnvelope] = list(iter_envelopes(recorder, transcoder, upto + 1, None, topics))
                apply_batch(conn, tail, [model], suffix=SHADOW, park=False)
                events += len(tail)
                for tbl in _tables(model):
                    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        table(tbl), sql.Identifier(tbl + "__old")))
                    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        table(tbl + SHADOW), sql.Identifier(tbl)))
                    conn.execute(sql.SQL("DROP TABLE {}").format(table(tbl + "__old")))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [REBUILD_LOCK])
    return RebuildReport(name, events, time.perf_counter() - t0,
                         sum(1 for r in rows.values() if r is not None), len(appended), len(failed),
                         log_events=upto)
