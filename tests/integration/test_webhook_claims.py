"""Webhook deliveries on real PostgreSQL: an attempt that outlived its lease records nothing over
the attempt that took the delivery over; held and disabled endpoints get no attempt; a rotated
secret signs only through its grace; no user reaches another's endpoints by their ids."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from adapters.webhooks import store
from adapters.webhooks.retries import retry_delay
from adapters.webhooks.targets import MAX_RESPONSE_BYTES, Outcome

WEEK_S = 7 * 86400.0  # the keep time an enable is given (PALETTE_WEBHOOK_KEEP_DAYS by default)


@pytest.fixture
def conn(settings: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as connection:
        store.ensure_schema(connection)
        yield connection


def endpoints(conn: psycopg.Connection[Any], user: uuid.UUID, *names: str) -> list[uuid.UUID]:
    """``user``'s endpoints for job.queued, one per name, at a loopback port nothing answers on."""
    return [store.create_endpoint(conn, user, f"http://127.0.0.1:9/{n}", ["job.queued"], "whsec_test", 10)["id"]
            for n in names]


@contextlib.contextmanager
def one_delivery(conn: psycopg.Connection[Any], user: uuid.UUID, name: str) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """An endpoint of ``user``'s and one due delivery to it (a new job's job.queued): (endpoint, job);
    the endpoint, and with it the delivery, removed after."""
    job = uuid.uuid4()
    [endpoint] = endpoints(conn, user, name)
    store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")])
    try:
        yield endpoint, job
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_stale_attempt_cannot_overwrite_the_outcome_of_the_claim_that_took_over(conn):
    user, job = uuid.uuid4(), uuid.uuid4()
    [endpoint] = endpoints(conn, user, "hook")
    try:
        assert store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued",
                                                     b"{}")]) == 1
        mine = [d for d in store.claim(conn, 100, 30.0) if d.message_id == f"msg_{job.hex}_1"]
        assert len(mine) == 1 and mine[0].lease is not None
        # the first attempt hangs past its lease; the delivery is claimed again and succeeds
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '1 second' "
                     "WHERE id = %s", [mine[0].id])
        again = [d for d in store.claim(conn, 100, 30.0) if d.id == mine[0].id]
        assert len(again) == 1 and again[0].lease != mine[0].lease
        store.finish(conn, again[0].id, Outcome(200, "", "", 5), None, 20, 0, again[0].lease)
        store.finish(conn, mine[0].id, Outcome(None, "timeout", "", 99_000), 5.0, 20, 0, mine[0].lease)
        row = conn.execute("SELECT status, attempts FROM palette_webhooks.deliveries WHERE id = %s",
                           [mine[0].id]).fetchone()
        assert row == ("succeeded", 1)  # the late timeout changed nothing
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_deliveries_of_an_endpoint_deleted_since_its_subscribers_were_read_are_skipped(conn, settings):
    # The consumer reads the subscribers, folds the job, then records: an endpoint deleted in
    # between (DELETE /webhooks/{id}, an erasure) raised a foreign-key violation that stopped it.
    with psycopg.connect(settings.effective_database_url, autocommit=True) as other:
        user, job = uuid.uuid4(), uuid.uuid4()
        gone, kept = endpoints(conn, user, "gone", "kept")
        try:
            assert store.delete_endpoint(other, user, gone)
            new = [store.NewDelivery(e, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}") for e in (gone, kept)]
            assert store.record(conn, new) == 1
            rows = conn.execute("SELECT endpoint_id FROM palette_webhooks.deliveries WHERE job_id = %s",
                                [job]).fetchall()
            assert rows == [(kept,)]
            # An endpoint recorded for cannot be deleted until the deliveries commit; then it takes them.
            with conn.transaction():
                assert store.record(conn, [store.NewDelivery(kept, f"msg_{job.hex}_2", job, 2, "job.queued",
                                                             b"{}")]) == 1
                other.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    store.delete_endpoint(other, user, kept)
            assert store.delete_endpoint(other, user, kept)
            assert conn.execute("SELECT count(*) FROM palette_webhooks.deliveries WHERE job_id = %s",
                                [job]).fetchone() == (0,)
        finally:
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [[gone, kept]])


