"""GET /jobs's cursors: only what ``encode_cursor`` writes is read back; a time without its offset
(no row's time compares with it) or another spelling of a position is refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.queries import BadCursor, decode_cursor, encode_cursor

AWARE = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(timedelta(hours=-3))]))


def raw(created: object, job: object, pad: bool = True) -> str:
    text = base64.urlsafe_b64encode(json.dumps([created, job]).encode()).decode()
    return text if pad else text.rstrip("=")


@given(AWARE, st.uuids())
def test_a_cursor_reads_back_as_the_position_it_was_written_for(created: datetime, job: UUID) -> None:
    assert decode_cursor(encode_cursor(created, job)) == (created, job)


def test_a_time_without_its_offset_is_refused() -> None:
    job = UUID(int=7)
    with pytest.raises(BadCursor):
        decode_cursor(raw("2030-01-01T00:00:00", str(job)))
    assert decode_cursor(raw("2030-01-01T00:00:00+00:00", str(job))) == (datetime(2030, 1, 1, tzinfo=UTC), job)


@given(st.datetimes(timezones=st.none() | st.just(UTC)), st.uuids(),
       st.sampled_from(["iso", "space", "upper", "hex", "braces"]), st.booleans())
def test_whatever_is_accepted_is_a_cursor_the_api_writes(created: datetime, job: UUID, spelling: str,
                                                         pad: bool) -> None:
    when = created.isoformat(sep=" ") if spelling == "space" else created.isoformat()
    ident = {"upper": str(job).upper(), "hex": job.hex, "braces": f"{{{job}}}"}.get(spelling, str(job))
    cursor = raw(when, ident, pad)
    try:
        position = decode_cursor(cursor)
    except BadCursor:
        return
    assert position[0].tzinfo is not None and encode_cursor(*position) == cursor


@pytest.mark.parametrize("cursor", ["", "garbage", raw(1, 2), raw(None, None), base64.urlsafe_b64encode(b"{}").decode(),
                                    raw("2030-01-01T00:00:00+00:00", "not-a-uuid")])
def test_what_is_not_a_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        decode_cursor(cursor)
