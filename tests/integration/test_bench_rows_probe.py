"""The lag figures' read-model probe (tests/bench/rows_probe.py, in a process of its own) on the
session's PostgreSQL: a job's lag runs from its commit to the first poll that finds its row."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from adapters.settings import Settings
from tests.bench.harness import percentile
from tests.bench.relay import JobRows


def seen_soon(rows: JobRows, job: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while job not in rows.seen:  # what the probe found is collected by every read
        assert time.monotonic() < deadline, f"{job} never seen"
        rows.lags_ms()


@contextmanager
def tracking_table(settings: Settings) -> Iterator[tuple[psycopg.Connection, sql.Composable, tuple[str, str]]]:
    """A scratch tracking table (a connection, its identifier, its (schema, table)), dropped after."""
    schema = f"probe_{uuid.uuid4().hex[:8]}"
    table = sql.Identifier(schema, "tracking")
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            conn.execute(sql.SQL("CREATE TABLE {} (stream_id uuid PRIMARY KEY)").format(table))
            yield conn, table, (schema, "tracking")
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_the_probe_sees_each_row_once_it_is_written_and_not_before(settings: Settings) -> None:
    with tracking_table(settings) as (conn, table, name):
        rows = JobRows(settings, table=name)
        early, late, never = (str(uuid.uuid4()) for _ in range(3))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [early])
        rows.commit(early)
        rows.commit(late)
        seen_soon(rows, early)  # the probe has polled since both were committed
        written = time.time()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [late])
        seen_soon(rows, late)
        assert rows.seen[late] >= written  # not seen before its row was there
        assert rows.seen[early] >= rows.commits[early]
        timeline = rows.timeline()
        assert [t for t, _ in timeline] == sorted(rows.commits.values())
        rows.commit(never)
        assert len(rows.lags_ms()) == 2 and rows.timeline()[-1][1] == float("inf")
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [never])
        rows.close()  # ends once every job was seen
        assert set(rows.seen) == {early, late, never}


def test_a_row_never_seen_counts_in_the_lags_as_the_time_it_was_waited_for(settings: Settings) -> None:
    """projection_lag_p99_ms is the p99 of every job created: a row the probe gave up on is the
    slowest of all, not one left out (left out, a read model that lost rows read as fast)."""
    with tracking_table(settings) as (conn, table, name):
        rows = JobRows(settings, table=name, wait_after_s=0.5)
        seen, never = (str(uuid.uuid4()) for _ in range(2))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [seen])
        rows.commit(seen)
        seen_soon(rows, seen)
        rows.commit(never)
        assert len(rows.lags_ms()) == 1  # not seen yet: it may still come
        rows.close()  # gives up on it 0.5 s after
        lags = rows.lags_ms()
        assert len(lags) == 2 and set(rows.seen) == {seen}
        assert lags[1] >= 500 and percentile(lags, 99) == lags[1] > lags[0]