def test_a_claim_counts_the_users_attempts_in_flight_and_skips_a_held_endpoint(conn):
    user = uuid.uuid4()
    [endpoint] = endpoints(conn, user, "held")
    jobs = [uuid.uuid4() for _ in range(3)]
    store.record(conn, [store.NewDelivery(endpoint, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])

    def mine(**kw: Any) -> list[store.Due]:
        return [d for d in store.claim(conn, 10_000, 0.0, **kw) if d.user_id == user]

    def waiting() -> set[Any]:  # when the endpoint's pending deliveries are next due, and its hold
        return {r[0] for r in conn.execute(
            "SELECT d.next_attempt_at = e.held_until FROM palette_webhooks.deliveries d JOIN "
            "palette_webhooks.endpoints e ON e.id = d.endpoint_id WHERE e.id = %s AND d.status = 'pending'",
            [endpoint]).fetchall()}

    try:
        assert len(mine(per_user=2, busy={user: 1})) == 1  # one more than the one in flight
        assert mine(per_user=2, busy={user: 2}) == []
        first = mine(per_user=2)[0]
        store.finish(conn, first.id, Outcome(None, "timeout", "", 10_000), 5.0, 20, 0, first.lease,
                     hold_s=lambda failures: 3600.0 * failures)
        assert mine() == []  # held: none of its deliveries is tried, due or not
        assert waiting() == {True}  # they wait for the hold's end, out of the claims' way
        late = uuid.uuid4()  # recorded while held: it waits too
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{late.hex}_1", late, 1, "job.queued", b"{}")])
        assert waiting() == {True}
        assert store.enable_endpoint(conn, user, endpoint, WEEK_S) is not None  # enabled already: no way round
        assert mine() == []
        store.redeliver(conn, user, endpoint, first.id)  # its owner says it works again
        again = mine()
        assert len(again) == 4
        store.finish(conn, again[0].id, Outcome(200, "", "", 5), None, 20, 0, again[0].lease)
        row = conn.execute("SELECT failures, held_until FROM palette_webhooks.endpoints WHERE id = %s",
                           [endpoint]).fetchone()
        assert row == (0, None)
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_an_attempt_lost_while_its_endpoint_is_held_waits_for_the_holds_end(conn):
    """A sender killed mid-POST leaves its delivery due once the lease runs out: if the endpoint
    was held meanwhile (another attempt failed), the delivery still waits for the hold's end."""
    user = uuid.uuid4()
    [endpoint] = endpoints(conn, user, "lost")
    jobs = [uuid.uuid4() for _ in range(2)]
    store.record(conn, [store.NewDelivery(endpoint, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
    try:
        failed, lost = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
        store.finish(conn, failed.id, Outcome(None, "timeout", "", 10_000), 5.0, 20, 0, failed.lease,
                     hold_s=lambda failures: 3600.0)
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '1 second' "
                     "WHERE id = %s", [lost.id])  # its lease ran out: no attempt recorded it
        assert [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == []
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_disabled_endpoints_due_deliveries_are_not_claimed(conn):
    user = uuid.uuid4()
    with one_delivery(conn, user, "disabled") as (endpoint, job):
        conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() WHERE id = %s",
                     [endpoint])
        assert [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == []
        store.enable_endpoint(conn, user, endpoint, WEEK_S)
        assert [d.message_id for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == [f"msg_{job.hex}_1"]


def test_a_rotated_secret_signs_alongside_the_new_one_only_until_its_grace_ends(conn):
    user = uuid.uuid4()
    with one_delivery(conn, user, "rotated") as (endpoint, job):

        def keys() -> list[tuple[str, ...]]:
            conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() WHERE job_id = %s", [job])
            return [d.keys for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]

        assert store.rotate_secret(conn, user, endpoint, "whsec_new") is not None
        assert keys() == [("whsec_new", "whsec_test")]
        conn.execute("UPDATE palette_webhooks.endpoints SET previous_until = now() - interval '1 second' "
                     "WHERE id = %s", [endpoint])  # a day later
        assert keys() == [("whsec_new",)]


def test_another_users_endpoint_and_deliveries_are_out_of_reach_whatever_ids_they_know(conn):
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    with one_delivery(conn, owner, "owned") as (endpoint, job):
        [delivery] = conn.execute("UPDATE palette_webhooks.deliveries SET status = 'failed', next_attempt_at = NULL "
                                  "WHERE job_id = %s RETURNING id", [job]).fetchone()
        assert store.redeliver(conn, stranger, endpoint, delivery) is None
        assert store.rotate_secret(conn, stranger, endpoint, "whsec_stranger") is None
        assert store.list_deliveries(conn, stranger, endpoint, 10) is None
        assert store.enable_endpoint(conn, stranger, endpoint, WEEK_S) is None
        assert not store.delete_endpoint(conn, stranger, endpoint)
        row = conn.execute("SELECT d.status, e.secret FROM palette_webhooks.deliveries d JOIN "
                           "palette_webhooks.endpoints e ON e.id = d.endpoint_id WHERE d.id = %s",
                           [delivery]).fetchone()
        assert row == ("failed", "whsec_test")
        assert store.redeliver(conn, owner, endpoint, delivery)["status"] == "pending"  # (the ids are right)


def test_suspect_endpoints_get_only_their_share_and_a_success_proves_one(conn):
    user = uuid.uuid4()
    proven, fresh = endpoints(conn, user, "proven", "fresh")

    def deliver(endpoint: uuid.UUID) -> uuid.UUID:
        job = uuid.uuid4()
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")])
        row = conn.execute("SELECT id FROM palette_webhooks.deliveries WHERE job_id = %s", [job]).fetchone()
        return row[0]

    def claimed(ids: set[uuid.UUID], **share: Any) -> dict[uuid.UUID, bool]:
        return {d.id: d.suspect for d in store.claim(conn, 100, 30.0, **share) if d.id in ids}

    try:
        first = deliver(proven)
        assert claimed({first}) == {first: True}  # never answered yet
        store.finish(conn, first, Outcome(200, "", "", 5), None, 20, 0)
        a, b = deliver(proven), deliver(fresh)
        # the suspects' share taken by attempts in flight: only the proven endpoint's goes
        assert claimed({a, b}, suspects=2, suspects_busy=2) == {a: False}
        assert claimed({b}, suspects=10_000) == {b: True}
        store.finish(conn, a, Outcome(500, "", "", 5), 0.0, 20, 0)  # failing now: suspect again
        assert claimed({a}, suspects=2, suspects_busy=2) == {}
        row = conn.execute("SELECT proven, failures FROM palette_webhooks.endpoints WHERE id = %s",
                           [proven]).fetchone()
        assert row == (True, 1)
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [[proven, fresh]])


def test_endpoints_from_before_the_proven_column_that_succeeded_are_taken_for_proven(conn):
    user = uuid.uuid4()
    answered, silent = endpoints(conn, user, "answered", "silent")
    job = uuid.uuid4()
    store.record(conn, [store.NewDelivery(e, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")
                        for e in (answered, silent)])
    conn.execute("UPDATE palette_webhooks.deliveries SET status = 'succeeded' WHERE endpoint_id = %s",
                 [answered])
    try:
        with conn.transaction(force_rollback=True):  # the column as a store from before lacks it
            conn.execute("ALTER TABLE palette_webhooks.endpoints DROP COLUMN proven")
            for statement in store.DDL:
                conn.execute(statement)
            rows = dict(conn.execute("SELECT id, proven FROM palette_webhooks.endpoints WHERE id = ANY(%s)",
                                     [[answered, silent]]).fetchall())
            assert rows == {answered: True, silent: False}
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [[answered, silent]])


def test_a_backlog_a_claim_may_not_take_does_not_hide_a_delivery_it_may(conn, monkeypatch):
    # Suspects' deliveries beyond their share, and a user's beyond their cap, used to fill the
    # claim's window: a proven endpoint's delivery due after them was not seen, threads free.
    monkeypatch.setattr(store, "CLAIM_WINDOW", 5)
    monkeypatch.setattr(store, "CLAIM_SCAN", 200)
    attacker, busy_user, victim = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    made = [endpoints(conn, user, str(n))[0] for n, user in enumerate([attacker] * 3 + [busy_user, victim])]
    conn.execute("UPDATE palette_webhooks.endpoints SET proven = true WHERE id = ANY(%s)", [made[3:]])
    for n, endpoint in enumerate(made):
        jobs = [uuid.uuid4() for _ in range(1 if endpoint == made[-1] else 10)]
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}")
                            for j in jobs])
        # the victim's due for an hour, the 40 others for longer
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - %s * interval '1 hour' "
                     "WHERE endpoint_id = %s", [1 if endpoint == made[-1] else 2 + n, endpoint])
    try:
        got = store.claim(conn, 2, 30.0, per_user=2, busy={busy_user: 2}, suspects=1, suspects_busy=1)
        assert [d.user_id for d in got if d.user_id in (attacker, busy_user, victim)] == [victim]
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [made])


