"""An erasure cut short by a crash of its API process while the sweeper runs, as served: the
client got no answer and cannot retry (the tombstone refuses its token), so the sweeper must
finish it within its short erasure interval, not at its hourly pass — yet leave alone an erasure
still young enough to be in the hands of a live request."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from adapters import bootstrap
from adapters.bootstrap import build_sweeper, open_event_store
from adapters.erasure import erase
from adapters.retention import Sweeper
from adapters.settings import Settings
from domain.user import User
from tests.integration.test_stack import wait_until

from .conftest import Client
from .test_data_lifecycle import _objects
from .test_lifecycle import create_uploaded_job


class Crash(Exception):
    """The API process dies here (injected)."""


class _DeadS3:
    """The S3 client of a process killed before it deleted the objects."""

    def __getattr__(self, name: str) -> Any:
        raise Crash(f"killed before S3 {name}")


def _crash_mid_erasure(settings: Settings, user_id: uuid.UUID, at: str) -> None:
    """Erase as DELETE /me does, the process dying ``at`` a step: after the tombstone and before
    ``Erased`` ("recording Erased"), or after the key was destroyed and before the objects
    ("deleting objects")."""
    container = bootstrap.build(settings, pool_size=2)
    try:
        service: Any = container.service
        if at == "recording Erased":
            def killed(_: uuid.UUID) -> bool:
                raise Crash(at)
            service.erase_user = killed  # this container only: the sweeper's is untouched
        s3 = _DeadS3() if at == "deleting objects" else container.s3
        with pytest.raises(Crash):
            erase(service, container.read_pool, s3, settings.s3_bucket, user_id)
    finally:
        container.close()


def _db(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(settings.effective_database_url, autocommit=True)


def _completed(settings: Settings, user_id: uuid.UUID) -> bool:
    with _db(settings) as conn:
        row = conn.execute("SELECT completed_at FROM palette_erasures WHERE user_id = %s", [user_id]).fetchone()
    return row is not None and row[0] is not None


def _erased_in_store(settings: Settings, user_id: uuid.UUID) -> bool:
    app = open_event_store(settings)
    try:
        user = app.repository.get(user_id)
        return isinstance(user, User) and user.erased
    finally:
        app.close()


class Served:
    """A sweeper running its loop on a thread as ``palette serve sweeper`` does, counting its
    passes and its erasure passes (the counts only observe; they change nothing)."""

    def __init__(self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sweeper = build_sweeper(settings)
        self.passes = self.erasure_passes = 0
        step, finish = self.sweeper.step, self.sweeper.finish_erasures

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return step(*args, **kwargs)
            finally:
                self.passes += 1

        def counted_finish(*args: Any, **kwargs: Any) -> Any:
            try:
                return finish(*args, **kwargs)
            finally:
                self.erasure_passes += 1

        monkeypatch.setattr(self.sweeper, "step", counted_step)
        monkeypatch.setattr(self.sweeper, "finish_erasures", counted_finish)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sweeper.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        # its pass at start is behind it: what follows is what a sweeper already running sees
        wait_until(lambda: self.passes >= 1, timeout_s=60, what="the sweeper's first pass")
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.sweeper.close()
        assert not self.thread.is_alive()


@pytest.fixture
def served(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def start(**overrides: Any) -> Served:
        # the hourly pass as deployed; erasures looked for often and taken over soon, for the test
        return Served(settings.model_copy(update={"sweep_interval_s": 3600.0, **overrides}), monkeypatch)
    yield start


@pytest.mark.parametrize("crash", ["recording Erased", "deleting objects"])
def test_an_erasure_its_api_process_died_in_is_finished_by_the_running_sweeper_well_before_its_hourly_pass(
        http, settings, served, crash):
    client = Client(http)
    create_uploaded_job(client, 2)
    client.data("POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]})
    user_id = uuid.UUID(client.user_id)
    with served(erasure_sweep_s=0.2, erasure_grace_s=1.0):
        _crash_mid_erasure(settings, user_id, crash)
        assert len(_objects(settings, client.user_id)) == 2 and not _completed(settings, user_id)
        wait_until(lambda: client.call("GET", "/me").status_code == 401, timeout_s=10,
                   what="the API to refuse the token (the client cannot retry)")

        wait_until(lambda: _completed(settings, user_id), timeout_s=30,
                   what="the running sweeper to finish the erasure")
    assert _objects(settings, client.user_id) == set()
    assert _erased_in_store(settings, user_id)
    with _db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM palette_user_keys WHERE user_id = %s", [user_id]).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM palette_webhooks.endpoints WHERE user_id = %s",
                            [user_id]).fetchone() == (0,)


def test_the_running_sweeper_leaves_an_erasure_younger_than_the_grace_to_the_request_performing_it(
        http, settings, served):
    """Two erasures cut short: one older than the grace (its tombstone written earlier), one
    younger. The sweeper finishes the first and, passes later, has not touched the second."""
    old, young = Client(http), Client(http)
    for client in (old, young):
        create_uploaded_job(client, 1)
    # passes every half second too: neither the erasure loop nor a whole pass takes the young one
    with served(erasure_sweep_s=0.1, erasure_grace_s=600.0, sweep_interval_s=0.5) as sweeper:
        _crash_mid_erasure(settings, uuid.UUID(old.user_id), "deleting objects")
        with _db(settings) as conn:  # requested before the grace: no request can still be at it
            conn.execute("UPDATE palette_erasures SET requested_at = requested_at - interval '601 seconds' "
                         "WHERE user_id = %s", [old.user_id])
        _crash_mid_erasure(settings, uuid.UUID(young.user_id), "recording Erased")
        seen, seen_passes = sweeper.erasure_passes, sweeper.passes

        wait_until(lambda: _completed(settings, uuid.UUID(old.user_id)), timeout_s=30,
                   what="the sweeper to finish the erasure older than the grace")
        wait_until(lambda: sweeper.erasure_passes >= seen + 3 and sweeper.passes >= seen_passes + 2, timeout_s=30,
                   what="more erasure passes and whole passes after both tombstones were written")
        assert not _completed(settings, uuid.UUID(young.user_id))
        assert len(_objects(settings, young.user_id)) == 1
        assert not _erased_in_store(settings, uuid.UUID(young.user_id))  # Erased is the live request's to record
    assert _objects(settings, old.user_id) == set()


def test_two_sweepers_finishing_one_erasure_at_once_record_erased_once_and_both_complete(http, settings, caplog):
    """No claim between sweepers (or a sweeper and ``palette admin sweep``): finishing is
    idempotent, so both may take the same erasure and neither fails nor records it twice."""
    from concurrent.futures import ThreadPoolExecutor

    client = Client(http)
    create_uploaded_job(client, 2)
    user_id = uuid.UUID(client.user_id)
    _crash_mid_erasure(settings, user_id, "recording Erased")
    sweepers = [build_sweeper(settings) for _ in range(2)]
    try:
        ready = threading.Barrier(2, timeout=30)

        def finish(sweeper: Sweeper) -> int:
            ready.wait()
            return sweeper.finish_erasures(0.0)

        with ThreadPoolExecutor(2) as threads:
            finished = list(threads.map(finish, sweepers))
    finally:
        for sweeper in sweepers:
            sweeper.close()
    assert all(n >= 1 for n in finished)
    assert not [r for r in caplog.records if str(user_id) in r.getMessage() and "could not finish" in r.getMessage()]
    assert _completed(settings, user_id) and _objects(settings, client.user_id) == set()
    app = open_event_store(settings)
    try:
        topics = [e.topic for e in app.recorder.select_events(user_id)]
    finally:
        app.close()
    assert sum(t.endswith(".Erased") for t in topics) == 1


def _erasures_tried(monkeypatch: pytest.MonkeyPatch, watched: set[uuid.UUID],
                    refused: set[uuid.UUID]) -> list[uuid.UUID]:
    """The sweeper's erasures, each of ``watched`` users noted as tried and failing while the
    user is in ``refused`` (S3 refusing the deletions); the list of tries."""
    import adapters.retention

    tries: list[uuid.UUID] = []

    def erase_through(service: Any, pool: Any, s3: Any, bucket: str, user_id: uuid.UUID, **kw: Any) -> Any:
        if user_id in watched:
            tries.append(user_id)
            if user_id in refused:
                raise OSError("S3 refused the deletion")
        return erase(service, pool, s3, bucket, user_id, **kw)

    monkeypatch.setattr(adapters.retention, "erase", erase_through)
    return tries


def _sweeper_on_a_clock(settings: Settings) -> tuple[Sweeper, list[float]]:
    """A sweeper whose clock reads the list's one item (waits from 30 s)."""
    sweeper = build_sweeper(settings.model_copy(update={"erasure_sweep_s": 30.0}))
    now = [1000.0]
    sweeper.clock = lambda: now[0]
    return sweeper, now


