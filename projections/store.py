"""Read models in PostgreSQL (schema ``palette_read``): one apply path with per-stream tracking,
dead letters, the lag. The folds are pure (``projections.models``); this module only loads and
writes rows. The tables are made in ``projections.schema``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.contracts.envelope import EnvelopeInvalid, EventEnvelope, decode, encode
from domain.contracts.streams import topic_prefix
from domain.text import escaped
from projections import batch
from projections.models import READ_MODELS
from projections.models.base import Key, ReadModel, Row, Rows
from projections.schema import REBUILD_LOCK, ident, lock_id, new_streams_lock_id, table, tracking_table

log = logging.getLogger("palette.projections")
# SQLSTATE classes where the database, not the event, failed: connection (08), transaction
# rollback (40: serialization, deadlock), resources (53), operator intervention (57: shutdown,
# canceled statement), lock not available (55P03).
TRANSIENT_SQLSTATE = ("08", "40", "53", "57")
BULK_ROWS = 1000  # rows of one table from one batch written by COPY rather than one upsert of arrays


def is_transient(exc: BaseException) -> bool:
    """The database or the connection failed, not the event: raise (the process restarts and
    tries again) rather than park anything. Errors of the event store's own layer (a fill reads
    through it) count the same way."""
    from eventsourcing.persistence import InterfaceError as StoreInterfaceError
    from eventsourcing.persistence import OperationalError as StoreOperationalError

    if isinstance(exc, (StoreOperationalError, StoreInterfaceError, psycopg.InterfaceError, ConnectionError)):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:  # no answer from the server: the connection itself
            return isinstance(exc, psycopg.OperationalError)
        return state.startswith(TRANSIENT_SQLSTATE) or state == "55P03"
    return False


@dataclass
class BatchResult:
    applied: int = 0
    skipped: int = 0  # duplicates and stale redeliveries
    parked: int = 0
    filled: int = 0  # events read from the log to close a hole the broker left
    per_model: dict[str, int] = field(default_factory=dict)


def _rows_query(model: ReadModel, tbl: str, keys: set[Key]) -> tuple[sql.Composed, list[Any]]:
    select = sql.SQL(", ").join(ident(c) for c in model.column_names)
    types = {c.name: c.sql_type for c in model.columns}
    if len(model.key) == 1:
        query = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%b::{}[])").format(
            select, table(tbl), ident(model.key[0]), sql.SQL(types[model.key[0]]))
        return query, [_column(types[model.key[0]], [k[0] for k in keys])]
    # Composite keys: one primary-key lookup per key (LATERAL). An IN (unnest) semi-join lets
    # the planner scan the whole table, which grows with every job.
    unnest = sql.SQL(", ").join(sql.SQL("%b::{}[]").format(sql.SQL(types[k])) for k in model.key)
    names = [f"k{i}" for i in range(len(model.key))]
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{} = k.{}").format(ident(col), sql.Identifier(n)) for col, n in zip(model.key, names, strict=True))
    select_t = sql.SQL(", ").join(sql.SQL("t.{}").format(ident(c)) for c in model.column_names)
    query = sql.SQL("SELECT {} FROM unnest({}) AS k({}) CROSS JOIN LATERAL (SELECT * FROM {} t WHERE {}) t").format(
        select_t, unnest, sql.SQL(", ").join(sql.Identifier(n) for n in names), table(tbl), match)
    return query, [_column(types[k], [key[i] for key in keys]) for i, k in enumerate(model.key)]


def _parse_rows(model: ReadModel, records: Sequence[Sequence[Any]]) -> Rows:
    rows: Rows = {}
    names = model.column_names
    for rec in records:
        row = dict(zip(names, rec, strict=True))
        rows[tuple(row[k] for k in model.key)] = row
    return rows


def _column(sql_type: str, values: list[Any]) -> list[Any]:
    """One column's values as one array: an array holds one Python type, and a fold may keep an
    id as text (from an event's data) or as a UUID (a stream id). Arrays go as binary (``%b``):
    psycopg writes an array's text form in Python, 1-8 µs an element (a pattern search and an
    escape each; a timestamp's text is the dearest), against ~0.5 µs in binary."""
    if sql_type == "uuid":
        return [v if v is None or isinstance(v, UUID) else UUID(str(v)) for v in values]
    return values


def copy_rows(conn: psycopg.Connection[Any], target: sql.Composable, columns: Sequence[str],
              records: Iterable[Sequence[Any]]) -> None:
    """``records`` into ``target`` by COPY: no per-row parameters, no planning. In text form, so
    the server checks every value as an INSERT would (a binary COPY would take an integer past an
    ``integer`` column's range silently, and refuse what the live path's casts accept)."""
    stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(target, sql.SQL(", ").join(ident(c) for c in columns))
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for record in records:
            copy.write_row(record)


def _values(columns: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A row's values in the order of ``columns``, as one tuple (taken in C, not a loop per row)."""
    if len(columns) == 1:
        return lambda row: (row[columns[0]],)
    return itemgetter(*columns)


def _bulk_upsert(conn: psycopg.Connection[Any], tbl: str, columns: Sequence[str], key: Sequence[str],
                 records: Iterable[Sequence[Any]]) -> None:
    """An upsert by COPY: the rows into a temporary table shaped like ``tbl``, then moved into it
    in one statement (which leaves the temporary table empty for the next one)."""
    stage = sql.Identifier(f"stage_{tbl}")
    conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
        stage, table(tbl)))
    copy_rows(conn, stage, columns, records)
    names = sql.SQL(", ").join(ident(c) for c in columns)
    non_key = [c for c in columns if c not in key]
    conn.execute(sql.SQL(
        "WITH moved AS (DELETE FROM {} RETURNING *) INSERT INTO {} ({}) SELECT {} FROM moved "
        "ON CONFLICT ({}) DO UPDATE SET {}").format(
        stage, table(tbl), names, names, sql.SQL(", ").join(ident(k) for k in key),
        sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in non_key)))


