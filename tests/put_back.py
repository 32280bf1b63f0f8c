"""Read-model rows a test edits by hand, put back as the log's fold says when it ends.

The session's stores are shared: a read-model row a test leaves apart from the log's fold fails
the whole-log tests after it (tests/integration/test_projections.py), far from the cause. Saving
the edited values and writing them back is not enough: the projector may fold the row's stream on
meanwhile (a job finishing, the sweeper expiring it), on top of the edited row or under it, and
the saved values then undo what it folded. So the rows are folded again from the stream's events,
up to the version the model has tracked of it, under that tracking row's lock (the one the
projector takes before it reads a row): its next batch folds on from a row the log agrees with.
A table no projector writes (the sweeper's cursors) gets its saved values back instead."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from projections.models.base import ReadModel, Rows
from projections.replay import Replayer


@contextmanager
def rows_refolded(conn: psycopg.Connection[Any], app: Any, model: ReadModel,
                  streams: Sequence[UUID | str]) -> Iterator[None]:
    """The rows of ``model`` that ``streams`` fold into, when the block ends, as the fold of those
    streams' events (``app``'s log) up to the versions ``model`` has tracked, written over what the
    table holds under their keys (a row the fold deleted, deleted). ``conn`` autocommits."""
    ids = sorted(UUID(str(s)) for s in streams)
    try:
        yield
    finally:
        schema = sql.Identifier("palette_read", model.keyed_table)
        with conn.transaction():
            tracked = dict(conn.execute(sql.SQL(
                "SELECT stream_id, version FROM {} WHERE stream_id = ANY(%s) ORDER BY stream_id FOR UPDATE"
            ).format(sql.Identifier("palette_read", f"{model.name}_tracking")), [ids]).fetchall())
            rows: Rows = {}
            for stream in ids:
                for env in Replayer(app).stream(stream):
                    if env.version > tracked.get(stream, 0):
                        break
                    model.apply(rows, env)
            where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in model.key)
            columns = model.column_names
            for key, row in rows.items():
                conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(schema, where), list(key))
                if row is not None:
                    conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        schema, sql.SQL(", ").join(map(sql.Identifier, columns)),
                        sql.SQL(", ").join(sql.Placeholder() * len(columns))), [row[c] for c in columns])


@contextmanager
def rows_put_back(conn: psycopg.Connection[Any], name: sql.Identifier, key: str, keys: Sequence[Any],
                  columns: Sequence[str]) -> Iterator[None]:
    """``columns`` of the rows of table ``name`` (one no projector writes) whose ``key`` is in
    ``keys``, as they are now, back when the block ends; a row that was not there is deleted.
    ``conn`` autocommits."""
    where = sql.SQL("{} = %s").format(sql.Identifier(key))
    saved = {k: conn.execute(sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), name, where), [k]).fetchone() for k in keys}
    try:
        yield
    finally:
        for k, row in saved.items():
            if row is None:
                conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(name, where), [k])
            else:
                conn.execute(sql.SQL("UPDATE {} SET ({}) = ROW({}) WHERE {}").format(
                    name, sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(sql.Placeholder() * len(columns)), where), [*row, k])