def test_an_erasure_that_keeps_failing_waits_longer_each_time_and_holds_back_no_other(
        http, settings, monkeypatch, caplog):
    """Its S3 deletions fail (a bucket policy, say): the other erasure is finished, this one is
    tried again only once its wait is over, a wait that doubles, its traceback logged once; once
    S3 lets it, it is finished and forgotten."""

    broken, fine = Client(http), Client(http)
    for client in (broken, fine):
        create_uploaded_job(client, 1)
        _crash_mid_erasure(settings, uuid.UUID(client.user_id), "deleting objects")
    broken_id = uuid.UUID(broken.user_id)
    refused = {broken_id}
    tries = _erasures_tried(monkeypatch, {broken_id}, refused)
    sweeper, now = _sweeper_on_a_clock(settings)
    try:
        assert sweeper.finish_erasures(0.0) >= 1
        assert _completed(settings, uuid.UUID(fine.user_id)) and not _completed(settings, broken_id)
        assert len(tries) == 1
        for elapsed, expected_tries in ((29.0, 1), (1.0, 2), (59.0, 2), (1.0, 3), (119.0, 3)):
            now[0] += elapsed
            sweeper.finish_erasures(0.0)
            assert len(tries) == expected_tries, (elapsed, tries)
        logged = [r for r in caplog.records
                  if str(broken_id) in r.getMessage() and "could not finish" in r.getMessage()]
        assert len(logged) == 3 and [r.exc_info is not None for r in logged] == [True, False, False]
        assert "retrying in 120 s" in logged[-1].getMessage()

        refused.clear()
        now[0] += 1.0
        assert sweeper.finish_erasures(0.0) >= 1 and len(tries) == 4
        assert _completed(settings, broken_id) and _objects(settings, broken.user_id) == set()
        assert broken_id not in sweeper._failing
    finally:
        sweeper.close()


