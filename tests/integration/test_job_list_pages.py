"""A user's job list a page at a time (``projections.queries.list_jobs``, behind GET /jobs) on
real PostgreSQL: the pages put together are the user's jobs newest first (ties on the time broken
by id), each once, and the page holding the last job has no next cursor. The oracle sorts the
rows written in Python. Each example's rows live in a transaction that is rolled back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.settings import Settings
from projections.queries import list_jobs
from projections.schema import ensure_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def conn(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as c:
        ensure_schema(c)
    with psycopg.connect(settings.effective_database_url) as c:  # not autocommit: rolled back
        yield c


@given(minutes=st.lists(st.integers(0, 3), max_size=12), limit=st.integers(1, 5))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_pages_of_a_job_list_are_every_job_once_newest_first(conn: psycopg.Connection[Any], minutes: list[int],
                                                                 limit: int) -> None:
    user_id = uuid.uuid4()
    jobs = [(uuid.uuid4(), T0 + timedelta(minutes=m)) for m in minutes]  # equal times are likely
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO palette_read.jobs_log (id, user_id, status, preset, cost_estimate, total_items, "
                "done_items, failed_items, created_at, updated_at, version) "
                "VALUES (%s, %s, 'created', 'interior', 1, 1, 0, 0, %s, %s, 1)",
                [(job, user_id, at, at) for job, at in jobs])
        pages, cursor = [], None
        while True:
            rows, cursor = list_jobs(conn, user_id, limit, cursor)
            pages.append([r["id"] for r in rows])
            if cursor is None:
                break
        newest_first = [job for job, _ in sorted(jobs, key=lambda j: (j[1], j[0]), reverse=True)]
        assert [job for page in pages for job in page] == newest_first
        assert all(0 < len(p) <= limit for p in pages[:-1]) and len(pages) == max(1, -(-len(jobs) // limit))
    finally:
        conn.rollback()