def test_a_delivery_redelivered_without_end_keeps_only_its_latest_attempts(conn):
    """Each redelivery is an attempt, and a delivery kept pending so is never pruned: its owner,
    at the redelivery rate, grew its attempts (each up to 4 KiB of answer) without end. Only the
    SHOWN_ATTEMPTS latest are kept, the ones the deliveries list shows."""
    user = uuid.uuid4()
    with one_delivery(conn, user, "redelivered") as (endpoint, job):
        [delivery] = [r[0] for r in conn.execute("SELECT id FROM palette_webhooks.deliveries WHERE job_id = %s",
                                                 [job]).fetchall()]
        rounds = store.SHOWN_ATTEMPTS + 15
        for made in range(1, rounds + 1):
            assert store.redeliver(conn, user, endpoint, delivery) is not None
            [due] = [d for d in store.claim(conn, 1000, 30.0) if d.id == delivery]
            store.finish(conn, delivery, Outcome(500, "HTTP 500", "x" * 4096, 3), 5.0, 1000, 10**6, due.lease)
            [(count,)] = conn.execute("SELECT count(*) FROM palette_webhooks.attempts WHERE delivery_id = %s",
                                      [delivery]).fetchall()
            assert count == min(made, store.SHOWN_ATTEMPTS), made  # never one more, not even for one attempt
        kept = [r[0] for r in conn.execute("SELECT n FROM palette_webhooks.attempts WHERE delivery_id = %s "
                                           "ORDER BY n", [delivery]).fetchall()]
        assert kept == list(range(rounds - store.SHOWN_ATTEMPTS + 1, rounds + 1))
        [listed] = store.list_deliveries(conn, user, endpoint, 10) or []
        assert listed["attempt_count"] == rounds and [a["n"] for a in listed["attempts"]] == kept[::-1]


