"""Columns a test edits by hand, put back as they were when it ends.

The session's stores are shared: a read-model row a test leaves apart from the log's fold fails
the whole-log tests after it (tests/integration/test_projections.py), far from the cause."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql


@contextmanager
def rows_put_back(conn: psycopg.Connection[Any], name: sql.Identifier, key: str, keys: Sequence[Any],
                  columns: Sequence[str]) -> Iterator[None]:
    """``columns`` of the rows of table ``name`` whose ``key`` is in ``keys``, as they are now,
    back when the block ends; a row that was not there is deleted. Only those columns: the rest
    may change meanwhile (the projector folding the row's stream on). ``conn`` autocommits."""
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