def write_rows(conn: psycopg.Connection[Any], model: ReadModel, tbl: str, rows: Rows, keys: Iterable[Key],
               found: Container[Key] | None = None) -> None:
    """The changed rows in one statement (an upsert over ``unnest`` of one array per column: a
    batch's rows cost one round of parsing and planning, not one per row); deleted ones by key.
    Many rows (a catch-up page) go through COPY instead (not in a pipeline): straight into the
    table for the keys the batch read and did not find (``found``: those it did), through a
    staging table (``_bulk_upsert``) for the rest."""
    names = model.column_names
    changed = [k for k in keys if rows.get(k) is not None]
    upserts = [rows[k] for k in changed]
    deletes = [k for k in keys if k in rows and rows[k] is None]
    if len(upserts) >= BULK_ROWS and not conn.pgconn.pipeline_status:  # a bulk batch's big table
        _copy_fresh(conn, tbl, names, model.key, list(map(_values(names), upserts)),
                    None if found is None else [k in found for k in changed])
    elif upserts:
        non_key = [c for c in names if c not in model.key]
        stmt = sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT ({}) DO UPDATE SET {}").format(
            table(tbl), sql.SQL(", ").join(ident(c) for c in names),
            sql.SQL(", ").join(sql.SQL("%b::{}[]").format(sql.SQL(c.sql_type)) for c in model.columns),
            sql.SQL(", ").join(ident(k) for k in model.key),
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in non_key),
        )
        conn.execute(stmt, [_column(c.sql_type, [r[c.name] for r in upserts])  # type: ignore[index]
                            for c in model.columns])
    if deletes:
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(ident(k)) for k in model.key)
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("DELETE FROM {} WHERE {}").format(table(tbl), where), [list(k) for k in deletes])


def _copy_fresh(conn: psycopg.Connection[Any], tbl: str, columns: Sequence[str], key: Sequence[str],
                records: Sequence[Sequence[Any]], found: Sequence[bool] | None) -> None:
    """``records`` into ``tbl``: by COPY straight into it where ``found`` says the batch read no
    such row, by ``_bulk_upsert`` otherwise (all of them when ``found`` is None). A row that some
    other writer (a second projector catching up) added since fails the batch with a unique
    violation rather than being doubled, and ``apply_isolating`` applies it again, reading afresh."""
    if found is None:
        _bulk_upsert(conn, tbl, columns, key, records)
        return
    fresh: list[Sequence[Any]] = []
    known: list[Sequence[Any]] = []
    for record, seen in zip(records, found, strict=True):
        (known if seen else fresh).append(record)
    if fresh:
        copy_rows(conn, table(tbl), columns, fresh)
    if known:
        _bulk_upsert(conn, tbl, columns, key, known)


