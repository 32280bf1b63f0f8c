"""One user's endpoints that hang do not hold back another user's webhooks: at most
PER_USER_IN_FLIGHT of a user's deliveries are in flight at once, and an endpoint whose attempt
failed is held for its retry delay (none of its queued deliveries is tried meanwhile). Nor do
several users' endpoints together: endpoints that answered keep ``proven_reserve`` threads. The
real sender on real PostgreSQL, real sockets on loopback; the attempt's deadline is shortened."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from adapters.webhooks import store, targets
from adapters.webhooks.sender import PER_USER_IN_FLIGHT, WebhookSender, proven_reserve
from tests.integration.test_stack import wait_until
from tests.webhook_receiver import Receiver

ENDPOINTS, QUEUED, VICTIM_JOBS = 5, 4, 3
WAIT_S = 60.0


def test_a_users_hanging_endpoints_neither_take_every_thread_nor_get_an_attempt_per_delivery(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "TIMEOUT_S", 3.0)  # the margins below scale with it
    receiver = Receiver()
    never = threading.Event()
    attacker, victim = uuid.uuid4(), uuid.uuid4()
    hanging = [f"/hang-{i}" for i in range(ENDPOINTS)]
    for path in hanging:
        receiver.hold[path] = never  # accepted, never answered: each attempt takes the whole deadline
    pool: ConnectionPool[Any] = ConnectionPool(settings.effective_database_url, min_size=1, max_size=6,
                                               kwargs={"autocommit": True}, open=True)
    sender = WebhookSender(pool, targets.client(production=False), (30.0, 30.0), production=False,
                           disable_after=100, disable_after_s=0.0, workers=4, poll_s=0.05)
    stop = threading.Event()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)

        def endpoint(user: uuid.UUID, path: str) -> uuid.UUID:
            made: uuid.UUID = store.create_endpoint(conn, user, receiver.url(path), ["job.queued"], "whsec_dGVzdA==",
                                                    10)["id"]
            return made

        theirs = [endpoint(attacker, path) for path in hanging]
        mine = endpoint(victim, "/victim")
        try:
            for e in theirs:  # queued first: the oldest due
                jobs = [uuid.uuid4() for _ in range(QUEUED)]
                store.record(conn, [store.NewDelivery(e, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
            jobs = [uuid.uuid4() for _ in range(VICTIM_JOBS)]
            store.record(conn, [store.NewDelivery(mine, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])
            sending = threading.Thread(target=sender.run, args=(stop,), daemon=True)
            sending.start()

            delivered = receiver.wait("/victim", VICTIM_JOBS)
            with receiver.changed:  # every hanging endpoint tried
                assert receiver.changed.wait_for(lambda: all(receiver.on(p) for p in hanging), timeout=WAIT_S)

            def recorded() -> int:  # the attempts to the hanging endpoints that finished
                row = conn.execute("SELECT count(*) FROM palette_webhooks.attempts a JOIN "
                                   "palette_webhooks.deliveries d ON d.id = a.delivery_id "
                                   "WHERE d.endpoint_id = ANY(%s)", [theirs]).fetchone()
                return int(row[0]) if row else 0

            wait_until(lambda: recorded() >= sum(len(receiver.on(p)) for p in hanging), what="the attempts' ends")
            tries = [len(receiver.on(p)) for p in hanging]
            # No more than the user's attempts in flight at once, not one per delivery queued: once
            # its attempts failed, the endpoint is held for the retry delay.
            assert all(1 <= n <= PER_USER_IN_FLIGHT < QUEUED for n in tries), tries
            held = conn.execute("SELECT count(*) FROM palette_webhooks.endpoints WHERE id = ANY(%s) "
                                "AND held_until > now() + interval '10 seconds'", [theirs]).fetchone()
            assert held == (ENDPOINTS,)
            # The victim's deliveries went out with the attacker's first attempts, not after them:
            # the attacker's next attempt waited for a first one to time out.
            tried = sorted(r.at for p in hanging for r in receiver.on(p))
            assert delivered[-1].at < tried[PER_USER_IN_FLIGHT]
            assert tried[PER_USER_IN_FLIGHT] - tried[0] >= 0.9 * targets.TIMEOUT_S
        finally:
            stop.set()
            sender.wake()
            never.set()
            sending.join(WAIT_S)
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [[*theirs, mine]])
            sender.close()
            receiver.close()


ATTACKERS, WORKERS = 4, 4  # with 2 of each one's hanging endpoints, enough to take every thread


def test_several_users_hanging_endpoints_leave_the_endpoints_that_answer_their_threads(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "TIMEOUT_S", 3.0)
    receiver = Receiver()
    never = threading.Event()
    attackers, victim = [uuid.uuid4() for _ in range(ATTACKERS)], uuid.uuid4()
    pool: ConnectionPool[Any] = ConnectionPool(settings.effective_database_url, min_size=1, max_size=6,
                                               kwargs={"autocommit": True}, open=True)
    sender = WebhookSender(pool, targets.client(production=False), (30.0, 30.0), production=False,
                           disable_after=100, disable_after_s=0.0, workers=WORKERS, poll_s=0.05)
    suspects_at_most = WORKERS - proven_reserve(WORKERS)
    stop = threading.Event()
    sending = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    made: list[uuid.UUID] = []
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)

        def endpoint(user: uuid.UUID, path: str) -> uuid.UUID:
            made.append(store.create_endpoint(conn, user, receiver.url(path), ["job.queued"], "whsec_dGVzdA==",
                                              10)["id"])
            return made[-1]

        def queue(e: uuid.UUID, n: int) -> None:
            jobs = [uuid.uuid4() for _ in range(n)]
            store.record(conn, [store.NewDelivery(e, f"msg_{j.hex}_1", j, 1, "job.queued", b"{}") for j in jobs])

        try:
            mine = endpoint(victim, "/victim")
            queue(mine, 1)
            sending.start()
            receiver.wait("/victim", 1)  # the victim's endpoint has answered: proven
            hanging = [f"/hang-{a}-{i}" for a in range(ATTACKERS) for i in range(2)]
            for path in hanging:
                receiver.hold[path] = never
            for n, path in enumerate(hanging):  # queued before the victim's next ones: due longest
                queue(endpoint(attackers[n // 2], path), QUEUED)
            queue(mine, VICTIM_JOBS)
            sender.wake()

            delivered = receiver.wait("/victim", 1 + VICTIM_JOBS)
            with receiver.changed:  # every hanging endpoint tried
                assert receiver.changed.wait_for(lambda: all(receiver.on(p) for p in hanging), timeout=WAIT_S)
            tried = sorted(r.at for p in hanging for r in receiver.on(p))
            # The victim's went out with the first hanging attempts, not after their deadline; and
            # no more attempts to hanging endpoints were in flight at once than the suspects' share.
            assert delivered[-1].at < tried[0] + 0.9 * targets.TIMEOUT_S
            assert tried[suspects_at_most] - tried[0] >= 0.9 * targets.TIMEOUT_S
        finally:
            stop.set()
            sender.wake()
            never.set()
            if sending.is_alive():
                sending.join(WAIT_S)
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = ANY(%s)", [made])
            sender.close()
            receiver.close()
