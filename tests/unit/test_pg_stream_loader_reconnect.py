"""The group committer's prefetch (``PgStreamLoader``) after PostgreSQL restarted: the pool's idle
connections are dead and each fails its first use. Seen live (``pg_ctl stop -m immediate`` under
``palette up``, the API left running): 11 ``POST /auth/anon`` in a row answered 500 ``INTERNAL``
ten seconds after ``/health`` said PostgreSQL was back, one per dead pooled connection. A read
that meets a dead connection checks the pool (dead ones replaced) and runs once more."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError

from adapters.pg_streams import PgStreamLoader


class _Cursor:
    def __init__(self, datastore: _Datastore) -> None:
        self.datastore = datastore

    def __enter__(self) -> _Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, query: Any, params: Any, prepare: bool = False) -> None:
        if self.datastore.pool.dead:  # a connection from before the restart
            self.datastore.pool.dead -= 1
            raise OperationalError("consuming input failed: server closed the connection unexpectedly")

    def fetchall(self) -> list[dict[str, Any]]:
        return [dict(self.datastore.row)]


class _Pool:
    def __init__(self, dead: int) -> None:
        self.dead = dead  # idle connections that died with the server
        self.checks = 0

    def check(self) -> None:  # psycopg_pool: idle connections tested, the broken ones replaced
        self.checks += 1
        self.dead = 0


class _Datastore:
    schema = "public"

    def __init__(self, dead: int) -> None:
        self.pool = _Pool(dead)
        self.row = {"snapshot": False, "originator_id": uuid.uuid4(), "originator_version": 1,
                    "topic": "t", "state": b"{}"}

    @contextlib.contextmanager
    def get_connection(self) -> Iterator[Any]:
        yield SimpleNamespace(cursor=lambda: _Cursor(self))


def _loader(dead: int, snapshots: bool) -> tuple[PgStreamLoader, _Datastore]:
    datastore = _Datastore(dead)
    recorder: Any = SimpleNamespace(datastore=datastore, events_table_name="events")
    return PgStreamLoader(recorder, recorder if snapshots else None), datastore


@pytest.mark.parametrize("snapshots", [False, True])
def test_a_read_after_a_database_restart_survives_the_pools_dead_connections(snapshots: bool) -> None:
    loader, datastore = _loader(dead=11, snapshots=snapshots)
    _, events = loader.since_snapshots({uuid.uuid4(): 0})
    assert [e.originator_version for e in events] == [1]
    assert datastore.pool.checks == 1
    assert [e.originator_version for e in loader.newer_than({uuid.uuid4(): 0})] == [1]  # the pool is whole again
    assert datastore.pool.checks == 1


def test_a_database_still_down_fails_the_read() -> None:
    loader, datastore = _loader(dead=0, snapshots=False)

    def down() -> None:
        raise OperationalError("connection refused")

    datastore.pool.check = down  # type: ignore[method-assign]
    datastore.pool.dead = 10**6
    with pytest.raises(OperationalError):
        loader.newer_than({uuid.uuid4(): 0})


def test_no_connection_within_the_pools_timeout_is_not_waited_for_twice() -> None:
    """eventsourcing turns psycopg_pool's PoolTimeout (no connection within
    POSTGRES_CONNECT_TIMEOUT: the database down, or the pool busy) into an OperationalError; read
    again, it waited as long once more (20 s, not 10 s, a group-commit batch in an outage)."""
    from psycopg_pool import PoolTimeout

    loader, datastore = _loader(dead=0, snapshots=False)
    tries = []

    @contextlib.contextmanager
    def get_connection() -> Iterator[Any]:
        tries.append(1)
        try:
            raise PoolTimeout("couldn't get a connection after 10.00 sec")
        except PoolTimeout as e:
            raise OperationalError(str(e)) from e
        yield  # pragma: no cover

    datastore.get_connection = get_connection  # type: ignore[method-assign]
    with pytest.raises(OperationalError):
        loader.newer_than({uuid.uuid4(): 0})
    assert tries == [1] and datastore.pool.checks == 0
