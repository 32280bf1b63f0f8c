"""What a receiver's answer asks of the sender, on the real PostgreSQL and sockets: a 429 or 503
with Retry-After holds the endpoint that long (at most HOLD_MAX_S), however short the retry
schedule's step; one without it, or another failure's Retry-After, asks nothing; a 410 (Gone)
disables the endpoint at once, its deliveries waiting for an enable."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import psycopg
import pytest

from adapters.webhooks import store
from adapters.webhooks.sender import HOLD_MAX_S
from tests.webhook_receiver import Receiver

from .test_webhook_hosts import attempt_once, sender, stored  # noqa: F401 - shared fixtures


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _answered(stored: Any, sender: Any, receiver: Receiver, path: str, status: int,  # noqa: F811
              headers: dict[str, str]) -> tuple[Any, Any, Any]:
    """One attempt of a delivery to an endpoint answering ``status`` with ``headers``: the
    connection, the endpoint and the delivery."""
    conn, endpoint = stored
    receiver.answer[path] = (status, headers)
    endpoint_id, delivery_id = endpoint(receiver.url(path))
    attempt_once(conn, sender, delivery_id)
    receiver.wait(path, 1)
    return conn, endpoint_id, delivery_id


def _held_for_s(conn: Any, endpoint_id: Any) -> float:
    """Seconds from now to the end of the endpoint's hold (by PostgreSQL's clock; 0: none)."""
    row = conn.execute("SELECT coalesce(extract(epoch FROM held_until - now()), 0) FROM palette_webhooks.endpoints "
                       "WHERE id = %s", [endpoint_id]).fetchone()
    return float(row[0])


def _due(conn: Any, delivery_id: Any) -> bool:
    return any(d.id == delivery_id for d in store.claim(conn, 100, 30.0))


@pytest.mark.parametrize(("status", "retry_after", "held"), [
    (429, "600", 600.0),
    (503, "120", 120.0),
    (429, "99999999", HOLD_MAX_S),  # at most HOLD_MAX_S, whatever it asks
])
def test_a_retry_after_holds_the_endpoint_that_long(stored, sender, receiver, status, retry_after,  # noqa: F811
                                                    held):
    conn, endpoint_id, delivery_id = _answered(stored, sender, receiver, f"/wait{status}", status,
                                               {"Retry-After": retry_after})
    assert held - 30 < _held_for_s(conn, endpoint_id) <= held  # the schedule's own step is 0 s
    row = conn.execute("SELECT status, last_status_code, next_attempt_at - now() FROM palette_webhooks.deliveries "
                       "WHERE id = %s", [delivery_id]).fetchone()
    assert row[:2] == ("pending", status) and row[2] > timedelta(seconds=held - 30)
    assert not _due(conn, delivery_id)


def test_a_retry_after_given_as_a_date_holds_the_endpoint_until_then(stored, sender, receiver):  # noqa: F811
    then = format_datetime(datetime.now(UTC) + timedelta(seconds=300), usegmt=True)
    conn, endpoint_id, _ = _answered(stored, sender, receiver, "/date", 429, {"Retry-After": then})
    assert 240 < _held_for_s(conn, endpoint_id) <= 301


@pytest.mark.parametrize(("status", "headers"), [(503, {}), (500, {"Retry-After": "600"}),
                                                 (429, {"Retry-After": "soon"})])
def test_a_failure_without_a_readable_retry_after_from_a_429_or_503_asks_for_no_wait(
        stored, sender, receiver, status, headers):  # noqa: F811
    conn, endpoint_id, delivery_id = _answered(stored, sender, receiver, f"/nowait{status}", status, headers)
    assert _held_for_s(conn, endpoint_id) <= 0  # the schedule's step: 0 s
    assert _due(conn, delivery_id)


def test_a_gone_endpoint_is_disabled_at_once_and_its_deliveries_wait_for_an_enable(
        stored, sender, receiver):  # noqa: F811
    conn, endpoint_id, delivery_id = _answered(stored, sender, receiver, "/gone", 410, {})
    row = conn.execute("SELECT enabled, disabled_at IS NOT NULL, failures FROM palette_webhooks.endpoints "
                       "WHERE id = %s", [endpoint_id]).fetchone()
    assert row == (False, True, 1)  # after one failure, where three would have disabled it
    delivery = conn.execute("SELECT status, last_status_code, next_attempt_at FROM palette_webhooks.deliveries "
                            "WHERE id = %s", [delivery_id]).fetchone()
    assert delivery == ("pending", 410, None) and not _due(conn, delivery_id)
    user_id = conn.execute("SELECT user_id FROM palette_webhooks.endpoints WHERE id = %s", [endpoint_id]).fetchone()
    assert store.enable_endpoint(conn, user_id[0], endpoint_id, 7 * 86400.0) is not None
    receiver.answer["/gone"] = (200, {})
    attempt_once(conn, sender, delivery_id)  # due again, and delivered
    assert conn.execute("SELECT status FROM palette_webhooks.deliveries WHERE id = %s",
                        [delivery_id]).fetchone() == ("succeeded",)


def test_a_shorter_failure_in_flight_after_a_retry_after_does_not_cut_the_asked_wait_short(
        stored, sender, receiver):  # noqa: F811
    # A user's two attempts in flight to one endpoint: the first answered 429 asking for 30 min
    # and held the endpoint (and its backlog) that long; the second, answered 500 after it, set
    # the hold to its own schedule step (0 s here, 5 min by default), so the endpoint was tried
    # again at once, and the backlog the first had moved waited on past the hold's end, where a
    # success no longer released it.
    conn, endpoint = stored
    endpoint_id, _ = endpoint(receiver.url("/two"))
    jobs = [uuid.uuid4() for _ in range(2)]
    store.record(conn, [store.NewDelivery(endpoint_id, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
    first, second = [d for d in store.claim(conn, 100, 30.0, per_user=2) if d.url == receiver.url("/two")]
    receiver.answer["/two"] = (429, {"Retry-After": "1800"})
    sender._deliver(first)
    receiver.answer["/two"] = (500, {})
    sender._deliver(second)
    assert HOLD_MAX_S - 30 < _held_for_s(conn, endpoint_id) <= HOLD_MAX_S
    waiting = conn.execute(
        "SELECT count(*) FILTER (WHERE d.next_attempt_at = e.held_until), count(*) FROM palette_webhooks.deliveries d "
        "JOIN palette_webhooks.endpoints e ON e.id = d.endpoint_id WHERE e.id = %s AND d.status = 'pending'",
        [endpoint_id]).fetchone()
    assert waiting == (3, 3)  # the two that failed and the one behind them, all until the hold's end
    assert not any(d.url == receiver.url("/two") for d in store.claim(conn, 100, 30.0))


def test_deliveries_recorded_while_a_410_disables_their_endpoint_wait_for_an_enable(
        stored, sender, receiver, settings):  # noqa: F811
    # The consumer's record read the endpoint enabled (its deliveries go in due) and had not
    # committed when a 410 disabled it: the disable's update of the pending deliveries did not see
    # them (record's FOR KEY SHARE does not hold back an UPDATE), and they stayed due on a
    # disabled endpoint for the week it is kept, in the claims' scan, never claimed.
    conn, endpoint = stored
    endpoint_id, delivery_id = endpoint(receiver.url("/gone-meanwhile"))
    receiver.answer["/gone-meanwhile"] = (410, {})
    [mine] = [d for d in store.claim(conn, 100, 30.0) if d.id == delivery_id]
    job = uuid.uuid4()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as consumer:
        with consumer.transaction():  # record's reads and inserts, not yet committed
            store.record(consumer, [store.NewDelivery(endpoint_id, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")])
            attempt = threading.Thread(target=sender._deliver, args=(mine,))
            attempt.start()
            receiver.wait("/gone-meanwhile", 1)
            attempt.join(1.0)
        attempt.join(10)
    assert conn.execute("SELECT enabled FROM palette_webhooks.endpoints WHERE id = %s", [endpoint_id]).fetchone() == (
        False,)
    rows = conn.execute("SELECT status, next_attempt_at FROM palette_webhooks.deliveries WHERE endpoint_id = %s",
                        [endpoint_id]).fetchall()
    assert rows == [("pending", None), ("pending", None)]