def test_once_an_erasure_that_had_failed_finishes_the_others_waiting_are_tried_at_once(
        http, settings, monkeypatch):
    """S3 away: every erasure fails and waits longer each time. The first that finishes again
    says it is back, so the others are tried at the next pass, not at the end of their wait."""

    first, second = Client(http), Client(http)
    for client in (first, second):
        create_uploaded_job(client, 1)
        _crash_mid_erasure(settings, uuid.UUID(client.user_id), "deleting objects")
    ids = {uuid.UUID(first.user_id), uuid.UUID(second.user_id)}
    refused = set(ids)
    tries = _erasures_tried(monkeypatch, ids, refused)
    sweeper, now = _sweeper_on_a_clock(settings)
    try:
        sweeper.finish_erasures(0.0)  # both fail: 30 s to wait
        assert sorted(tries) == sorted(ids)
        refused.discard(uuid.UUID(first.user_id))  # S3 back, the second still refused this time
        now[0] += 30.0
        sweeper.finish_erasures(0.0)  # the first finishes; the second fails again (60 s to wait)
        assert _completed(settings, uuid.UUID(first.user_id)) and len(tries) == 4
        refused.clear()
        now[0] += 1.0
        sweeper.finish_erasures(0.0)  # before: not tried again for 60 s
        assert len(tries) == 5 and _completed(settings, uuid.UUID(second.user_id))
    finally:
        sweeper.close()