def test_a_page_of_deliveries_carries_a_bounded_amount_of_answers_the_newest_first(conn):
    user = uuid.uuid4()
    [endpoint] = endpoints(conn, user, "chatty")
    jobs = [uuid.uuid4() for _ in range(200)]
    try:
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")
                            for job in jobs])
        ids = [r[0] for r in conn.execute("SELECT id FROM palette_webhooks.deliveries WHERE endpoint_id = %s "
                                          "ORDER BY created_at DESC, version DESC", [endpoint])]
        # Each delivery with as many attempts as are kept, each answered with 4 KiB (the most kept):
        # unbounded, the page was 200 x 20 x 4 KiB (16 MB, ~50 MB of JSON with escapes).
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO palette_webhooks.attempts (delivery_id, n, status_code, error, response, "
                            "duration_ms) VALUES (%s, %s, 500, '', %s, 1)",
                            [(d, n, "x" * MAX_RESPONSE_BYTES) for d in ids for n in range(1, store.SHOWN_ATTEMPTS + 1)])
        page = store.list_deliveries(conn, user, endpoint, 200)
        assert page is not None
        answers = sum(len(a["response"].encode()) for d in page for a in d["attempts"])
        assert answers <= store.LISTED_ANSWER_BYTES
        assert [d["id"] for d in page] == ids[:len(page)]  # the newest, each with all its attempts
        assert all(len(d["attempts"]) == store.SHOWN_ATTEMPTS for d in page)
        # one delivery is always listed, however much its attempts hold
        assert len(store.list_deliveries(conn, user, endpoint, 1) or []) == 1
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_rotated_secret_is_erased_by_the_prune_once_its_grace_has_ended(conn):
    # Past its grace the replaced secret signs nothing, yet it stayed in the row for good.
    user = uuid.uuid4()
    with one_delivery(conn, user, "erased") as (endpoint, _job):
        [other] = endpoints(conn, user, "in-grace")
        try:
            assert store.rotate_secret(conn, user, endpoint, "whsec_new") is not None
            assert store.rotate_secret(conn, user, other, "whsec_other") is not None
            store.prune(conn, keep_s=3600, limit=1000)

            def stored(e: uuid.UUID) -> tuple[Any, ...] | None:
                return conn.execute("SELECT secret, previous_secret, previous_until IS NOT NULL "
                                    "FROM palette_webhooks.endpoints WHERE id = %s", [e]).fetchone()

            assert stored(endpoint) == ("whsec_new", "whsec_test", True)  # in its grace: kept
            conn.execute("UPDATE palette_webhooks.endpoints SET previous_until = now() - interval '1 second' "
                         "WHERE id = %s", [endpoint])  # a day later
            store.prune(conn, keep_s=3600, limit=1000)
            # previous_until stays: a creation retried with its Idempotency-Key is still told it rotated
            assert stored(endpoint) == ("whsec_new", None, True)
            assert stored(other) == ("whsec_other", "whsec_test", True)
        finally:
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [other])


def test_a_disabled_endpoints_pending_deliveries_are_forgotten_a_keep_time_after_it_was_disabled(conn):
    # Nothing is recorded for a disabled endpoint, but what was pending stayed until it was
    # enabled or deleted: an owner who never came back kept those rows (job views) for good.
    user = uuid.uuid4()
    with one_delivery(conn, user, "disabled-long") as (endpoint, job):
        recent_job = uuid.uuid4()
        [recent] = endpoints(conn, user, "disabled-recently")
        try:
            store.record(conn, [store.NewDelivery(recent, f"msg_{recent_job.hex}_1", recent_job, 1, "job.queued",
                                                  b"{}")])
            conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() - "
                         "interval '2 hours' WHERE id = %s", [endpoint])
            conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() - "
                         "interval '30 minutes' WHERE id = %s", [recent])

            def pending(j: uuid.UUID) -> int:
                row = conn.execute("SELECT count(*) FROM palette_webhooks.deliveries WHERE job_id = %s "
                                   "AND status = 'pending'", [j]).fetchone()
                assert row is not None
                return int(row[0])

            while store.prune(conn, keep_s=3600, limit=1):
                pass
            assert (pending(job), pending(recent_job)) == (0, 1)  # enabling it within the hour sends it
            assert store.enable_endpoint(conn, user, recent, keep_s=3600) is not None
            assert [d.message_id for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == \
                [f"msg_{recent_job.hex}_1"]
        finally:
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [recent])


