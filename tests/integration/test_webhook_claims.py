"""Webhook deliveries on real PostgreSQL: an attempt that outlived its lease records nothing over
the attempt that took the delivery over."""

from __future__ import annotations

import uuid

import psycopg

from adapters.webhooks import store
from adapters.webhooks.targets import Outcome


def test_a_stale_attempt_cannot_overwrite_the_outcome_of_the_claim_that_took_over(settings):
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)
        user, job = uuid.uuid4(), uuid.uuid4()
        endpoint = store.create_endpoint(conn, user, "http://127.0.0.1:9/hook", ["job.queued"], "whsec_test", 10)["id"]
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
