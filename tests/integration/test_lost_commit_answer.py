"""A save whose commit landed but whose answer was lost (the connection broke right after it) is
answered as saved, once: eventsourcing's retry of the save meets the save's own events as a
conflict, and deciding the commands again would apply them twice (a credit grant granted twice)
or refuse what did happen. Real PostgreSQL, behind a proxy that loses the insert's answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from adapters.bootstrap import event_store_env, executor
from adapters.pg_streams import PgStreamLoader, insert_in_one_round_trip, pg_stream_loader
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import DirectExecutor, GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.user import User
from tests.keys import process_keys
from tests.pg_answer_loss import AnswerLosingProxy, answer_losing_proxy

INSERT = b"palette_insert_events"  # the one statement a save sends (insert_in_one_round_trip)


@pytest.fixture
def proxy(settings: Settings) -> Iterator[AnswerLosingProxy]:
    with answer_losing_proxy(settings.pg_port, INSERT) as p:
        yield p


def _app(settings: Settings, schema: str, port: int) -> PaletteApplication:
    app = PaletteApplication(env={**event_store_env(settings, schema=schema), "POSTGRES_PORT": str(port)})
    assert insert_in_one_round_trip(app)
    return app


@pytest.fixture(params=["group commit", "direct", "direct, the recorder's reads"])
def through_proxy(request: Any, settings: Settings, schema: str,
                  proxy: AnswerLosingProxy) -> Iterator[PaletteService]:
    app = _app(settings, schema, proxy.port)
    runs: Any = (GroupCommitter(app, pg_stream_loader(app)).start() if request.param == "group commit"
                 else executor(app, "direct") if request.param == "direct" else DirectExecutor(app))
    yield PaletteService(app, runs, SystemClock(), RandomIds(), **process_keys())
    if isinstance(runs, GroupCommitter):
        runs.stop()
    app.close()


def _stored(settings: Settings, schema: str, user_id: Any) -> tuple[User, list[str]]:
    """The user as the store holds it, and the topics of its events: read past the proxy."""
    app = _app(settings, schema, settings.pg_port)
    try:
        user = app.repository.get(user_id)
        topics = [e.topic for e in app.recorder.select_events(user_id)]
    finally:
        app.close()
    return user, topics


def test_a_grant_whose_answer_was_lost_is_granted_once_and_answered(through_proxy, proxy, settings, schema):
    user_id = through_proxy.register("a-device").value[0]
    before, events_before = _stored(settings, schema, user_id)
    proxy.lose_next()
    balance = through_proxy.grant_credits(user_id, 7, "support").value
    assert proxy.lost == 1  # the save completed (committed) and its answer was lost indeed
    after, events_after = _stored(settings, schema, user_id)
    assert after.balance == before.balance + 7 == balance
    assert len(events_after) == len(events_before) + 1


def test_a_job_created_whose_answer_was_lost_is_created_once(through_proxy, proxy, settings, schema):
    user_id = through_proxy.register("a-device").value[0]
    proxy.lose_next()
    job_id = through_proxy.create_job(user_id, "interior", 2).value
    assert proxy.lost == 1
    user, _ = _stored(settings, schema, user_id)
    assert user.reservations == {job_id: 2}


def test_the_direct_executor_on_postgresql_checks_a_failed_save_with_the_one_query_loader(settings, schema):
    """The wiring only: the recorder's reads retry ten times, each up to the pool's timeout, so with
    the database away the check after a save that failed so took as long again (101.8 s against
    10 s measured once, by hand); the loader's one query is tried once."""
    app = _app(settings, schema, settings.pg_port)
    try:
        assert isinstance(executor(app, "direct").loader, PgStreamLoader)  # type: ignore[union-attr]
    finally:
        app.close()