def test_an_enable_after_the_keep_time_forgets_what_was_pending_as_the_prune_would(conn):
    # The prune runs hourly: an enable past the keep time but before the next prune made the
    # week-old job views due and sent them, where the README says they are forgotten by then.
    user = uuid.uuid4()
    with one_delivery(conn, user, "disabled-past-keep") as (endpoint, job):
        conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() - "
                     "interval '2 hours' WHERE id = %s", [endpoint])
        assert store.enable_endpoint(conn, user, endpoint, keep_s=3600) is not None
        assert [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == []
        assert conn.execute("SELECT count(*) FROM palette_webhooks.deliveries WHERE job_id = %s",
                            [job]).fetchone() == (0,)


@contextlib.contextmanager
def prune_waiting_on(conn: psycopg.Connection[Any], url: str, table: str,
                     row_id: uuid.UUID) -> Iterator[psycopg.Connection[Any]]:
    """``store.prune`` run on a thread of its own while the yielded connection holds the row
    ``row_id`` of ``table`` FOR UPDATE, entered once the prune waits on it (pg_stat_activity: no
    sleeps). What the block does commits with the row's lock; the prune then finishes."""
    import threading

    from tests.waiting import wait_until

    with psycopg.connect(url, autocommit=True) as holder, psycopg.connect(url, autocommit=True) as pruner:
        with holder.transaction():
            holder.execute(sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
                sql.Identifier("palette_webhooks", table)), [row_id])
            pruning = threading.Thread(target=store.prune, args=(pruner, 3600, 1000))
            pruning.start()
            pid = pruner.info.backend_pid
            wait_until(lambda: conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                            [pid]).fetchone() == (True,),
                       timeout_s=30, what=f"the prune to wait on the {table} row")
            yield holder
        pruning.join(timeout=30)
        assert not pruning.is_alive()


def test_a_rotation_committed_while_the_prune_waits_on_its_row_keeps_its_replaced_secret(conn, settings):
    # The prune picks the rows to erase from its statement's snapshot; a rotation that commits while
    # it waits on the row gives the row a new previous_secret, in its grace: that one must stay.
    user = uuid.uuid4()
    [endpoint] = endpoints(conn, user, "rotating")
    try:
        assert store.rotate_secret(conn, user, endpoint, "whsec_second") is not None
        conn.execute("UPDATE palette_webhooks.endpoints SET previous_until = now() - interval '1 second' "
                     "WHERE id = %s", [endpoint])  # the first rotation's grace has ended
        with prune_waiting_on(conn, settings.effective_database_url, "endpoints", endpoint) as rotator:
            assert store.rotate_secret(rotator, user, endpoint, "whsec_third") is not None
        row = conn.execute("SELECT secret, previous_secret, previous_until > now() FROM palette_webhooks.endpoints "
                           "WHERE id = %s", [endpoint]).fetchone()
        assert row == ("whsec_third", "whsec_second", True)  # the secret replaced just now signs through its grace
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_redelivery_committed_while_the_prune_waits_on_its_row_is_kept(conn, settings):
    # A finished delivery at the end of its keep time, redelivered (pending again) while the prune's
    # DELETE waits on its row: the prune picked it as finished, but it is pending now.
    user = uuid.uuid4()
    with one_delivery(conn, user, "redelivered") as (endpoint, _job):
        [due] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
        store.finish(conn, due.id, Outcome(200, "", "", 5), None, 20, 0, due.lease)
        conn.execute("UPDATE palette_webhooks.deliveries SET created_at = now() - interval '2 hours' WHERE id = %s",
                     [due.id])
        with prune_waiting_on(conn, settings.effective_database_url, "deliveries", due.id) as owner:
            assert store.redeliver(owner, user, endpoint, due.id) is not None
        row = conn.execute("SELECT status FROM palette_webhooks.deliveries WHERE id = %s", [due.id]).fetchone()
        assert row == ("pending",)  # the redelivery answered 202 is sent


