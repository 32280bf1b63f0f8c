"""The core on real PostgreSQL: races between processes keep every invariant."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from adapters.bootstrap import event_store_env
from adapters.pg_streams import PgStreamLoader, pg_stream_loader
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import DirectExecutor, GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.errors import ConcurrencyLimit, DomainError, InsufficientCredits, InvalidState
from domain.job import JobStatus, ResultOutcome
from domain.plans import DEFAULT_PLANS, Plan
from domain.user import User
from tests.keys import process_keys

EDITS = {"wall": {"action": "tone", "value": "warm"}}
PLANS = {**DEFAULT_PLANS, "wide": Plan("wide", initial_credits=100, max_concurrency=50, max_rule_slots=2)}


@pytest.fixture
def two_processes(settings: Settings) -> Iterator[tuple[PaletteService, PaletteService]]:
    """Two independent apps (own pools; a group-commits through its cache) on one store, as two
    API processes would be.
    The store lives in its own schema, out of reach of the session's relay and GPU worker."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS core_races")
    app_a = PaletteApplication(env=event_store_env(settings, schema="core_races"))
    app_b = PaletteApplication(env=event_store_env(settings, schema="core_races"))
    committer = GroupCommitter(app_a, pg_stream_loader(app_a)).start()
    assert isinstance(committer.cache.loader, PgStreamLoader)  # one query per batch, not the fallback
    a = PaletteService(app_a, committer, SystemClock(), RandomIds(), plans=PLANS, **process_keys())
    b = PaletteService(app_b, DirectExecutor(app_b), SystemClock(), RandomIds(), plans=PLANS, **process_keys())
    yield a, b
    committer.stop()
    app_a.close()
    app_b.close()


def _queued_job(svc: PaletteService, user_id: uuid.UUID, items: int) -> uuid.UUID:
    job_id = svc.create_job(user_id, "interior", items).value
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, EDITS, [])
    return job_id


def test_1000_races_of_cancel_against_the_last_result_settle_each_job_once(two_processes):
    a, b = two_processes
    races = 1000
    with ThreadPoolExecutor(32) as pool:
        users = list(pool.map(lambda i: a.register(f"race-{uuid.uuid4()}", plan="pro").value[0],
                              range(races // 4)))
        owners = [users[i // 4] for i in range(races)]
        jobs = list(pool.map(lambda u: _queued_job(a, u, 2), owners))
        list(pool.map(lambda j: a.record_item_result(j, 0, "done", f"{j}:0"), jobs))

    winners: Counter[str] = Counter()
    with ThreadPoolExecutor(2) as pool:
        for user_id, job_id in zip(owners, jobs, strict=True):
            barrier = threading.Barrier(2, timeout=30)

            def cancel(u=user_id, j=job_id, bar=barrier):  # type: ignore[no-untyped-def]
                bar.wait()
                try:
                    return a.cancel_job(u, j).value
                except InvalidState:
                    return False

            def last_result(j=job_id, bar=barrier):  # type: ignore[no-untyped-def]
                bar.wait()
                return b.record_item_result(j, 1, "done", f"{j}:1").value

            canceled = pool.submit(cancel)
            result = pool.submit(last_result)
            did_cancel, recorded = canceled.result(), result.result()
            finished = recorded.outcome == ResultOutcome.RECORDED
            assert did_cancel != finished, "exactly one of cancel and last result must win"
            winners["cancel" if did_cancel else "result"] += 1

    for user_id in users:
        user: User = a.app.repository.get(user_id)
        assert user.granted == user.balance + user.reserved + user.spent
        assert user.reserved == 0
        settled = Counter(e.job_id for e in a.app.events.get(user_id) if isinstance(e, User.CreditsSettled))
        assert set(settled.values()) == {1} and len(settled) == 4
    statuses = Counter(a.app.repository.get(j).status for j in jobs)
    assert statuses[JobStatus.CANCELED] == winners["cancel"]
    assert statuses[JobStatus.DONE] == winners["result"]
    assert sum(statuses.values()) == races


def test_50_concurrent_job_creations_never_exceed_credits_or_concurrency(two_processes):
    a, b = two_processes
    for plan, items, expected in (("free", 5, 1), ("wide", 7, 100 // 7)):
        user_id = a.register(f"burst-{uuid.uuid4()}", plan=plan).value[0]

        def create(i: int, u: uuid.UUID = user_id, n: int = items) -> str:
            try:
                (a if i % 2 else b).create_job(u, "interior", n)
                return "ok"
            except (ConcurrencyLimit, InsufficientCredits) as e:
                return e.code
            except DomainError as e:
                return e.code

        with ThreadPoolExecutor(50) as pool:
            outcomes = Counter(pool.map(create, range(50)))
        assert outcomes["ok"] == expected, outcomes
        view = a.get_user(user_id)
        assert view.credits >= 0
        assert view.reserved == expected * items
        assert view.credits + view.reserved == PLANS[plan].initial_credits
