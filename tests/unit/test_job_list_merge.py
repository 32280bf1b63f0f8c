"""GET /jobs's pages when the read model lags the caller's own writes (``routes_jobs._merged``):
walked page by page with the cursors the API hands out, the pages are the caller's jobs as the
write side has them, newest first, each once — jobs the model has not seen, jobs it holds an older
version of, and jobs deleted since it folded them (which are not listed) alike. The model is a
list here, read as ``projections.queries.list_jobs`` reads the table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from hypothesis import example, given
from hypothesis import strategies as st

from adapters.api.routes_jobs import _merged
from projections.queries import decode_cursor, encode_cursor

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# What the write side did to a job the model folded: nothing, changed it, or deleted it; or a job
# the model has not seen at all.
FATES = st.sampled_from(["folded", "folded", "changed", "deleted", "new"])


def _key(row: dict[str, Any]) -> tuple[datetime, UUID]:
    return row["created_at"], row["id"]


def _model_page(folded: list[dict[str, Any]], limit: int,
                after: tuple[datetime, UUID] | None) -> tuple[list[dict[str, Any]], str | None]:
    """What list_jobs reads from the table: newest first, after the cursor, one more to tell."""
    rows = sorted((r for r in folded if after is None or _key(r) < after), key=_key, reverse=True)[:limit + 1]
    if len(rows) > limit:
        return rows[:limit], encode_cursor(*_key(rows[limit - 1]))
    return rows, None


@example(jobs=[(0, "changed"), (0, "deleted")], limit=1)  # the deleted one left room for the changed one
@given(jobs=st.lists(st.tuples(st.integers(0, 4), FATES), max_size=14), limit=st.integers(1, 4))
def test_the_pages_are_the_write_sides_jobs_each_once_newest_first(jobs: list[tuple[int, str]], limit: int) -> None:
    folded, fresh, gone = [], [], set()
    for n, (minute, fate) in enumerate(jobs):
        row = {"id": UUID(int=n + 1), "created_at": T0 + timedelta(minutes=minute), "status": "created"}
        if fate != "new":
            folded.append(row)
        if fate == "deleted":
            gone.add(row["id"])
        elif fate != "folded":
            fresh.append({**row, "status": "canceled"})
    expected = sorted([*fresh, *(r for r in folded if r["id"] not in gone and r["id"] not in {f["id"] for f in fresh})],
                      key=_key, reverse=True)

    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while len(pages) <= len(jobs):
        after = decode_cursor(cursor) if cursor is not None else None
        rows, next_cursor = _model_page(folded, limit, after)
        page, cursor = _merged([r for r in rows if r["id"] not in gone], fresh, limit, next_cursor, after=after)
        pages.append(page)
        if cursor is None:
            break
    listed = [r for page in pages for r in page]
    assert [(r["id"], r["status"]) for r in listed] == [(r["id"], r["status"]) for r in expected]
    assert all(len(page) <= limit for page in pages)