def test_a_redelivery_or_an_enable_leaves_an_attempt_in_flight_the_only_one(conn):
    # A delivery claimed (its POST in flight) and redelivered meanwhile, or whose endpoint another
    # attempt's failure disabled and its owner enabled again: both made it due at once, so a second
    # sender claimed it while the first still held its lease (two POSTs of it at once, the first
    # one's outcome thrown away). A delivery waiting for its retry is still due at once.
    user = uuid.uuid4()
    with one_delivery(conn, user, "in-flight") as (endpoint, job):
        [due] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
        assert store.redeliver(conn, user, endpoint, due.id) is not None
        assert [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == []
        conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() WHERE id = %s",
                     [endpoint])
        assert store.enable_endpoint(conn, user, endpoint, WEEK_S) is not None
        assert [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == []
        store.finish(conn, due.id, Outcome(None, "timeout", "", 10_000), 300.0, 20, 0, due.lease)
        row = conn.execute("SELECT attempts, next_attempt_at > now() FROM palette_webhooks.deliveries "
                           "WHERE id = %s", [due.id]).fetchone()
        assert row == (1, True)  # the attempt in flight was recorded; its retry waits
        assert store.redeliver(conn, user, endpoint, due.id) is not None
        assert [d.message_id for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == [f"msg_{job.hex}_1"]


def test_a_redelivery_while_the_last_try_is_in_flight_is_sent_after_it_fails(conn):
    # The owner redelivers (202) a delivery whose last scheduled try is in flight; that attempt
    # then fails, and the sender, reading the tries of its claim, says the schedule is spent
    # (retry_in None). The redelivery promised a fresh schedule, due now: the delivery stays
    # pending and due, not 'failed' with the redelivery never sent.
    user = uuid.uuid4()
    with one_delivery(conn, user, "last-try") as (endpoint, job):
        conn.execute("UPDATE palette_webhooks.deliveries SET tries = 3 WHERE endpoint_id = %s", [endpoint])
        [due] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
        assert due.tries == 3
        assert store.redeliver(conn, user, endpoint, due.id) is not None
        store.finish(conn, due.id, Outcome(None, "timeout", "", 10_000), None, 20, 0, due.lease, tries=due.tries)
        row = conn.execute("SELECT status, attempts, tries FROM palette_webhooks.deliveries WHERE id = %s",
                           [due.id]).fetchone()
        assert row == ("pending", 1, 0)  # the attempt in flight recorded; the redelivery's to come
        assert [d.message_id for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == [f"msg_{job.hex}_1"]


def test_each_failed_try_moves_the_delivery_one_step_along_its_schedule_and_past_its_end_it_has_failed(conn):
    # The sender asks the schedule for the step after the claim's tries: a failure that did not
    # count retried at the first step for ever, and the delivery never failed.
    schedule, user = (5.0, 60.0), uuid.uuid4()
    with one_delivery(conn, user, "failing") as (_, _job):
        claimed = []
        for _ in range(len(schedule) + 1):
            [due] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
            claimed.append(due.tries)
            retry_in = retry_delay(schedule, due.tries + 1, lambda: 0.5)  # the step itself, no jitter
            store.finish(conn, due.id, Outcome(500, "", "", 10), retry_in, 20, 0, due.lease, tries=due.tries)
            status, wait = conn.execute("SELECT status, extract(epoch FROM next_attempt_at - now())::float "
                                        "FROM palette_webhooks.deliveries WHERE id = %s", [due.id]).fetchone()
            if retry_in is not None:
                assert status == "pending" and retry_in - 5 < wait <= retry_in, (status, wait)
                conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() WHERE id = %s",
                             [due.id])  # its time has come
        assert claimed == [0, 1, 2] and retry_in is None
        assert (status, wait) == ("failed", None)


def failed_once(conn: psycopg.Connection[Any], user: uuid.UUID, endpoint: uuid.UUID) -> bool:
    """One failed attempt of ``user``'s due delivery (an endpoint is disabled after 3 failures in
    a run that has lasted an hour); whether ``endpoint`` is still enabled."""
    [due] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user]
    store.finish(conn, due.id, Outcome(500, "", "", 10), 0.0, 3, 3600.0, due.lease)
    return bool(conn.execute("SELECT enabled FROM palette_webhooks.endpoints WHERE id = %s",
                             [endpoint]).fetchone()[0])


def test_an_endpoint_is_disabled_only_once_its_run_of_failures_has_lasted_the_time_asked(conn):
    brief, lasting = uuid.uuid4(), uuid.uuid4()
    with one_delivery(conn, brief, "briefly-failing") as (endpoint, _job):
        assert all([failed_once(conn, brief, endpoint) for _ in range(3)])  # three, but a run of seconds
    with one_delivery(conn, lasting, "failing-for-long") as (endpoint, _job):
        assert failed_once(conn, lasting, endpoint)
        conn.execute("UPDATE palette_webhooks.endpoints SET failing_since = now() - interval '61 minutes' "
                     "WHERE id = %s", [endpoint])  # the run began with that failure, an hour and a minute ago
        assert failed_once(conn, lasting, endpoint)  # two: the run goes on from its first failure
        assert not failed_once(conn, lasting, endpoint)


@contextlib.contextmanager
def beside_a_victim(conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, name: str,
                    scan: int = 20) -> Iterator[tuple[uuid.UUID, uuid.UUID, uuid.UUID, uuid.UUID]]:
    """A failing user's endpoint ``name`` and a victim's that answers, under claims that read
    ``scan`` rows, 5 a window: (failing, its endpoint, victim, the victim's); both removed after."""
    monkeypatch.setattr(store, "CLAIM_WINDOW", 5)
    monkeypatch.setattr(store, "CLAIM_SCAN", scan)
    failing, victim = uuid.uuid4(), uuid.uuid4()
    [endpoint] = endpoints(conn, failing, name)
    [answered] = endpoints(conn, victim, "answered")
    try:
        yield failing, endpoint, victim, answered
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [[endpoint, answered]])


