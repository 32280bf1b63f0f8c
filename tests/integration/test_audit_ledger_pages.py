"""A user's ledger a page at a time (``projections.audit.ledger`` with ``after_seq`` and
``limit``, behind ``GET /audit/ledger``'s cursor) on real PostgreSQL: the pages of any period put
together are the period's entries, each with the running balance an oracle adds up in Python
from the raw rows. Each example's rows live in a transaction that is rolled back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.settings import Settings
from projections import audit
from projections.schema import ensure_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KINDS = {"grant": 1, "reserve": -1, "spend": 0, "refund": 1}  # the sign of each kind's balance_delta


@pytest.fixture(scope="module")
def conn(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as c:
        ensure_schema(c)  # the read models' tables, as the projector makes them
    with psycopg.connect(settings.effective_database_url) as c:  # not autocommit: rolled back
        yield c


# Times from a dozen minutes, so that entries often fall exactly on a period's bounds (from 0 to
# 100 minutes, hardly any example put one there: an exclusive `to` or an opening that counted the
# entries at `from` passed).
MINUTES = st.integers(0, 12)
rows_strategy = st.lists(st.tuples(st.sampled_from(sorted(KINDS)), st.integers(1, 500),
                                   MINUTES),  # kind, amount, minutes after T0 (any order)
                         max_size=40)


@given(rows=rows_strategy, since=st.none() | MINUTES, until=st.none() | MINUTES,
       limit=st.integers(1, 7))
@example(rows=[("grant", 5, 2), ("grant", 7, 3), ("refund", 9, 6), ("grant", 11, 7)], since=3, until=6, limit=1)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_pages_of_a_period_are_its_entries_with_their_running_balance(
        conn: psycopg.Connection[Any], rows: list[tuple[str, int, int]], since: int | None, until: int | None,
        limit: int) -> None:
    user_id = uuid.uuid4()
    raw = [{"seq": seq, "type": kind, "amount": amount, "balance_delta": KINDS[kind] * amount,
            "occurred_at": T0 + timedelta(minutes=minute)}
           for seq, (kind, amount, minute) in enumerate(rows, start=1)]
    start = None if since is None else T0 + timedelta(minutes=since)
    end = None if until is None else T0 + timedelta(minutes=until)
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, balance_delta, ref, "
                "occurred_at, position, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, '', %s, %s, '', '')",
                [(f"{user_id}-{r['seq']}", user_id, r["seq"], r["type"], r["amount"], r["balance_delta"],
                  r["occurred_at"], r["seq"]) for r in raw])
        # The oracle: the opening is every entry before the period; the period's entries in seq order.
        balance = sum(r["balance_delta"] for r in raw if start is not None and r["occurred_at"] < start)
        expected = []
        for r in raw:
            if (start is None or r["occurred_at"] >= start) and (end is None or r["occurred_at"] <= end):
                balance += r["balance_delta"]
                expected.append((r["seq"], r["type"], r["amount"], balance))

        got: list[tuple[int, str, int, int]] = []
        after = 0
        while True:  # as GET /audit/ledger pages: one more than the page, to know there is a next
            page = audit.ledger(conn, user_id, start, end, after_seq=after, limit=limit + 1)
            got += [(e["seq"], e["type"], e["amount"], e["balance"]) for e in page[:limit]]
            if len(page) <= limit:
                break
            assert page[limit - 1]["seq"] > after, "a page that does not move past its cursor"  # else no end
            after = page[limit - 1]["seq"]
            assert len(got) <= len(expected), "more entries paged than the period holds"
        assert got == expected
        whole = audit.ledger(conn, user_id, start, end)
        assert [(e["seq"], e["type"], e["amount"], e["balance"]) for e in whole] == expected
    finally:
        conn.rollback()


def _insert(conn: psycopg.Connection[Any], user_id: uuid.UUID, rows: list[tuple[int, str, int, int]]) -> None:
    """Ledger rows (seq, type, amount, position) for one user, inside the caller's transaction."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, balance_delta, ref, "
            "occurred_at, position, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, '', %s, %s, '', '')",
            [(f"{user_id}-{seq}", user_id, seq, kind, amount, KINDS[kind] * amount, T0, position)
             for seq, kind, amount, position in rows])


@pytest.mark.parametrize("page", [1, 2, 3])
def test_an_export_read_page_by_page_holds_every_row_once_even_rows_sharing_a_position(
        conn: psycopg.Connection[Any], page: int) -> None:
    """One settlement writes its spend and its refund at the same log position: a page may end
    between them, and the next must still start with the second."""
    try:
        _insert(conn, uuid.uuid4(), [(1, "grant", 9, 10**12), (2, "reserve", 5, 10**12 + 1),
                                     (3, "spend", 3, 10**12 + 2), (4, "refund", 2, 10**12 + 2)])
        _insert(conn, uuid.uuid4(), [(1, "grant", 4, 10**12 + 2)])
        everything = conn.execute("SELECT id FROM palette_read.billing_events ORDER BY position, id").fetchall()
        assert [r["id"] for r in audit.export(conn, page=page)] == [r[0] for r in everything]
    finally:
        conn.rollback()
