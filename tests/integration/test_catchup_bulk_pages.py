"""A catch-up's bulk pages: rows and tracking the page did not find go straight in by a binary
COPY, the others through the staging upsert; streams that span pages fold as the log says, a
second fold of the same pages changes nothing, and pages grow from the first page in commit
order with no event missed or read twice."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from domain.contracts.envelope import EventEnvelope
from projections.catchup import CatchUp
from projections.models.jobs_log import JOBS_LOG
from projections.store import BULK_ROWS, BatchResult, write_rows

from .test_projector_catchup import PagedLog

TABLES = (("jobs_log", "id"), ("jobs_log_tracking", "stream_id"), ("job_items_log", "job_id"),
          ("job_items_log_tracking", "stream_id"), ("dead_letters", "stream_id"))


class RecordedLog(PagedLog):
    """``PagedLog`` that keeps each read's limit and what it returned."""

    def __init__(self, envelopes: list[EventEnvelope]) -> None:
        super().__init__(envelopes)
        self.limits: list[int] = []
        self.pages: list[list[EventEnvelope]] = []

    def read(self, after: int, upto: int, limit: int, stream_types: Any = ()) -> list[EventEnvelope]:
        page = super().read(after, upto, limit)
        self.limits.append(limit)
        if page:
            self.pages.append(page)
        return page


@pytest.fixture
def synthetic(conn: psycopg.Connection[Any]) -> Iterator[tuple[int, list[uuid.UUID]]]:
    """A position far past the real log, and a list the test fills with its streams: their rows
    are removed and the positions put back afterwards."""
    base = 10**12 + random.randrange(10**9)
    streams: list[uuid.UUID] = []
    positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
    yield base, streams
    for tbl, column in TABLES:
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
            sql.Identifier("palette_read", tbl), sql.Identifier(column)), [streams])
    for model, position in positions.items():
        conn.execute("UPDATE palette_read.positions SET position = %s WHERE model = %s", [position, model])


def job_event(stream: uuid.UUID, position: int, version: int, kind: str, **data: Any) -> EventEnvelope:
    return EventEnvelope(id=position, stream_id=stream, stream_type="Job", version=version, type=kind,
                         timestamp=datetime.now(UTC), data=data)


def test_streams_spanning_bulk_pages_fold_as_the_log_says_and_a_second_fold_changes_nothing(
        apps: Any, conn: psycopg.Connection[Any], synthetic: tuple[int, list[uuid.UUID]],
        caplog: pytest.LogCaptureFixture) -> None:
    base, streams = synthetic
    user = str(uuid.uuid4())  # an id as text in the data: a uuid column of jobs_log takes it
    first = [uuid.uuid4() for _ in range(BULK_ROWS + 100)]  # created in page one, uploaded later
    later = [uuid.uuid4() for _ in range(len(first))]  # created beside those uploads
    streams += first + later
    events = [job_event(s, base + n, 1, "JobCreated", user_id=user, item_count=2, preset="interior")
              for n, s in enumerate(first)]
    for old, new in zip(first, later, strict=True):
        events.append(job_event(old, base + len(events), 2, "UploadConfirmed"))
        events.append(job_event(new, base + len(events), 1, "JobCreated", user_id=user, item_count=2,
                                preset="interior"))
    log = RecordedLog(events)
    catchup = CatchUp(conn, log, threshold=1, page=len(first))  # type: ignore[arg-type]

    total = BatchResult()
    with caplog.at_level(logging.WARNING, logger="palette.projections"):
        assert catchup.fold(base - 1, events[-1].id, total) == events[-1].id
    assert len(log.pages) == 3 and total.parked == 0  # page two holds half old streams, half new ones
    assert not caplog.records  # each page went in whole: none failed and was applied again piecemeal
    expected = {**{s: ("uploaded", 2) for s in first}, **{s: ("created", 1) for s in later}}

    def folded() -> tuple[dict[uuid.UUID, tuple[str, int]], set[Any], dict[uuid.UUID, int], dict[uuid.UUID, int], int]:
        jobs = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT id, status, version FROM palette_read.jobs_log WHERE id = ANY(%s)", [streams])}
        users = {r[0] for r in conn.execute(
            "SELECT DISTINCT user_id FROM palette_read.jobs_log WHERE id = ANY(%s)", [streams])}
        tracked = [dict(conn.execute(sql.SQL("SELECT stream_id, version FROM {} WHERE stream_id = ANY(%s)").format(
            sql.Identifier("palette_read", f"{m}_tracking")), [streams]).fetchall())
            for m in ("jobs_log", "job_items_log")]
        items = conn.execute("SELECT count(*) FROM palette_read.job_items_log WHERE job_id = ANY(%s)",
                             [streams]).fetchone()
        assert items is not None
        return jobs, users, tracked[0], tracked[1], int(items[0])

    once = folded()
    assert once == (expected, {uuid.UUID(user)}, {s: v for s, (_, v) in expected.items()},
                    {s: v for s, (_, v) in expected.items()}, 2 * len(streams))

    again = BatchResult()
    catchup.fold(base - 1, events[-1].id, again)
    assert (again.applied, again.parked) == (0, 0) and again.skipped > 0
    assert folded() == once