def claimed_of(conn: psycopg.Connection[Any], *users: uuid.UUID) -> list[uuid.UUID]:
    """The users among ``users`` whose deliveries one claim of 8 (2 a user) took, in its order."""
    return [d.user_id for d in store.claim(conn, 8, 30.0, per_user=2) if d.user_id in users]


def sent_once_enabled(conn: psycopg.Connection[Any], user: uuid.UUID, endpoint: uuid.UUID) -> int:
    """How many of ``user``'s deliveries a claim takes once its ``endpoint`` is enabled again."""
    assert store.enable_endpoint(conn, user, endpoint, WEEK_S) is not None
    return len([d for d in store.claim(conn, 10_000, 30.0) if d.user_id == user])


def test_a_jobs_deliveries_waiting_on_its_earlier_one_do_not_hide_a_delivery_the_claim_may_take(conn, monkeypatch):
    # A job's later deliveries wait while its first is pending (order per job): due since the
    # endpoint's hold ended, they stay due for the hours of its retry delay, and they filled the
    # claim's window before the order was checked: no thread took anyone's delivery due after them.
    with beside_a_victim(conn, monkeypatch, "order", scan=200) as (failing, blocked, victim, answered):
        job, other = uuid.uuid4(), uuid.uuid4()
        store.record(conn, [store.NewDelivery(blocked, f"msg_{job.hex}_{v}", job, v, "job.queued", b"{}")
                            for v in range(1, 11)])
        store.record(conn, [store.NewDelivery(answered, f"msg_{other.hex}_1", other, 1, "job.queued", b"{}")])
        # the job's first delivery waits for its next try, an hour ahead; its nine others are due
        # since two hours (they wait on it), the victim's since one
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() + CASE WHEN version = 1 "
                     "THEN interval '1 hour' ELSE - interval '2 hours' END WHERE endpoint_id = %s", [blocked])
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '1 hour' "
                     "WHERE endpoint_id = %s", [answered])
        assert claimed_of(conn, failing, victim) == [victim]


def test_a_disabled_endpoints_backlog_does_not_hide_a_delivery_the_claim_may_take(conn, monkeypatch):
    # A disabled endpoint's pending deliveries stayed due (from its last hold's end) for the keep
    # time, a week: more of them than the claim reads filled its scan, and no thread took anyone's
    # delivery due after them. Once disabled they wait for an enable, out of the claims' way.
    with beside_a_victim(conn, monkeypatch, "disabled-backlog") as (failing, disabled, victim, answered):
        jobs = [uuid.uuid4() for _ in range(30)]
        store.record(conn, [store.NewDelivery(disabled, f"msg_{jobs[0].hex}_1", jobs[0], 1, "job.queued", b"{}")])
        [first] = [d for d in store.claim(conn, 10_000, 30.0) if d.user_id == failing]
        store.record(conn, [store.NewDelivery(disabled, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}")
                            for j in jobs[1:]])
        store.finish(conn, first.id, Outcome(500, "", "", 5), 5.0, 1, 0, first.lease, hold_s=lambda failures: 5.0)
        assert conn.execute("SELECT enabled FROM palette_webhooks.endpoints WHERE id = %s",
                            [disabled]).fetchone() == (False,)
        other = uuid.uuid4()  # recorded just before the disable was seen, and a redelivery meanwhile
        store.record(conn, [store.NewDelivery(disabled, f"msg_{other.hex}_1", other, 1, "job.queued", b"{}")])
        assert store.redeliver(conn, failing, disabled, first.id) is not None
        # two hours on: the hold long over; the victim's delivery due since one
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = next_attempt_at - interval '2 hours' "
                     "WHERE endpoint_id = %s", [disabled])
        store.record(conn, [store.NewDelivery(answered, f"msg_{other.hex}_1", other, 1, "job.queued", b"{}")])
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '1 hour' "
                     "WHERE endpoint_id = %s", [answered])
        assert claimed_of(conn, failing, victim) == [victim]
        assert sent_once_enabled(conn, failing, disabled) == 31  # and an enable sends them all


