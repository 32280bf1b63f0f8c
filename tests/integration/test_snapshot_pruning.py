"""Superseded snapshots pruned on real PostgreSQL (``adapters.retention.prune_snapshots``, the
sweeper's pass): a load reads only a stream's newest snapshot (the newest with an event of its
version), so every older one of the stream is deleted, a batch a statement; the newest is kept,
whatever is written meanwhile, and each stream loads as its events fold with no snapshot."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg_pool import ConnectionPool

from adapters.bootstrap import event_store_env
from adapters.pg_streams import PgStreamLoader, pg_stream_loader
from adapters.retention import Sweeper, prune_snapshots
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.user import User
from tests.keys import process_keys
from tests.unit.test_snapshots import cold_read, folded, state

Key = tuple[uuid.UUID, int]


def _tables(schema: str) -> tuple[sql.Identifier, sql.Identifier]:
    return sql.Identifier(schema, "palette_snapshots"), sql.Identifier(schema, "palette_events")


def _snapshots(conn: psycopg.Connection[Any], schema: str) -> set[Key]:
    return {(r[0], r[1]) for r in conn.execute(sql.SQL("SELECT originator_id, originator_version FROM {}")
                                               .format(_tables(schema)[0])).fetchall()}


def _prune_all(conn: psycopg.Connection[Any], schema: str, limit: int) -> list[int]:
    """Statements until one deletes fewer than ``limit``, each after the last one's keys; how many
    each deleted."""
    snapshots, events = _tables(schema)
    sizes, after = [], None
    while True:
        deleted = prune_snapshots(conn, snapshots, events, after, limit)
        sizes.append(len(deleted))
        if len(deleted) < limit:
            return sizes
        after = max(deleted)


@pytest.fixture
def store(settings: Settings, schema: str) -> Iterator[tuple[PaletteApplication, PaletteService, GroupCommitter]]:
    """A store of the test's own whose users get a snapshot every 2 events."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    committer = GroupCommitter(app, pg_stream_loader(app), snapshot_every={User: 2}).start()
    try:
        yield app, PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys()), committer
    finally:
        committer.stop()
        app.close()


def _users(svc: PaletteService, committer: GroupCommitter, grants: list[int]) -> list[uuid.UUID]:
    """A user per entry, registered (version 2: a snapshot) then granted that many times, a save
    each (a snapshot at each even version)."""
    users = []
    for n in grants:
        user_id = svc.register(f"prune-{uuid.uuid4()}").value[0]
        for _ in range(n):
            svc.grant_credits(user_id, 1, "promo")
        committer.read(user_id)  # queued behind the last save: its snapshot is written
        users.append(user_id)
    return users


def test_each_stream_keeps_only_its_newest_snapshot_a_batch_a_statement_and_loads_as_its_events_fold(
        store: tuple[PaletteApplication, PaletteService, GroupCommitter], schema: str,
        conn: psycopg.Connection[Any]) -> None:
    app, svc, committer = store
    a, b, d = _users(svc, committer, [10, 0, 6])  # snapshots 2..12 (5 superseded), 2 alone, 2..8 (3)
    assert _snapshots(conn, schema) == {(a, v) for v in range(2, 13, 2)} | {(b, 2)} | {(d, v) for v in range(2, 9, 2)}
    assert _prune_all(conn, schema, limit=3) == [3, 3, 2]  # 8 superseded: three statements
    assert _snapshots(conn, schema) == {(a, 12), (b, 2), (d, 8)}  # b's only snapshot is its newest
    assert _prune_all(conn, schema, limit=3) == [0]  # idempotent
    loader = pg_stream_loader(app)
    assert isinstance(loader, PgStreamLoader)
    snapshots, _ = loader.since_snapshots(dict.fromkeys((a, b, d), 0))
    assert {(s.originator_id, s.originator_version) for s in snapshots} == {(a, 12), (b, 2), (d, 8)}
    for user_id in (a, b, d):  # the oracle folds the stored events, no snapshot read
        loaded = cold_read(app, loader, user_id)
        assert loaded.version == folded(app, user_id).version and state(loaded) == state(folded(app, user_id))