def insert_appended(conn: psycopg.Connection[Any], model: ReadModel, suffix: str, rows: Sequence[Row]) -> None:
    """The rows the batch appends to the model's append-only table (a ledger); many by COPY."""
    if not rows or model.append is None:
        return
    target = table(model.append.name + suffix)
    columns = model.append.columns
    records = list(map(_values(columns), rows))
    if len(records) >= BULK_ROWS and not conn.pgconn.pipeline_status:
        copy_rows(conn, target, columns, records)
        return
    stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        target, sql.SQL(", ").join(ident(c) for c in columns),
        sql.SQL(", ").join(sql.Placeholder() for _ in columns))
    with conn.cursor() as cur:
        cur.executemany(stmt, records)


def write_tracking(conn: psycopg.Connection[Any], model: ReadModel, suffix: str, advanced: dict[UUID, int],
                   found: Container[UUID] | None = None) -> None:
    """Each stream's new version (what the model has folded of it); many by COPY, straight into
    the table for the streams the batch read no tracking of (``found``: those it did)."""
    tbl = tracking_table(model, suffix)
    if len(advanced) >= BULK_ROWS and not conn.pgconn.pipeline_status:
        _copy_fresh(conn, tbl, ("stream_id", "version"), ("stream_id",), list(advanced.items()),
                    None if found is None else [s in found for s in advanced])
    elif advanced:
        conn.execute(sql.SQL(
            "INSERT INTO {} (stream_id, version) SELECT * FROM unnest(%b::uuid[], %b::bigint[]) "
            "ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version"
        ).format(table(tbl)), [list(advanced), list(advanced.values())])


def _new_streams_lock(model: ReadModel, suffix: str = "") -> sql.Composed:
    """Taken (until the batch commits) when a stream of the batch has no tracking row yet: that
    stream has no row for ``_tracking_query`` to lock, so two batches of it (a sweep's or another
    projector's beside the live one) each folded it from nothing, the later commit's fold,
    tracking included, written over the other's even when it was the shorter. Behind it, the
    other batch's tracking read (a statement after it, a snapshot after the first commit) finds
    the row. One lock per model and no write: the live projector alone never waits for it."""
    return sql.SQL("SELECT pg_advisory_xact_lock({}) WHERE EXISTS (SELECT FROM unnest(%b::uuid[]) AS s "
                   "WHERE NOT EXISTS (SELECT FROM {} t WHERE t.stream_id = s))").format(
        sql.Literal(new_streams_lock_id(model, suffix)), table(tracking_table(model, suffix)))


def _tracking_query(model: ReadModel, suffix: str = "") -> sql.Composed:
    """The streams' tracking rows, locked in stream id order whatever the plan (the lock is taken
    above the sort): a scan in the table's order took them in that order, an index scan in the
    ids', and two batches of a model that took the two plans could each hold what the other
    waited for."""
    return sql.SQL("SELECT stream_id, version FROM {} WHERE stream_id = ANY(%b) ORDER BY stream_id FOR UPDATE").format(
        table(tracking_table(model, suffix)))


def storable(text: str, limit: int = 2000) -> str:
    """``text`` as PostgreSQL can store it: no NUL, no lone surrogates (an error message may quote
    the very value that failed)."""
    return escaped(text[:limit])


def describe(exc: BaseException) -> str:
    return storable(f"{type(exc).__name__}: {exc}")


def _park(conn: psycopg.Connection[Any], model: ReadModel, env: EventEnvelope, error: str, status: str) -> None:
    conn.execute(sql.SQL(
        "INSERT INTO {} (model, stream_id, version, position, envelope, error, status) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (model, stream_id, version) DO NOTHING"
    ).format(table("dead_letters")),
        [model.name, env.stream_id, env.version, env.id, encode(env), storable(error), status])


