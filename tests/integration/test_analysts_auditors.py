"""Analysts and auditors: replay folds to the live aggregate, as-of matches the events before
that time, any edited/deleted/inserted ledger row breaks verify at that row, and reconcile
catches a projection changed behind its back."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections import audit
from projections.replay import Replayer

from .test_projections import drained, service, workload  # noqa: F401 - shared module fixture
from .test_stack import wait_until


@pytest.fixture(scope="module")
def history(apps, service) -> Replayer:  # noqa: F811
    workload(service, 6, random.Random(21))
    return Replayer(service.app)


@pytest.fixture
def tx(settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose changes are rolled back: tampering never outlives the test."""
    with psycopg.connect(settings.effective_database_url) as conn:
        yield conn
        conn.rollback()


def _streams(replayer: Replayer) -> list[Any]:
    return sorted({e.stream_id for e in replayer.all()})


def test_replaying_a_stream_folds_to_the_live_aggregate(history, service):  # noqa: F811
    for stream_id in _streams(history):
        live = service.app.repository.get(stream_id)
        replayed = history.state(stream_id, version=live.version)
        events = list(history.stream(stream_id))
        assert [e.version for e in events] == list(range(1, live.version + 1))
        assert replayed["state"]["version"] == live.version
        assert replayed == history.state(stream_id, as_of=events[-1].timestamp)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_as_of_equals_the_fold_of_the_events_before_that_time(history, service, data):  # noqa: F811
    stream_id = data.draw(st.sampled_from(_streams(history)))
    events = list(service.app.events.get(stream_id))
    cut = data.draw(st.integers(0, len(events) - 1))
    as_of = events[cut].timestamp
    aggregate = None
    for event in events:
        if event.timestamp <= as_of:
            aggregate = event.mutate(aggregate)
    assert aggregate is not None
    assert history.state(stream_id, as_of=as_of)["version"] == aggregate.version


def test_replay_all_filters_by_type_and_time(history):
    everything = list(history.all())
    grants = list(history.all(types=["CreditsGranted"]))
    assert grants and all(e.type == "CreditsGranted" for e in grants)
    assert [e.id for e in everything] == sorted(e.id for e in everything)
    middle = everything[len(everything) // 2].timestamp
    later = list(history.all(since=middle))
    assert later and all(e.timestamp >= middle for e in later)
    assert {e.id for e in later} == {e.id for e in everything if e.timestamp >= middle}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), mode=st.sampled_from(["edit", "delete", "insert"]))
def test_tampering_with_any_ledger_row_breaks_verify_at_that_row(history, service, settings, data, mode):  # noqa: F811
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(service, probe), timeout_s=60, what="projections to drain")
    with psycopg.connect(settings.effective_database_url) as conn:
        rows = conn.execute("SELECT id, user_id, seq FROM palette_read.billing_events ORDER BY position, id").fetchall()
        target_id, user_id, seq = data.draw(st.sampled_from(rows))
        if mode == "edit":
            conn.execute("UPDATE palette_read.billing_events SET amount = amount + 1 WHERE id = %s", [target_id])
        elif mode == "delete":
            conn.execute("DELETE FROM palette_read.billing_events WHERE id = %s", [target_id])
        else:  # a forged row slipped in at this seq, the rest shifted up
            conn.execute("UPDATE palette_read.billing_events SET seq = seq + 1000 WHERE user_id = %s AND seq >= %s",
                         [user_id, seq])
            conn.execute("UPDATE palette_read.billing_events SET seq = seq - 999 WHERE user_id = %s AND seq >= %s",
                         [user_id, seq + 1000])
            conn.execute("INSERT INTO palette_read.billing_events SELECT 'forged', user_id, %s, 'grant', 100, 100, "
                         "'x', occurred_at, position, prev_hash, hash FROM palette_read.billing_events WHERE id = %s",
                         [seq, target_id])
        _, breaks = audit.verify(conn)
        conn.rollback()
    assert [b.user_id for b in breaks] == [str(user_id)]
    assert breaks[0].seq == seq


def test_reconcile_is_clean_then_catches_a_row_changed_behind_its_back(history, service, settings, tx):  # noqa: F811
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(service, probe), timeout_s=60, what="projections to drain")
    clean = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert clean.ok, clean.differences
    tx.execute("UPDATE palette_read.users SET credits = credits + 7 WHERE id = "
               "(SELECT id FROM palette_read.users ORDER BY id LIMIT 1)")
    tx.execute("UPDATE palette_read.billing_events SET amount = 1 WHERE id = "
               "(SELECT id FROM palette_read.billing_events WHERE type = 'grant' ORDER BY position LIMIT 1)")
    dirty = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert not dirty.ok
    assert any("projection has (credits" in d for d in dirty.differences)
    assert any(d.startswith("in the projection but not in the log") for d in dirty.differences)


def test_reconcile_on_a_live_system_reports_no_false_differences(apps, history, service, settings):  # noqa: F811
    """Commands keep landing (and the projector keeps folding) while reconcile reads: one snapshot
    of the projection, the log folded to the versions it tracked, so nothing differs."""
    import threading

    done = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:  # a bounded workload, as long as the reconciliations last
        rng = random.Random(99)
        try:
            for _ in range(200):
                if done.is_set():
                    return
                workload(service, 1, rng)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            reports = []
            for _ in range(3):
                apps.supervisor.check()  # as `palette up` does: a crashed process comes back
                reports.append(audit.reconcile(conn, service.app.recorder, service.app.mapper.transcoder,
                                               wait_s=90))
    finally:
        done.set()
        loader.join()
    assert not errors, errors
    for report in reports:
        if not report.ok:  # what the projector said, to tell a slow projector from a wrong fold
            print("projector log:", (settings.data_dir / "logs" / "projector.log").read_text()[-3000:])
        assert report.ok, report.differences
    assert reports[-1].position > reports[0].position  # the log did move underneath