def test_deliveries_recorded_while_their_endpoint_is_enabled_again_are_due(conn, settings):
    # The consumer's record read the endpoint disabled (its deliveries then go in not due, for an
    # enable to make due) while its owner's enable committed before the inserts did: the enable's
    # update did not see them, and they stayed pending with no next_attempt_at on an enabled
    # endpoint, never claimed (nor pruned: the prune takes those of endpoints disabled long).
    import threading

    user, job = uuid.uuid4(), uuid.uuid4()
    [endpoint] = endpoints(conn, user, "enabled-meanwhile")
    try:
        conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() WHERE id = %s",
                     [endpoint])
        with psycopg.connect(settings.effective_database_url, autocommit=True) as owner:
            with conn.transaction():  # record's reads and inserts, not yet committed
                assert store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued",
                                                             b"{}")]) == 1
                enabling = threading.Thread(target=store.enable_endpoint, args=(owner, user, endpoint, WEEK_S))
                enabling.start()
                enabling.join(0.5)
            enabling.join(10)
        assert [d.message_id for d in store.claim(conn, 10_000, 30.0) if d.user_id == user] == [f"msg_{job.hex}_1"]
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_longer_hold_from_a_second_failure_in_flight_keeps_the_whole_backlog_waiting(conn, monkeypatch):
    # A user's two attempts in flight to a failing endpoint: the first failure held it and moved
    # its backlog to that hold's end; the second lengthened the hold but moved only what was due,
    # so the backlog came due at the first hold's end while the endpoint was still held, and,
    # more of it than the claim reads, hid every other endpoint's delivery due after it.
    with beside_a_victim(conn, monkeypatch, "held-backlog") as (failing, held, victim, answered):
        jobs = [uuid.uuid4() for _ in range(30)]
        store.record(conn, [store.NewDelivery(held, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
        first, second = [d for d in store.claim(conn, 10_000, 30.0, per_user=2) if d.user_id == failing]
        for attempt in (first, second):  # 60 s held after one failure in a row, 120 s after two
            store.finish(conn, attempt.id, Outcome(None, "timeout", "", 10_000), 5.0, 20, 0, attempt.lease,
                         hold_s=lambda failures: 60.0 * failures)
        waiting = conn.execute(
            "SELECT count(*) FILTER (WHERE d.next_attempt_at = e.held_until), count(*) FROM "
            "palette_webhooks.deliveries d JOIN palette_webhooks.endpoints e ON e.id = d.endpoint_id "
            "WHERE e.id = %s AND d.status = 'pending'", [held]).fetchone()
        assert waiting == (30, 30)
        # 90 s on: the first hold over, the second not; the victim's delivery due since just now
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = next_attempt_at - interval '90 seconds' "
                     "WHERE endpoint_id = %s", [held])
        conn.execute("UPDATE palette_webhooks.endpoints SET held_until = held_until - interval '90 seconds' "
                     "WHERE id = %s", [held])
        store.record(conn, [store.NewDelivery(answered, f"msg_{jobs[0].hex}_1", jobs[0], 1, "job.queued", b"{}")])
        assert claimed_of(conn, failing, victim) == [victim]


def test_forgetting_a_deleted_jobs_deliveries_reads_only_that_jobs_rows(conn, settings):
    # DELETE /jobs/{id} (and the sweeper's late pass) forgets the job's deliveries: a scan of every
    # user's deliveries, kept for days, made each client's deletion cost what the whole table holds.
    user, job = uuid.uuid4(), uuid.uuid4()
    [endpoint] = endpoints(conn, user, "hook")
    try:
        conn.execute("INSERT INTO palette_webhooks.deliveries (id, endpoint_id, message_id, job_id, version, "
                     "event_type, body, status) SELECT gen_random_uuid(), %s, 'msg_' || n, gen_random_uuid(), 1, "
                     "'job.queued', '\\x7b7d', 'succeeded' FROM generate_series(1, 5000) AS n", [endpoint])
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")])
        conn.execute("ANALYZE palette_webhooks.deliveries")
        # A session of its own: a session's counts not yet reported (once a second) read as its transaction's.
        with psycopg.connect(settings.effective_database_url) as alone:
            assert store.forget_job(alone, job) == 1
            scans = alone.execute("SELECT seq_scan FROM pg_stat_xact_user_tables "
                                  "WHERE schemaname = 'palette_webhooks' AND relname = 'deliveries'").fetchone()
        assert scans == (0,)
    finally:
        conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])


def test_a_disabled_endpoints_backlog_left_due_by_an_older_release_is_moved_out_of_the_claims_way(conn, monkeypatch):
    # A release before 2026-12-06 disabled an endpoint and left its pending deliveries due, for the
    # week they are kept: upgraded, more of them than a claim reads hid every other endpoint's
    # delivery until they were pruned. The schema's start takes them out of the claims' way.
    with beside_a_victim(conn, monkeypatch, "disabled-by-an-older-release") as (failing, disabled, victim, answered):
        jobs = [uuid.uuid4() for _ in range(30)]
        store.record(conn, [store.NewDelivery(disabled, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
        conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() - interval '1 day' "
                     "WHERE id = %s", [disabled])
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '2 hours' "
                     "WHERE endpoint_id = %s", [disabled])
        store.record(conn, [store.NewDelivery(answered, f"msg_{jobs[0].hex}_1", jobs[0], 1, "job.queued", b"{}")])
        conn.execute("UPDATE palette_webhooks.deliveries SET next_attempt_at = now() - interval '1 hour' "
                     "WHERE endpoint_id = %s", [answered])
        store.ensure_schema(conn)
        assert claimed_of(conn, failing, victim) == [victim]
        assert sent_once_enabled(conn, failing, disabled) == 30  # an enable still sends them all