def unapplied(conn: psycopg.Connection[Any], model: ReadModel, events: sql.Identifier) -> tuple[int, int | None]:
    """Exact lag: how many stored events the model has not folded yet, and the oldest one's position."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), min(e.notification_id) FROM {} e LEFT JOIN {} t ON t.stream_id = e.originator_id "
        "WHERE e.topic LIKE %s AND e.originator_version > coalesce(t.version, 0)"
    ).format(events, table(tracking_table(model))),
        [topic_prefix(model.stream_type) + "%"]).fetchone()
    assert row is not None
    return int(row[0]), row[1]


def oldest_needed(conn: psycopg.Connection[Any], model: ReadModel, events: sql.Identifier) -> int | None:
    """The position of the oldest stored event the model still has to fold from a delivery: not
    folded yet, and not waiting as a dead letter itself (a retry reads those from the table). An
    event of a stream that has one, not delivered yet, is still needed: only a delivery holds it
    behind the parked one, and a retry reads no other."""
    row = conn.execute(sql.SQL(
        "SELECT min(e.notification_id) FROM {} e LEFT JOIN {} t ON t.stream_id = e.originator_id "
        "WHERE e.topic LIKE %s AND e.originator_version > coalesce(t.version, 0) AND NOT EXISTS ("
        "SELECT 1 FROM {} d WHERE d.model = %s AND d.stream_id = e.originator_id "
        "AND d.version = e.originator_version AND d.status IN ('parked', 'held'))"
    ).format(events, table(tracking_table(model)), table("dead_letters")),
        [topic_prefix(model.stream_type) + "%", model.name]).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _touched(model: ReadModel, todo: Iterable[EventEnvelope]) -> set[Key]:
    """The keys of the rows ``todo`` changes, read before the fold (``map`` and ``set.update``
    keep the loop in C: a catch-up page asks it of 20k events)."""
    keys: set[Key] = set()
    for found in map(model.keys_for, todo):
        keys.update(found)
    return keys


def advance_positions(conn: psycopg.Connection[Any], models: Iterable[ReadModel], position: int) -> None:
    """Every model of ``models`` has folded the log up to ``position`` (positions never go back)."""
    with conn.cursor() as cur:
        cur.executemany(_positions_sql(), [[m.name, position] for m in models])


def _positions_sql() -> sql.Composed:
    return sql.SQL(
        "INSERT INTO {} (model, position, updated_at) VALUES (%s, %s, now()) "
        "ON CONFLICT (model) DO UPDATE SET position = GREATEST({}.position, EXCLUDED.position), "
        "updated_at = now()").format(table("positions"), table("positions"))


Fill = Callable[[dict[UUID, tuple[int, int]]], list[EventEnvelope]]


def _blocked(cur: psycopg.Cursor[Any] | None, streams: dict[UUID, UUID]) -> dict[str, set[UUID]]:
    """The batch's streams each model holds a parked or held letter for: their events wait behind it."""
    blocked: dict[str, set[UUID]] = {}
    for name, stream in cur.fetchall() if cur is not None else []:
        blocked.setdefault(name, set()).add(streams.get(stream, stream))
    return blocked


