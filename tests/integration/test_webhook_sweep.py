"""Where the webhook consumer's sweep of the event log starts, on PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any, cast

import psycopg
from psycopg import sql

from adapters.positions import PgPositions
from adapters.settings import Settings
from adapters.webhooks.consumer import SWEEP, WebhookConsumer


def test_a_restart_keeps_a_sweep_that_is_still_at_the_start_of_the_log(settings: Settings) -> None:
    """A new group's sweep starts at the relay (the group reads the topic from its start); a
    restarted one goes on from its saved position, 0 included. Taking a saved 0 for "never saved"
    moved a consumer killed early in a chaos run past the events the broker had lost meanwhile:
    their webhooks were never sent."""
    schema = f"sweep_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.positions (name text PRIMARY KEY, position bigint NOT NULL, "
                             "updated_at timestamptz NOT NULL DEFAULT now())").format(sql.Identifier(schema)))
        try:
            positions = PgPositions(conn, (schema, "positions"))
            relay = [0]

            def start() -> None:
                none = cast(Any, None)
                WebhookConsumer(none, none, none, none, positions, published=lambda: relay[0])

            start()
            assert positions.find(SWEEP) == 0
            relay[0] = 50  # published on while the consumer was down, some of it lost by the broker
            start()
            assert positions.find(SWEEP) == 0
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
