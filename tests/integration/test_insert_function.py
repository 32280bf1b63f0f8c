"""A save's events in one statement (adapters.pg_streams.insert_in_one_round_trip) on PostgreSQL:
notification ids, conflicts, and the table lock that keeps commit order equal to id order (the
second test also finds the function at work: it looks for it among the waiting statements)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from adapters.bootstrap import open_event_store
from adapters.settings import Settings
from domain.plans import DEFAULT_PLANS
from domain.user import DEVICE_KEY_SCHEME, User


def _user(device_key: str | None = None) -> User:
    key = device_key or f"{DEVICE_KEY_SCHEME}{uuid.uuid4().hex}{uuid.uuid4().hex}"
    return User.register(key, DEFAULT_PLANS["free"], datetime.now(UTC))


def test_saves_go_through_the_function_with_their_notification_ids_and_a_conflict_is_refused(
    settings: Settings,
) -> None:
    app = open_event_store(settings, pool_size=2)
    try:
        recorder: Any = app.recorder
        device_key = f"{DEVICE_KEY_SCHEME}{uuid.uuid4().hex}{uuid.uuid4().hex}"
        recordings = app.save(_user(device_key), _user())
        ids = [r.notification.id for r in recordings]
        assert len(ids) >= 2 and ids == sorted(set(ids))
        stored = recorder.select_notifications(ids[0], len(ids))
        assert [(n.id, n.originator_id, n.originator_version) for n in stored] == [
            (r.notification.id, r.domain_event.originator_id, r.domain_event.originator_version) for r in recordings]
        with pytest.raises(IntegrityError):  # the same device's stream at version 1 again
            app.save(_user(device_key))
    finally:
        app.close()


def test_a_save_waits_for_a_writer_holding_the_table_so_ids_commit_in_order(settings: Settings) -> None:
    app = open_event_store(settings, pool_size=2)
    recorder: Any = app.recorder
    table = f"{recorder.datastore.schema}.{recorder.events_table_name}"
    holder = psycopg.connect(settings.effective_database_url)
    watcher = psycopg.connect(settings.effective_database_url, autocommit=True)
    saved = threading.Event()
    try:
        # What a plain INSERT holds (ROW EXCLUSIVE): without the function's EXCLUSIVE table lock a
        # save would pass it, and could commit its ids before this transaction commits lower ones.
        holder.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
        saving = threading.Thread(target=lambda: (app.save(_user()), saved.set()))
        saving.start()
        deadline = time.monotonic() + 10
        waiting = False
        while not waiting and not saved.is_set() and time.monotonic() < deadline:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s", ["%palette_insert_events_%"]).fetchone() == (1,)
        assert waiting and not saved.is_set(), "the save did not wait for the table"
        holder.rollback()
        saving.join(10)
        assert saved.is_set()
    finally:
        holder.close()
        watcher.close()
        app.close()