def apply_batch(conn: psycopg.Connection[Any], envelopes: Sequence[EventEnvelope],
                models: Iterable[ReadModel] | None = None, fill: Fill | None = None, *,
                suffix: str = "", park: bool = True, bulk: bool = False) -> BatchResult:
    """Fold a batch into the read models in ONE transaction, tracking included, in three round
    trips (pipelined): locks + tracking + dead letters; current rows; all writes.

    ``fill`` reads from the event log the versions a batch lacks (a message the broker lost);
    without it, events after a hole wait (uncounted) for a later delivery or the sweep. A rebuild
    folds into its ``suffix``ed tables (the positions, the live projector's, are left alone);
    with ``park`` off, a failing event raises instead of being parked. ``bulk`` (a catch-up page)
    writes large tables by COPY, which a pipeline cannot carry."""
    result = BatchResult()
    if not envelopes:
        return result
    chosen = list(models or READ_MODELS.values())
    share = {m.name: batch.relevant_events(m, envelopes) for m in chosen}
    active = [m for m in chosen if share[m.name]]
    streams = {e.stream_id: e.stream_id for e in envelopes}  # one UUID object per stream (lookups by identity)
    top = max(e.id for e in envelopes)
    with conn.transaction():
        with conn.pipeline():
            locks = sorted(lock_id(m) for m in active)
            if locks:
                conn.execute("SELECT pg_advisory_xact_lock_shared(k) FROM unnest(%s::bigint[]) AS k", [locks])
            tracked_cur = {}
            for m in active:
                ids = list({e.stream_id for e in share[m.name]})
                conn.execute(_new_streams_lock(m, suffix), [ids])
                tracked_cur[m.name] = conn.execute(_tracking_query(m, suffix), [ids])
            blocked_cur = conn.execute(sql.SQL(
                "SELECT model, stream_id FROM {} WHERE status IN ('parked', 'held') AND stream_id = ANY(%b)"
            ).format(table("dead_letters")), [list(streams)]) if park else None
        blocked = _blocked(blocked_cur, streams)
        tracked = {m.name: {streams.get(r[0], r[0]): r[1] for r in tracked_cur[m.name].fetchall()} for m in active}
        plans = {m.name: batch.plan(m, share[m.name], tracked[m.name], blocked.get(m.name, set())) for m in active}
        gaps = batch.merge_gaps(plans.values())
        if gaps and fill is not None:
            found = fill(gaps)
            result.filled = len(found)
            plans = {m.name: batch.plan(m, [*share[m.name], *found], tracked[m.name], blocked.get(m.name, set()))
                     for m in active}
        result.skipped = sum(p.skipped for p in plans.values())
        touched = {m.name: _touched(m, plans[m.name].todo) for m in active}
        with conn.pipeline():
            rows_cur = {}
            for m in active:
                if touched[m.name]:
                    query, params = _rows_query(m, m.keyed_table + suffix, touched[m.name])
                    rows_cur[m.name] = conn.execute(query, params)
        writes: list[tuple[ReadModel, Rows, set[Key], set[Key], batch.Folded]] = []
        for m in active:
            p = plans[m.name]
            keys = touched[m.name]
            rows = _parse_rows(m, rows_cur[m.name].fetchall()) if m.name in rows_cur else {}
            present = set(rows)  # the keys the table holds; the fold adds the others
            folded = batch.fold(m, rows, p.todo, p.held, blocked.get(m.name, set()))
            failures = [error for _, error, status in folded.parks if status == "parked"]
            if failures and not park:
                raise ValueError(failures[0])
            result.applied += folded.applied
            result.parked += len(folded.parks)
            result.per_model[m.name] = result.per_model.get(m.name, 0) + len(folded.advanced)
            writes.append((m, rows, keys, present, folded))
        with contextlib.nullcontext() if bulk else conn.pipeline():
            for m, rows, keys, present, folded in writes:
                for e, error, status in folded.parks:
                    _park(conn, m, e, error, status)
                write_rows(conn, m, m.keyed_table + suffix, rows, keys, present)
                insert_appended(conn, m, suffix, folded.appended)
                write_tracking(conn, m, suffix, folded.advanced, tracked[m.name])
            if not suffix:
                advance_positions(conn, chosen, top)
    return result


def dead_letters(conn: psycopg.Connection[Any], status: Sequence[str] = ("parked", "held")) -> list[dict[str, Any]]:
    rows = conn.execute(sql.SQL(
        "SELECT id, model, stream_id, version, position, error, status, parked_at FROM {} "
        "WHERE status = ANY(%s) ORDER BY model, stream_id, version").format(table("dead_letters")),
        [list(status)]).fetchall()
    keys = ("id", "model", "stream_id", "version", "position", "error", "status", "parked_at")
    return [dict(zip(keys, r, strict=True)) for r in rows]


class RebuildRunning(RuntimeError):
    """A skip refused while a rebuild runs: the rebuild read the skips when it began."""