def test_pages_grow_from_the_first_page_in_commit_order_with_no_event_missed_or_read_twice(
        apps: Any, conn: psycopg.Connection[Any], synthetic: tuple[int, list[uuid.UUID]]) -> None:
    base, streams = synthetic
    streams += [uuid.uuid4() for _ in range(60)]
    events = [job_event(s, base + n, 1, "JobCreated", user_id=str(uuid.uuid4()), item_count=1, preset="interior")
              for n, s in enumerate(streams)]
    events += [job_event(s, base + len(events) + n, 2, "UploadConfirmed") for n, s in enumerate(streams)]
    log = RecordedLog(events)
    committed: list[int] = []
    catchup = CatchUp(conn, log, threshold=1, page=32, first_page=4, after_page=committed.append)  # type: ignore[arg-type]

    total = BatchResult()
    catchup.fold(base - 1, events[-1].id, total)
    assert log.limits[:5] == [4, 8, 16, 32, 32]
    assert [e.id for page in log.pages for e in page] == [e.id for e in events]
    assert committed == [page[-1].id for page in log.pages]
    assert (total.applied, total.parked) == (2 * len(events), 0)  # jobs_log and job_items_log each
    statuses = conn.execute("SELECT DISTINCT status FROM palette_read.jobs_log WHERE id = ANY(%s)",
                            [streams]).fetchall()
    assert statuses == [("uploaded",)]


def test_a_row_some_other_writer_added_after_the_page_read_fails_the_page_rather_than_doubling(
        apps: Any, conn: psycopg.Connection[Any], synthetic: tuple[int, list[uuid.UUID]]) -> None:
    _, streams = synthetic
    streams += [uuid.uuid4() for _ in range(BULK_ROWS)]
    now = datetime.now(UTC)
    rows: dict[tuple[Any, ...], dict[str, Any] | None] = {
        (s,): {"id": s, "user_id": str(uuid.uuid4()), "status": "created", "preset": "interior", "rule_id": None,
               "cost_estimate": 1, "total_items": 1, "done_items": 0, "failed_items": 0, "created_at": now,
               "finished_at": None, "updated_at": now, "version": 1} for s in streams}
    conn.execute("INSERT INTO palette_read.jobs_log (id, user_id, status, preset, total_items, done_items, "
                 "failed_items, created_at, updated_at, version) VALUES (%s, %s, 'created', 'x', 1, 0, 0, now(), "
                 "now(), 1)", [streams[-1], uuid.uuid4()])  # the other writer's row, unseen by the page
    with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
        write_rows(conn, JOBS_LOG, "jobs_log", rows, list(rows), found=set())
    assert conn.execute("SELECT count(*) FROM palette_read.jobs_log WHERE id = ANY(%s)", [streams]).fetchone() == (1,)
    with conn.transaction():  # told the row is there, the page upserts it
        write_rows(conn, JOBS_LOG, "jobs_log", rows, list(rows), found={(streams[-1],)})
    stored = conn.execute("SELECT count(*), count(DISTINCT user_id) FROM palette_read.jobs_log WHERE id = ANY(%s)",
                          [streams]).fetchone()
    assert stored == (len(streams), len(streams))