def test_a_snapshot_written_while_pruning_is_not_seen_and_the_newest_committed_one_is_kept(
        store: tuple[PaletteApplication, PaletteService, GroupCommitter], schema: str, settings: Settings,
        conn: psycopg.Connection[Any]) -> None:
    _, svc, committer = store
    (a,) = _users(svc, committer, [2])  # snapshots at 2 and 4
    snapshots, events = _tables(schema)
    with psycopg.connect(settings.effective_database_url) as writer:  # a snapshot at 5, not committed
        writer.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                               "SELECT originator_id, 5, topic, state FROM {} WHERE originator_id = %s "
                               "AND originator_version = 4").format(snapshots, snapshots), [a])
        assert prune_snapshots(conn, snapshots, events, None, 10) == [(a, 2)]  # 4 is the newest it sees
        writer.commit()
    assert _snapshots(conn, schema) == {(a, 4), (a, 5)}  # 5 has no event: 4 is still the one loads use
    svc.grant_credits(a, 1, "promo")  # version 5: the snapshot at 5 is backed now
    assert prune_snapshots(conn, snapshots, events, None, 10) == [(a, 4)]
    assert _snapshots(conn, schema) == {(a, 5)}


def test_a_store_restored_behind_its_snapshots_keeps_the_one_loads_use(
        store: tuple[PaletteApplication, PaletteService, GroupCommitter], schema: str,
        conn: psycopg.Connection[Any]) -> None:
    app, svc, committer = store
    (a,) = _users(svc, committer, [10])  # snapshots 2..12
    conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s AND originator_version > 7")
                 .format(_tables(schema)[1]), [a])  # events past 7 lost, their snapshots kept
    assert _prune_all(conn, schema, limit=10) == [2]  # 2 and 4: older than 6, the newest with its event
    assert _snapshots(conn, schema) == {(a, v) for v in (6, 8, 10, 12)}
    loaded = cold_read(app, pg_stream_loader(app), a)
    assert loaded.version == 7 and state(loaded) == state(folded(app, a))


def test_the_sweepers_pass_prunes_every_superseded_snapshot_a_batch_at_a_time(
        store: tuple[PaletteApplication, PaletteService, GroupCommitter], schema: str, settings: Settings,
        conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    app, svc, committer = store
    a, b = _users(svc, committer, [7, 0])  # snapshots 2..8 (3 superseded), 2 alone
    monkeypatch.setattr("adapters.retention.SNAPSHOT_BATCH", 2)
    statements: list[int] = []
    real = prune_snapshots

    def counted(*args: Any) -> list[Key]:
        deleted = real(*args)
        statements.append(len(deleted))
        return deleted

    monkeypatch.setattr("adapters.retention.prune_snapshots", counted)
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=1,
                        kwargs={"autocommit": True}, open=True) as pool:
        sweeper: Any = SimpleNamespace(container=SimpleNamespace(app=app, read_pool=pool))
        assert Sweeper.superseded_snapshots(sweeper) == 3
        assert statements == [2, 1]
        assert Sweeper.superseded_snapshots(sweeper) == 0
    assert _snapshots(conn, schema) == {(a, 8), (b, 2)}


@given(streams=st.lists(st.tuples(st.integers(0, 6), st.sets(st.integers(1, 8), max_size=6)), max_size=5),
       limit=st.integers(1, 4))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_pruning_keeps_exactly_what_a_load_could_read_in_batches_of_the_limit(
        store: tuple[PaletteApplication, PaletteService, GroupCommitter], schema: str,
        conn: psycopg.Connection[Any], streams: list[tuple[int, set[int]]], limit: int) -> None:
    """Streams of ``n`` events with snapshots at any versions, some past the stream's end (a store
    restored behind them). Kept: each snapshot with no newer one that has its event."""
    app = store[0]
    snapshots, events = _tables(schema)
    conn.execute(sql.SQL("TRUNCATE {}, {}").format(snapshots, events))
    expected, total = set(), 0
    for n, versions in streams:
        stream = uuid.uuid4()
        if n:
            app.recorder.insert_events([StoredEvent(stream, v, "t", b"{}") for v in range(1, n + 1)])
        if versions:
            assert app.snapshots is not None
            app.snapshots.recorder.insert_events([StoredEvent(stream, v, "t", b"{}") for v in versions])
        newest_backed = max((v for v in versions if v <= n), default=0)
        expected |= {(stream, v) for v in versions if v >= newest_backed}
        total += len(versions)
    sizes = _prune_all(conn, schema, limit)
    assert all(s == limit for s in sizes[:-1]) and sizes[-1] < limit
    assert sum(sizes) == total - len(expected)
    assert _snapshots(conn, schema) == expected
    assert _prune_all(conn, schema, limit) == [0]