def resolve_dead_letter(conn: psycopg.Connection[Any], letter_id: int, action: str,
                        fill: Fill | None = None) -> BatchResult:
    """``retry`` re-applies the parked event and those held behind it; ``skip`` marks it skipped
    (advancing the stream's tracking past it; a rebuild passes over it too) and then applies the
    held ones. What fails again is parked again, with its new error. A held stream takes its
    events as they come, holes included (a version the broker lost): ``fill`` reads those from
    the log, as the projector's does; without it the events after a hole leave the table unfolded."""
    if action not in ("retry", "skip"):
        raise ValueError("action must be retry or skip")
    find = sql.SQL("SELECT model, stream_id, version FROM {} WHERE id = %s AND status = 'parked'").format(
        table("dead_letters"))
    with conn.transaction():
        if action == "skip":
            got = conn.execute("SELECT pg_try_advisory_xact_lock_shared(%s)", [REBUILD_LOCK]).fetchone()
            if not got or not got[0]:
                raise RebuildRunning("a rebuild is running; skip once it has finished (nothing changed)")
        row = conn.execute(find, [letter_id]).fetchone()
        if row is None:
            raise LookupError(f"no parked event with id {letter_id}")
        model = READ_MODELS.get(row[0])
        if model is None:  # a read model dropped since (a KeyError would say only its name)
            raise LookupError(f"parked event {letter_id} is of read model {row[0]!r}, which no longer exists")
        # The model's lock, exclusive (the projector's batches hold it shared): a batch that read
        # this stream's letters before and writes one it holds behind them after this transaction's
        # DELETE would leave that one held behind nothing, for good. Taken, every batch of the
        # model before is committed and none starts until this one is; the letter is read again.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id(model)])
        row = conn.execute(find, [letter_id]).fetchone()
        if row is None:
            raise LookupError(f"no parked event with id {letter_id}")
        model_name, stream_id, version = row
        letters = conn.execute(sql.SQL(
            "SELECT id, version, envelope FROM {} WHERE model = %s AND stream_id = %s "
            "AND status IN ('parked', 'held') ORDER BY version").format(table("dead_letters")),
            [model_name, stream_id]).fetchall()
        try:
            envelopes = [decode(bytes(raw)) for _, _, raw in letters]
        except EnvelopeInvalid as e:  # written by hand: the projector parks only envelopes it decoded
            raise LookupError(f"an event parked or held on stream {stream_id} is no envelope ({e}); "
                              "nothing changed") from None
        if action == "skip":
            conn.execute(sql.SQL(
                "INSERT INTO {} (stream_id, version) VALUES (%s, %s) ON CONFLICT (stream_id) "
                "DO UPDATE SET version = GREATEST({}.version, EXCLUDED.version)"
            ).format(table(tracking_table(model)), table(tracking_table(model))), [stream_id, version])
            conn.execute(sql.SQL("UPDATE {} SET status = 'skipped' WHERE id = %s")
                         .format(table("dead_letters")), [letter_id])
            envelopes = [e for e in envelopes if e.version != version]
        # The rest leave the table and go through the fold again; a failure parks them anew.
        conn.execute(sql.SQL("DELETE FROM {} WHERE model = %s AND stream_id = %s AND status IN ('parked', 'held')")
                     .format(table("dead_letters")), [model_name, stream_id])
        try:
            # Nested transactions (savepoints), as the live projector isolates a batch: a write
            # that fails undoes only its part, and the event PostgreSQL refuses is the one parked
            # (those before it folded, those after held), not the first of them with its error.
            result = apply_isolating(conn, envelopes, fill, models=[model])
        except Exception as exc:
            if is_transient(exc):
                raise
            result = BatchResult(parked=len(envelopes))
            for n, env in enumerate(envelopes):
                _park(conn, model, env, describe(exc) if n == 0 else batch.HELD, "parked" if n == 0 else "held")
    return result


def add_result(total: BatchResult, part: BatchResult) -> None:
    total.applied += part.applied
    total.skipped += part.skipped
    total.parked += part.parked
    total.filled += part.filled
    for name, n in part.per_model.items():
        total.per_model[name] = total.per_model.get(name, 0) + n


def apply_isolating(conn: psycopg.Connection[Any], envelopes: Sequence[EventEnvelope],
                    fill: Fill | None = None, *, bulk: bool = False,
                    models: Sequence[ReadModel] | None = None, suffix: str = "") -> BatchResult:
    """``apply_batch`` (into ``models``, all by default; into their ``suffix``ed tables, a
    rebuild's, with ``suffix``); when it fails for any reason but the database (``is_transient``),
    again model by model, and in a failing model event by event: an event whose fold or write
    fails is parked with its error (its stream's later events are held behind it) and every other
    stream goes on."""
    try:
        return apply_batch(conn, envelopes, models, fill=fill, bulk=bulk, suffix=suffix)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.warning("batch of %d event(s) failed (%s); applying it event by event", len(envelopes), describe(exc))
    total = BatchResult()
    for model in models or READ_MODELS.values():
        share = sorted((e for e in envelopes if batch.relevant(model, e)), key=lambda e: e.id)
        if not share:
            continue
        try:
            add_result(total, apply_batch(conn, share, [model], fill, bulk=bulk, suffix=suffix))
            continue
        except Exception as exc:
            if is_transient(exc):
                raise
            # otherwise this model has the poison: found event by event below
        for env in share:
            try:
                add_result(total, apply_batch(conn, [env], [model], fill, suffix=suffix))
            except Exception as exc:
                if is_transient(exc):
                    raise
                error = describe(exc)  # parked with its error, not fatal
                with conn.transaction():
                    _park(conn, model, env, error, "parked")
                total.parked += 1
                log.error("%s: parked event %s v%d (position %d): %s",
                          model.name, env.stream_id, env.version, env.id, error)
    return total