def test_one_erasure_pass_finishes_every_erasure_cut_short_not_one_page_of_them(http, settings, monkeypatch):
    """Shown with pages of one, one of them failing each time: the pass goes on past it to the
    others, and ends (it does not read the failing one again and again)."""
    import adapters.retention

    broken, *fine = [Client(http) for _ in range(3)]
    for client in (broken, *fine):
        create_uploaded_job(client, 1)
        _crash_mid_erasure(settings, uuid.UUID(client.user_id), "deleting objects")
    broken_id = uuid.UUID(broken.user_id)
    _erasures_tried(monkeypatch, {broken_id}, {broken_id})
    monkeypatch.setattr(adapters.retention, "PAGE", 1)
    pages = adapters.retention.unfinished_erasures
    asked: list[int] = []

    def bounded(*args: Any) -> Any:
        asked.append(1)
        assert len(asked) <= 100, "the pass reads the same erasures again and again"
        return pages(*args)

    monkeypatch.setattr(adapters.retention, "unfinished_erasures", bounded)
    sweeper = build_sweeper(settings)
    try:
        assert sweeper.finish_erasures(0.0) >= len(fine)
        sweeper.finish_erasures(0.0)  # the failing one waits now: the pass ends all the same
    finally:
        sweeper.close()
    assert all(_completed(settings, uuid.UUID(client.user_id)) for client in fine)
    assert not _completed(settings, broken_id)
    monkeypatch.undo()
    finisher = build_sweeper(settings)
    try:
        finisher.finish_erasures(0.0)  # S3 lets it now: nothing of it is left for the tests after
    finally:
        finisher.close()
    assert _completed(settings, broken_id)


def test_an_erasure_that_failed_here_and_was_finished_elsewhere_is_forgotten(http, settings, monkeypatch):
    """The sweeper keeps a wait only for the users still waiting: one whose erasure an operator
    (``palette admin erase``) finished meanwhile is dropped at the next pass, not kept for ever."""
    client = Client(http)
    create_uploaded_job(client, 1)
    user_id = uuid.UUID(client.user_id)
    _crash_mid_erasure(settings, user_id, "deleting objects")
    tries = _erasures_tried(monkeypatch, {user_id}, {user_id})
    sweeper, _ = _sweeper_on_a_clock(settings)
    try:
        sweeper.finish_erasures(0.0)
        assert len(tries) == 1 and user_id in sweeper._failing
        container = bootstrap.build(settings, pool_size=2)
        try:  # the operator's erasure, S3 letting it
            erase(container.service, container.read_pool, container.s3, settings.s3_bucket, user_id)
        finally:
            container.close()
        assert _completed(settings, user_id)
        sweeper.finish_erasures(0.0)
        assert user_id not in sweeper._failing and len(tries) == 1
    finally:
        sweeper.close()


def test_a_tombstone_with_no_user_behind_it_is_completed_by_the_sweeper(settings):
    """An erasure requested for an id the event store has no user for (nothing to record): the
    sweeper still completes it, rather than failing on it for ever."""
    from adapters.keyring import request_erasure

    user_id = uuid.uuid4()
    with _db(settings) as conn:
        request_erasure(conn, user_id)
    sweeper = build_sweeper(settings)
    try:
        assert sweeper.finish_erasures(0.0) >= 1
    finally:
        sweeper.close()
    assert _completed(settings, user_id)
