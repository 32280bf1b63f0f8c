"""Snapshots on real PostgreSQL: a store made before them gets their table, the group committer
writes them there, and a cold load reads each stream's newest one (one query for any number of
streams) and only the events after it."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from psycopg import sql

from adapters.bootstrap import event_store_env
from adapters.pg_streams import PgStreamLoader, pg_stream_loader
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from application.unit_of_work import Committed
from domain.contracts.keys import input_key
from domain.user import User
from tests.bench.cold_load import grant
from tests.keys import process_keys
from tests.simulation import Uploads
from tests.unit.test_snapshots import cold_read, folded, state

EDITS = {"wall": {"action": "tone", "value": "warm"}}


def _grow(committer: GroupCommitter, user_id: uuid.UUID, events: int, together: int = 40) -> None:
    """``events`` grants, queued ``together`` at a time (a queue's worth is saved in one batch,
    which takes one snapshot however many multiples it passes)."""
    for start in range(0, events, together):
        futures: list[Future[Committed[Any]]] = [committer.submit(grant(user_id))
                                                 for _ in range(min(together, events - start))]
        for f in futures:
            f.result()
    committer.read(user_id)  # queued behind the last batch: its snapshot (taken after it answers) is written


def test_a_store_from_before_snapshots_gets_their_table_and_cold_loads_read_from_them(
        settings: Settings, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    old = PaletteApplication(env=event_store_env(settings, schema=schema))
    old.close()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, "palette_snapshots")))  # made before them
    env = event_store_env(settings, schema=schema)
    assert env.get("CREATE_TABLE") != "n"  # the missing table is made, not taken as there
    app = PaletteApplication(env=env)
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    svc = PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
    try:
        users = [svc.register(f"snap-{uuid.uuid4()}").value[0] for _ in range(3)]
        _grow(committer, users[0], 250)  # from version 2: past 100 and 200
        _grow(committer, users[1], 120)
        assert committer.snapshots_taken >= 3
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            rows = conn.execute(sql.SQL("SELECT originator_id, max(originator_version) FROM {} GROUP BY originator_id")
                                .format(sql.Identifier(schema, "palette_snapshots"))).fetchall()
        newest = {u: v for u, v in rows}
        assert set(newest) == set(users[:2])  # the third never reached 100 events
        assert newest[users[0]] >= 200 and newest[users[1]] >= 100
        assert event_store_env(settings, schema=schema).get("CREATE_TABLE") == "n"

        loader = pg_stream_loader(app)
        assert isinstance(loader, PgStreamLoader)
        snapshots, events = loader.since_snapshots(dict.fromkeys(users, 0))  # one query for all three
        assert {(s.originator_id, s.originator_version) for s in snapshots} == set(newest.items())
        # each stream's events from its snapshot's (the snapshot is checked against it), in order
        past = {u: newest[u] - 1 if u in newest else 0 for u in users}
        for u in users:
            assert [e.originator_version for e in events if e.originator_id == u] == [
                e.originator_version for e in app.recorder.select_events(u, gt=past[u] or None)]
        # past a version given beyond the newest snapshot: no snapshot, the events past the version
        assert loader.since_snapshots({users[0]: newest[users[0]] + 1}) == (
            [], loader.newer_than({users[0]: newest[users[0]] + 1}))
        with caplog.at_level(logging.WARNING, logger="application.executors"):
            for user_id in users:
                assert state(cold_read(app, loader, user_id)) == state(folded(app, user_id))
        assert "cannot be read" not in caplog.text  # from the snapshots, each agreeing with its event
        # Restored behind its snapshots: the first user's events past 150 gone, its snapshot at
        # 200 or more kept. The load is the 150 events there are, from the snapshot at 100 or so.
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s AND originator_version > 150")
                         .format(sql.Identifier(schema, "palette_events")), [users[0]])
        snapshots, _ = loader.since_snapshots({users[0]: 0})
        assert len(snapshots) == 1 and 100 <= snapshots[0].originator_version <= 150
        restored = cold_read(app, loader, users[0])
        assert restored.version == 150 and state(restored) == state(folded(app, users[0]))
    finally:
        committer.stop()
        app.close()


def test_a_user_holding_reservations_is_snapshotted_and_loaded_as_it_was(settings: Settings, schema: str) -> None:
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    committer = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 5}).start()
    uploads = Uploads()
    svc = PaletteService(app, committer, SystemClock(), RandomIds(), store=uploads, **process_keys())
    try:
        user_id = svc.register(f"snap-{uuid.uuid4()}", plan="pro").value[0]
        jobs = []
        for _ in range(4):  # each a CreditsReserved: versions 3-6, past 5 with 2 or 3 reservations held
            job_id = svc.create_job(user_id, "interior", 1).value
            uploads.keys.add(input_key(user_id, job_id, 0))
            svc.confirm_upload(user_id, job_id)
            svc.execute_job(user_id, job_id, EDITS)
            jobs.append(job_id)
        committer.read(user_id)  # queued behind the last save: its snapshot is written
        assert app.snapshots is not None and committer.snapshots_taken == 1
        (snapshot,) = app.snapshots.get(user_id)
        assert snapshot.originator_version == 5
        user = cold_read(app, pg_stream_loader(app), user_id)
        assert isinstance(user, User) and set(user.reservations) == set(jobs)
        assert state(user) == state(folded(app, user_id))
    finally:
        committer.stop()
        app.close()


def test_a_snapshots_table_gone_at_run_time_costs_only_the_shortcut(settings: Settings, schema: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    committer = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 2}).start()
    svc = PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
    try:
        user_id = svc.register(f"snap-{uuid.uuid4()}").value[0]  # version 2: a snapshot
        committer.read(user_id)  # queued behind the save: its snapshot is written
        assert committer.snapshots_taken == 1
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, "palette_snapshots")))
        cold = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 2}).start()
        cold_svc = PaletteService(app, cold, SystemClock(), RandomIds(), **process_keys())
        try:
            with caplog.at_level(logging.WARNING, logger="application.executors"):
                assert cold_svc.grant_credits(user_id, 5, "promo").value == 55  # loaded from its events
                assert cold_svc.grant_credits(user_id, 5, "promo").value == 60  # version 4: a snapshot
                cold.read(user_id)  # queued behind the save: its snapshot was tried, and failed
            assert "loading from snapshots failed" in caplog.text and "no snapshot of" in caplog.text
            assert state(cold.read(user_id)) == state(folded(app, user_id))
        finally:
            cold.stop()
    finally:
        committer.stop()
        app.close()


def test_a_snapshot_of_a_history_a_restore_undid_is_not_loaded_once_the_stream_is_written_up_to_it(
        settings: Settings, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """Restored behind its snapshots (the events past 3 gone, the snapshots at 4 and 6 kept), the
    user is written again up to 6: those snapshots are of the history the restore undid, and a
    cold load folds the stream as it is now, not the credits it had then."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    committer = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 2}).start()
    svc = PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
    try:
        user_id = svc.register(f"snap-{uuid.uuid4()}").value[0]
        for _ in range(4):
            svc.grant_credits(user_id, 1, "promo")  # versions 3-6: snapshots at 4 and 6
        committer.read(user_id)  # queued behind the last save: its snapshot is written
        committer.stop()
        assert committer.snapshots_taken == 3
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s AND originator_version > 3")
                         .format(sql.Identifier(schema, "palette_events")), [user_id])
        again = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 2}).start()
        try:
            again_svc = PaletteService(app, again, SystemClock(), RandomIds(), **process_keys())
            with caplog.at_level(logging.WARNING, logger="application.executors"):
                for _ in range(3):
                    again_svc.grant_credits(user_id, 7, "promo")  # versions 4-6 of another history
                again.read(user_id)  # its snapshots at 4 and 6 were tried: the old ones hold the keys
        finally:
            again.stop()
        whole = folded(app, user_id)
        assert whole.version == 6 and whole.balance == 50 + 1 + 21
        with caplog.at_level(logging.WARNING, logger="application.executors"):
            assert state(cold_read(app, pg_stream_loader(app), user_id)) == state(whole)
        assert "not of the stream's history" in caplog.text
    finally:
        app.close()
