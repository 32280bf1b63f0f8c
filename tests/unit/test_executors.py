"""The executors on the in-memory store: reads go through the one aggregate cache (the group
committer's) and see committed state only; stream loading stays behind the StreamLoader port."""

from __future__ import annotations

import ast
import asyncio
import gc
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import Application
from eventsourcing.persistence import DatabaseError, OperationalError

from application.executors import DirectExecutor, GroupCommitter, RecorderStreamLoader, WriterCache, approx_bytes
from application.services import PaletteApplication, PaletteService
from application.unit_of_work import ConflictError, touches
from domain.errors import NotFound, ValidationFailed
from domain.job import Job
from domain.plans import DEFAULT_PLANS
from domain.user import User
from tests.keys import process_keys
from tests.simulation import AnswerLost, Ids, StepClock
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _hold_writer(committer: GroupCommitter, timeout: float = 10) -> tuple[threading.Event, Future[Any]]:
    """Keep the writer busy in a command until the event returned is set (or ``timeout`` passes);
    returns once it holds, with that command's future. Whatever is queued meanwhile waits."""
    held, release = threading.Event(), threading.Event()

    def hold(uow):  # type: ignore[no-untyped-def]
        held.set()
        release.wait(timeout)

    served = committer.submit(hold)
    assert held.wait(10)
    return release, served


def _service(group_commit: bool, **env: str) -> PaletteService:
    """A service on the in-memory store (``env``: more of the store's settings)."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo", **env})
    runs = GroupCommitter(app) if group_commit else DirectExecutor(app)
    return PaletteService(app, runs, StepClock(), Ids(), **process_keys())


def test_the_event_store_keeps_no_aggregate_cache_of_its_own() -> None:
    assert PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).repository.cache is None


def test_a_read_is_a_private_copy_of_the_committed_aggregate() -> None:
    for group_commit in (False, True):
        svc = _service(group_commit)
        user_id, _ = svc.register("reader").value
        svc.grant_credits(user_id, 5, "promo")
        copy = svc.executor.read(user_id)
        assert isinstance(copy, User) and copy.granted == 50 + 5
        copy.grant(100, "not saved", StepClock().now())  # changes the copy only
        assert svc.get_user(user_id).granted == 50 + 5
        assert svc.executor.read(Ids().new_id()) is None
        if group_commit:
            svc.executor.stop()  # type: ignore[attr-defined]


def test_a_read_queued_with_a_write_sees_the_state_before_that_batch_and_never_a_phantom() -> None:
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    user_id, _ = svc.register("batch").value
    release, first = _hold_writer(committer)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(committer.read(user_id).granted))  # type: ignore[union-attr]
    reader.start()
    wait_until(lambda: committer._queue.qsize() == 1, 10, "the read queued")  # before the write

    def grant(uow):  # type: ignore[no-untyped-def]
        uow.get(User, user_id).grant(7, "x", StepClock().now())

    write = committer.submit(grant)
    release.set()
    first.result()
    write.result()
    reader.join(10)
    assert seen == [50]  # served before the batch's write ran
    assert svc.get_user(user_id).granted == 57  # a read after the write sees it
    committer.stop()


def test_the_generic_loader_returns_only_newer_events_per_stream() -> None:
    svc = _service(group_commit=False)
    a, _ = svc.register("a").value
    b, _ = svc.register("b").value
    svc.grant_credits(a, 1, "x")
    loader = RecorderStreamLoader(svc.app.recorder)
    a_versions = [e.originator_version for e in svc.app.recorder.select_events(a)]
    b_versions = [e.originator_version for e in svc.app.recorder.select_events(b)]
    got = [(e.originator_id, e.originator_version) for e in loader.newer_than({a: 1, b: 0})]
    assert got == [(a, v) for v in a_versions if v > 1] + [(b, v) for v in b_versions]
    assert len(got) == len(a_versions) - 1 + len(b_versions) > len(b_versions)
    assert loader.newer_than({}) == []


def test_application_runs_no_sql() -> None:
    """Stream loading is behind application.ports.StreamLoader; the SQL is in adapters.pg_streams."""
    for path in sorted((ROOT / "application").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("psycopg", "psycopg_pool") for n in names), path


def test_coroutines_waiting_on_the_group_committer_hold_no_thread_and_all_get_their_outcome() -> None:
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    user_id, _ = svc.register("async").value
    waiting = 300
    all_queued = threading.Event()
    threads_while_waiting: list[int] = []

    def grant(amount: int):  # type: ignore[no-untyped-def]
        @touches(user_id)
        def command(uow):  # type: ignore[no-untyped-def]
            if all_queued.is_set() and not threads_while_waiting:
                threads_while_waiting.append(threading.active_count())
            uow.get(User, user_id).grant(amount, "async", StepClock().now())
            return amount
        return command

    # The writer holds before anything else is queued (every coroutine below queues behind it): had
    # it woken late, it would have taken the grants queued so far as one batch with its first
    # command, and the queue would never fill.
    gate, blocked = _hold_writer(committer)

    async def main() -> tuple[list[int], int]:
        grants = [asyncio.ensure_future(committer.execute_async(grant(i))) for i in range(1, waiting + 1)]
        read = asyncio.ensure_future(svc.get_user_async(user_id))
        deadline = time.monotonic() + 10
        while committer._queue.qsize() < waiting + 1:
            assert time.monotonic() < deadline, committer._queue.qsize()
            await asyncio.sleep(0)  # let every task reach the queue
        all_queued.set()
        gate.set()
        blocked.result()
        return [c.value for c in await asyncio.gather(*grants)], (await read).credits

    threads_before = threading.active_count()
    try:
        granted, credits_read = asyncio.run(main())
    finally:
        gate.set()
    assert granted == list(range(1, waiting + 1))
    assert credits_read == 50  # the read queued with the grants sees the state before their batch
    assert svc.get_user(user_id).credits == 50 + sum(range(1, waiting + 1))
    assert threads_while_waiting == [threads_before]  # no thread per waiting coroutine
    assert committer.batches < waiting  # they were batched
    committer.stop()


def test_an_async_read_refuses_a_missing_aggregate_and_another_users_job() -> None:
    svc = _service(group_commit=True)
    owner, _ = svc.register("owner").value
    stranger, _ = svc.register("stranger").value
    job_id = svc.create_job(owner, "interior", 1).value

    async def main() -> None:
        assert (await svc.get_job_async(owner, job_id)).id == job_id
        for call in (svc.get_job_async(stranger, job_id), svc.get_user_async(Ids().new_id())):
            with pytest.raises(NotFound):
                await call

    asyncio.run(main())
    svc.executor.stop()  # type: ignore[attr-defined]


def test_the_naive_executor_runs_coroutines_commands_too() -> None:
    svc = _service(group_commit=False)

    async def main() -> tuple[UUID, bool]:
        committed = await svc.run(svc.register_command("naive-async"))
        value: tuple[UUID, bool] = committed.value
        return value

    user_id, created = asyncio.run(main())
    assert created and svc.get_user(user_id).credits == 50


def test_the_events_a_command_records_carry_the_trace_of_the_request_that_sent_it() -> None:
    """Group commit runs the command on its writer thread: the trace goes along with the command,
    onto its own events only (a batch mixes requests), and out in the relay's envelope."""
    from application.executors import CURRENT_TRACE
    from projections.stored_events import from_notification

    traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for group_commit in (False, True):
        svc = _service(group_commit)
        token = CURRENT_TRACE.set(traced)
        try:
            user_id, _ = svc.register(f"traced-{group_commit}").value
        finally:
            CURRENT_TRACE.reset(token)
        svc.grant_credits(user_id, 5, "untraced")
        log = svc.app.recorder.select_notifications(start=1, limit=100)
        traces = {from_notification(n, svc.app.mapper.transcoder).type: from_notification(
            n, svc.app.mapper.transcoder).trace for n in log}
        assert traces["Registered"] == traced and traces["CreditsGranted"] == ""
        assert svc.get_user(user_id).granted == 55  # the stamped events fold as before
        if group_commit:
            svc.executor.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_result_for_an_id_that_holds_a_user_or_a_rule_is_not_found_and_spoils_no_batch(group_commit: bool) -> None:
    """The callback's job id is whatever its sender wrote: a user's or a rule's id is a 404 like
    any other, not a bug (the group committer looked for the job's owner on a user: a 500)."""
    svc = _service(group_commit)
    user_id, _ = svc.register("owner").value
    rule_id = svc.create_rule(user_id, "r", "interior", {"wall": {"action": "recolor", "value": "#336699"}}).value
    try:
        for wrong in (user_id, rule_id):
            with pytest.raises(NotFound):
                svc.record_item_result(wrong, 0, "done", "key-1")
        assert svc.get_user(user_id).credits == 50
    finally:
        if group_commit:
            svc.executor.stop()  # type: ignore[attr-defined]


def test_stopping_while_commands_arrive_leaves_no_caller_and_no_stop_waiting_forever() -> None:
    """A command that comes as the writer stops is served, by it or by the writer it starts once
    the stopping one has ended (never two at once: they share the cache); and stop returns: a
    stopping writer's marker is never taken by the writer that follows it."""
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    user_id, _ = svc.register("stopping").value
    ended, guard = threading.Event(), threading.Lock()
    answers: list[list[int]] = [[], [], []]
    running, overlaps, failures = [0], [], []

    def read(uow):  # type: ignore[no-untyped-def]
        with guard:
            running[0] += 1
            if running[0] > 1:
                overlaps.append(threading.current_thread().name)
        granted = uow.get(User, user_id).granted
        threading.Event().wait(0.0002)  # a command that takes a while: a second writer would run beside it
        with guard:
            running[0] -= 1
        return granted

    def arrive(answered: list[int]) -> None:  # a caller at a time, as a request waits for its answer
        try:
            while not ended.is_set():
                answered.append(committer.submit(read).result(timeout=10).value)
        except BaseException as e:  # noqa: BLE001 - asserted below
            failures.append(e)

    callers = [threading.Thread(target=arrive, args=(a,), daemon=True) for a in answers]
    for caller in callers:
        caller.start()
    try:
        for _ in range(300):
            stopping = threading.Thread(target=committer.stop, daemon=True)
            stopping.start()
            stopping.join(10)
            assert not stopping.is_alive(), "stop waits on a writer that will never end"
    finally:
        ended.set()
        for caller in callers:
            caller.join(15)
    assert not failures and not any(caller.is_alive() for caller in callers), failures
    assert all(a and set(a) == {50} for a in answers)
    assert overlaps == []
    committer.stop()


def test_a_second_stop_returns_once_the_writer_has_ended() -> None:
    """Closing twice at once (two shutdown paths): the second close must not go on to release what
    the writer still uses while it serves the batch the first stop let it finish."""
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    release, served = _hold_writer(committer, timeout=30)
    writer = committer._thread
    assert writer is not None
    first = threading.Thread(target=committer.stop, daemon=True)
    first.start()
    wait_until(lambda: committer._thread is None, 10, "the first stop")  # it has taken the writer
    alive_when_returned: list[bool] = []
    second = threading.Thread(target=lambda: (committer.stop(), alive_when_returned.append(writer.is_alive())),
                              daemon=True)
    second.start()
    second.join(1)  # on the code before, it returned here at once, the writer still holding
    release.set()
    first.join(10)
    second.join(10)
    served.result(timeout=10)
    assert alive_when_returned == [False]


def test_a_queued_command_cannot_be_canceled_so_its_batch_answers_every_caller_and_the_writer_lives_on() -> None:
    """A caller that cancels the future ``submit`` gave it must not take the batch down: the
    command may already be saved with the others, whose callers get their outcome."""
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    user_id, _ = svc.register("cancel").value
    release, first = _hold_writer(committer)

    def grant(uow):  # type: ignore[no-untyped-def]
        uow.get(User, user_id).grant(1, "x", StepClock().now())

    before, canceled, after = (committer.submit(grant) for _ in range(3))
    assert not canceled.cancel()  # queued, so as good as running: it will run
    release.set()
    first.result(10)
    for future in (before, canceled, after):
        assert future.result(10).position is not None  # each saved, and told so
    assert svc.get_user(user_id).granted == 50 + 3
    assert committer.read(user_id) is not None  # the writer still serves
    committer.stop()


def _racing_grant(user_id: UUID, elsewhere: PaletteService, races: int, tries: list[int]):  # type: ignore[no-untyped-def]
    """A grant of 10 that, the first ``races`` times it is decided, lets another process save a
    grant of 1 on the same user first (so this save conflicts); ``tries`` gets each try's version."""

    @touches(user_id)
    def command(uow):  # type: ignore[no-untyped-def]
        user = uow.get(User, user_id)
        tries.append(user.version)
        if len(tries) <= races:
            elsewhere.grant_credits(user_id, 1, "elsewhere")
        user.grant(10, "here", StepClock().now())
        return len(tries)

    return command


def _folded(app: Application[UUID], stream_id: UUID) -> Any:
    aggregate = None
    for stored in app.recorder.select_events(stream_id):
        aggregate = app.mapper.to_domain_event(stored).mutate(aggregate)
    return aggregate


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_command_that_loses_a_race_with_another_process_is_decided_again_on_the_stored_state(
        group_commit: bool) -> None:
    """The other process's grant lands between this command's load and its save. The loser
    reloads and decides again; what it answers afterwards (and what a cold load from the
    snapshot taken at that version gives) is the store's own fold, never what the lost try
    decided (a snapshot every 3 events: the lost try reached one)."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    runs = GroupCommitter(app, snapshot_every={User: 3}) if group_commit else DirectExecutor(app)
    svc = PaletteService(app, runs, StepClock(), Ids(), **process_keys())
    elsewhere = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("racing").value  # version 2
    svc.get_user(user_id)  # cached here at version 2
    tries: list[int] = []
    assert svc.executor.execute(_racing_grant(user_id, elsewhere, 1, tries)).value == 2
    assert tries == [2, 3]  # decided again on the other process's event
    whole = _folded(app, user_id)
    assert whole.granted == 50 + 1 + 10
    assert svc.get_user(user_id).granted == whole.granted
    if group_commit:
        svc.executor.stop()  # type: ignore[attr-defined]
        cold = GroupCommitter(app).start()  # loads from the newest snapshot
        assert vars(cold.read(user_id)) == {**vars(whole), "_pending_events": []}
        cold.stop()


def test_a_batch_is_decided_again_up_to_max_attempts_times_and_then_refused() -> None:
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    committer = GroupCommitter(app, max_attempts=3)
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    elsewhere = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("contended").value
    tries: list[int] = []
    assert committer.execute(_racing_grant(user_id, elsewhere, 2, tries)).value == 3  # the third try wins
    tries.clear()
    with pytest.raises(ConflictError):
        committer.execute(_racing_grant(user_id, elsewhere, 3, tries))
    assert len(tries) == 3 and committer.conflicts == 2 + 3
    assert svc.get_user(user_id).granted == _folded(app, user_id).granted == 50 + 10 + 5 * 1
    committer.stop()


def test_a_stream_another_process_keeps_writing_fails_only_the_commands_on_it_not_their_batch() -> None:
    """Another API process saves to one user's stream before each save of a batch that holds a
    command on it (a client hammering its own account through both processes): that command
    loses every race, but the commands on other users' streams saved with it in the batch are
    not refused with it (they were: CONFLICT for all, after max_attempts)."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    committer = GroupCommitter(app, max_attempts=3)
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    elsewhere = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    hot, _ = svc.register("hot").value
    others = [svc.register(f"other-{i}").value[0] for i in range(5)]
    release, served = _hold_writer(committer)
    tries: list[int] = []
    contended = committer.submit(_racing_grant(hot, elsewhere, 1_000, tries))
    innocent = [committer.submit(svc.grant_credits_command(u, 7, "promo")) for u in others]
    release.set()
    served.result(10)
    assert [f.result(10).value for f in innocent] == [50 + 7] * 5
    with pytest.raises(ConflictError):
        contended.result(10)
    assert len(tries) == 3  # max_attempts in all: its part decided apart counts on from the batch's tries
    assert [svc.get_user(u).granted for u in others] == [_folded(app, u).granted for u in others] == [57] * 5
    assert svc.get_user(hot).granted == _folded(app, hot).granted == 50 + len(tries)  # each lost try's grant elsewhere
    committer.stop()


def test_a_batch_holds_at_most_max_batch_commands() -> None:
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    committer = GroupCommitter(app, max_batch=3)
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("batched").value
    sizes: list[int] = []
    committer.observe_batch = sizes.append
    release, held = _hold_writer(committer)

    def grant(uow):  # type: ignore[no-untyped-def]
        uow.get(User, user_id).grant(1, "x", StepClock().now())

    futures = [committer.submit(grant) for _ in range(7)]  # queued behind the held command
    release.set()
    held.result(10)
    for f in futures:
        f.result(10)
    assert sizes == [1, 3, 3, 1]
    committer.stop()


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_commands_position_is_where_its_last_event_landed(group_commit: bool) -> None:
    """A reader waiting on a projection for this position must see every event the command
    recorded (a registration records two)."""
    svc = _service(group_commit)
    committed = svc.register("positioned")
    assert committed.position == svc.app.recorder.max_notification_id() == 2
    if group_commit:
        svc.executor.stop()  # type: ignore[attr-defined]


def test_the_writer_cache_holds_at_most_its_bound_dropping_the_least_recently_saved() -> None:
    """What the cache holds shows in what it asks the loader for: a cached stream from its
    version, a dropped one from the start (0)."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    a, b, c = (User.register(f"hmac-sha256:{n}", DEFAULT_PLANS["free"], StepClock().now()) for n in range(3))
    app.save(a, b, c)
    asked: list[dict[UUID, int]] = []

    class Asked(RecorderStreamLoader):
        def since_snapshots(self, versions):  # type: ignore[no-untyped-def]
            asked.append(dict(versions))
            return super().since_snapshots(versions)

    cache = WriterCache(app, Asked(app.recorder), maxsize=2)
    cache.keep([a, b])
    cache.keep([a])  # b is now the least recently saved
    cache.keep([c])
    loaded = cache.load([a.id, b.id, c.id])
    assert asked == [{a.id: a.version, b.id: 0, c.id: c.version}]
    assert all(loaded[x.id].version == x.version for x in (a, b, c))


def test_a_database_away_fails_the_writer_cache_load_without_asking_it_again_for_the_events() -> None:
    """A snapshot that cannot be read costs only the shortcut (the events are read instead), but a
    database that does not answer is no snapshot's fault: asking it again would make every batch
    wait out the pool twice before it fails."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    user = User.register("hmac-sha256:away", DEFAULT_PLANS["free"], StepClock().now())
    app.save(user)
    asked_for_events: list[dict[UUID, int]] = []

    class Away(RecorderStreamLoader):
        def since_snapshots(self, versions):  # type: ignore[no-untyped-def]
            raise OperationalError("connection refused")

        def newer_than(self, versions):  # type: ignore[no-untyped-def]
            asked_for_events.append(dict(versions))
            return super().newer_than(versions)

    with pytest.raises(OperationalError):
        WriterCache(app, Away(app.recorder)).load([user.id])
    assert asked_for_events == []


def _allocated(make: Callable[[], T]) -> tuple[T, int]:
    """What ``make`` returns, and the bytes it allocated that are still held (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        gc.collect()
        return made, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _held_bytes(obj: Any) -> int:
    """What a deep copy of ``obj`` allocates: what the object holds."""
    return _allocated(lambda: deepcopy(obj))[1]


def _with_results(job: Job, count: int, at: datetime) -> Job:
    """``job`` confirmed and executed, with ``count`` results recorded."""
    job.confirm_upload(at)
    job.execute({"wall": {"action": "tone", "value": "warm"}}, [], None, at)
    for i in range(count):
        where = f"{job.user_id}/{job.id}/{i}"
        job.record_result(i, "done", f"outputs/{where}.png", f"previews/{where}.jpg", "", f"{job.id}:{i}", at)
    return job


def test_the_writer_cache_weighs_jobs_by_their_results_and_drops_the_least_recently_saved_past_its_bytes() -> None:
    """A job holding results weighs what it holds (a 200-result job is ~0.14 MB: 20,000 of them,
    all the count allowed, would hold ~2.8 GB); past ``max_bytes`` the least recently saved go, and
    what the cache says it holds is what it holds, through keeps, re-keeps and evictions."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    at = StepClock().now()
    jobs = [Job.create(uuid4(), uuid4(), "interior", 200, at) for _ in range(4)]
    big, small = jobs[:3], jobs[3]
    for job in big:
        _with_results(job, 150, at)
    for job in (small, big[0]):  # the weight is what it holds, within a factor of 2 either way
        assert 0.5 < approx_bytes(job) / _held_bytes(job) < 2, (approx_bytes(job), _held_bytes(job))
    budget = 2 * approx_bytes(big[0]) + approx_bytes(small)
    cache = WriterCache(app, RecorderStreamLoader(app.recorder), maxsize=100, max_bytes=budget)
    cache.keep([small, big[0], big[1]])  # the budget, exactly
    assert cache.held_bytes == budget
    cache.keep([small])  # big[0] is now the least recently saved
    cache.keep([big[2]])  # over the bytes by one big job: big[0] goes
    assert list(cache._cache) == [big[1].id, small.id, big[2].id] and cache.held_bytes == budget
    cache.evict([big[2].id, big[0].id])  # one held, one not
    assert list(cache._cache) == [big[1].id, small.id] and cache.held_bytes == budget - approx_bytes(big[2])


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_command_that_refuses_after_recording_saves_nothing_and_fails_as_a_bug(group_commit: bool) -> None:
    """A refusal promises that nothing was recorded: one raised after the command recorded events
    is a bug in that command, answered as one, and its events are never saved (alone or in a batch)."""
    svc = _service(group_commit)
    user_id, _ = svc.register("half-done").value

    @touches(user_id)
    def grants_then_refuses(uow):  # type: ignore[no-untyped-def]
        uow.get(User, user_id).grant(7, "half", svc.clock.now())
        raise ValidationFailed("refused after recording")

    try:
        before = svc.app.recorder.max_notification_id()
        with pytest.raises(Exception) as raised:
            svc.executor.execute(grants_then_refuses)
        assert not isinstance(raised.value, ValidationFailed)
        assert "refused after recording events" in str(raised.value)
        assert svc.app.recorder.max_notification_id() == before
        assert svc.get_user(user_id).granted == 50
    finally:
        if group_commit:
            svc.executor.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize("group_commit", [True, False])
def test_committed_says_whether_its_own_command_recorded_events_not_its_batch(group_commit: bool) -> None:
    """The routes log a job's deletion and spend an address's day only for a command that
    recorded something: a repeat batched with the deletion that did was told the batch's saved
    versions, and logged a deletion that never happened."""
    svc = _service(group_commit=group_commit)
    if group_commit:
        svc.executor.start()
    try:
        user_id, _ = svc.register("dev").value
        job_id = svc.create_job(user_id, "interior", 1).value
        svc.cancel_job(user_id, job_id)
        if group_commit:
            release, _ = _hold_writer(svc.executor)
            first = svc.executor.submit(svc.delete_job_command(user_id, job_id))
            again = svc.executor.submit(svc.delete_job_command(user_id, job_id))  # in the same batch
            release.set()
            done, repeat = first.result(10), again.result(10)
            assert job_id in repeat.versions  # the batch's: why the routes cannot read it
        else:
            done = svc.executor.execute(svc.delete_job_command(user_id, job_id))
            repeat = svc.executor.execute(svc.delete_job_command(user_id, job_id))
        assert (done.value, done.recorded) == (True, True)
        assert (repeat.value, repeat.recorded) == (False, False)
    finally:
        if group_commit:
            svc.executor.stop()


def test_what_a_command_recorded_counts_from_its_first_read_of_each_aggregate():
    """A command that reads an aggregate again after recording on it still recorded: the second
    read must not take the aggregate's pending events as its new starting point (the address's
    budget token would come back for a command that saved an event, and ``stamp`` would leave
    that event without the request's trace)."""
    from datetime import UTC, datetime

    from application.unit_of_work import UnitOfWork

    at = datetime(2026, 1, 1, tzinfo=UTC)
    user = User.register("hmac-sha256:" + "a" * 64, DEFAULT_PLANS["free"], at)
    user.collect_events()  # as loaded: nothing pending
    uow = UnitOfWork(lambda _id: user)
    uow.begin_command()
    first = uow.get(User, user.id)
    assert first is not None and not uow.command_recorded()
    first.grant(5, "support", at)
    assert uow.get(User, user.id) is first  # read again after recording
    assert uow.command_recorded()
    uow.stamp("trace_id", "t-1")
    assert [getattr(e, "trace_id", None) for e in user.pending_events] == ["t-1"]
    uow.begin_command()  # the next command starts from what the last one left
    uow.get(User, user.id)
    assert not uow.command_recorded()


class _Monotonic:
    """The committer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _timed(device: str) -> tuple[_Monotonic, PaletteService, GroupCommitter, UUID]:
    """A service on a group committer whose monotonic clock the test moves, and a user of it."""
    clock = _Monotonic()
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    committer = GroupCommitter(app, monotonic=clock)
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    return clock, svc, committer, svc.register(device).value[0]


def test_a_command_that_waited_past_the_commit_lag_bound_is_refused_unrun_and_a_read_still_served() -> None:
    """Readers of the log find a time by position and look only TIME_SLACK_S past it, so no event
    may commit more than COMMIT_LAG_MAX_S after it was stamped: a command queued longer is refused
    (as a database away is, so its caller retries, stamped anew) and records nothing."""
    from application.executors import TRANSIENT, WrittenTooLate
    from domain.contracts.streams import COMMIT_LAG_MAX_S, TIME_SLACK_S

    assert COMMIT_LAG_MAX_S < TIME_SLACK_S
    clock, svc, committer, user_id = _timed("waited")
    release, held = _hold_writer(committer)
    late = committer.submit(svc.grant_credits_command(user_id, 7, "promo"))
    copies: list[Any] = []
    reader = threading.Thread(target=lambda: copies.append(committer.read(user_id)))
    reader.start()
    wait_until(lambda: committer._queue.qsize() == 2, what="the read to be queued behind the late command")
    clock.now += COMMIT_LAG_MAX_S + 0.1
    in_time = committer.submit(svc.grant_credits_command(user_id, 3, "promo"))  # queued now: in time
    release.set()
    with pytest.raises(WrittenTooLate):  # the holding command too: the bound passed while it was decided
        held.result(10)
    with pytest.raises(WrittenTooLate, match="try again"):
        late.result(10)
    assert isinstance(WrittenTooLate("x"), TRANSIENT)  # every caller that waits out a database away retries it
    assert in_time.result(10).value == 50 + 3
    reader.join(10)
    assert [c.granted for c in copies] == [50]  # a read stamps nothing: served whatever it waited
    assert committer.written_too_late == 2
    assert svc.executor.read(user_id).granted == 50 + 3  # type: ignore[union-attr]  # the late grant recorded nothing
    committer.stop()


def test_a_command_queued_within_the_bound_runs() -> None:
    from domain.contracts.streams import COMMIT_LAG_MAX_S

    clock, svc, committer, user_id = _timed("prompt")
    release, held = _hold_writer(committer)
    waiting = committer.submit(svc.grant_credits_command(user_id, 7, "promo"))
    clock.now += COMMIT_LAG_MAX_S  # exactly the bound: still in time
    release.set()
    held.result(10)
    assert waiting.result(10).value == 50 + 7 and committer.written_too_late == 0
    committer.stop()


def test_a_command_decided_again_after_a_conflict_is_refused_once_past_the_bound() -> None:
    """The bound is checked at each attempt: a conflict's reload and backoff take time too."""
    from eventsourcing.persistence import IntegrityError

    from application.executors import WrittenTooLate
    from domain.contracts.streams import COMMIT_LAG_MAX_S

    clock, svc, committer, user_id = _timed("conflicted")
    save, saves = svc.app.save, []

    def lost_to_another_process(*aggregates: Any, **kw: Any) -> Any:
        saves.append(1)
        if len(saves) == 1:  # another process wrote the stream first; nothing of ours stored
            clock.now += COMMIT_LAG_MAX_S + 1
            raise IntegrityError("duplicate key value violates unique constraint")
        return save(*aggregates, **kw)

    svc.app.save = lost_to_another_process  # type: ignore[method-assign]
    with pytest.raises(WrittenTooLate):
        committer.submit(svc.grant_credits_command(user_id, 7, "promo")).result(10)
    svc.app.save = save  # type: ignore[method-assign]
    assert svc.executor.read(user_id).granted == 50  # type: ignore[union-attr]
    committer.stop()


def test_a_command_whose_deciding_outlasts_the_bound_is_refused_and_the_rest_of_its_batch_saved() -> None:
    """The bound is checked again before the save: a decision that took the time leaves nothing
    written, and the batch's other commands are decided again and saved."""
    from application.executors import WrittenTooLate
    from domain.contracts.streams import COMMIT_LAG_MAX_S

    clock, svc, committer, user_id = _timed("slow-decider")
    head = svc.app.recorder.max_notification_id()
    release, held = _hold_writer(committer)
    slow_grant = svc.grant_credits_command(user_id, 7, "promo")
    decided: list[str] = []

    @touches(user_id)
    def slow(uow):  # type: ignore[no-untyped-def]
        decided.append("slow")
        slow_grant(uow)
        clock.now += 1.5  # deciding took the time: past the bound for it, not for the one queued later

    refused = committer.submit(slow)
    clock.now += COMMIT_LAG_MAX_S - 1
    kept = committer.submit(svc.grant_credits_command(user_id, 3, "promo"))
    release.set()
    held.result(10)
    with pytest.raises(WrittenTooLate):
        refused.result(10)
    assert kept.result(10).value == 50 + 3  # decided again without the late one, and saved
    assert decided == ["slow"]
    assert svc.app.recorder.max_notification_id() == head + 1  # one grant's event, not two
    committer.stop()


def _losing(group_commit: bool, *, stores: bool, retried: bool = False,
            ) -> tuple[Application[UUID], PaletteService, AnswerLost, UUID]:
    """A service whose next save, once ``AnswerLost`` is armed, fails (``retried``: tried again
    after storing, as eventsourcing's retry does, meeting its own events)."""
    svc = _service(group_commit)
    user_id, _ = svc.register("losing").value
    return svc.app, svc, AnswerLost(svc.app.recorder, stores=stores, retried=retried), user_id


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_save_stored_before_its_answer_was_lost_is_answered_as_saved_once(group_commit: bool) -> None:
    app, svc, lost, user_id = _losing(group_commit, stores=True)
    lost.armed = True
    assert svc.grant_credits(user_id, 7, "support").value == 50 + 7
    assert not lost.armed  # the answer was lost indeed
    assert _folded(app, user_id).granted == svc.get_user(user_id).granted == 50 + 7
    assert svc.grant_credits(user_id, 1, "next").value == 50 + 7 + 1  # and the cache is the store's


@pytest.mark.parametrize("group_commit", [False, True])
def test_a_save_that_failed_unstored_raises_the_databases_error_and_the_next_command_runs(group_commit: bool) -> None:
    app, svc, lost, user_id = _losing(group_commit, stores=False)
    lost.armed = True
    with pytest.raises(OperationalError):
        svc.grant_credits(user_id, 7, "support")
    assert _folded(app, user_id).granted == svc.get_user(user_id).granted == 50
    assert svc.grant_credits(user_id, 1, "next").value == 50 + 1


@pytest.mark.parametrize("group_commit", [False, True])
@pytest.mark.parametrize("retried", [False, True], ids=["answer lost", "retried: a conflict"])
@pytest.mark.parametrize("check_error", [OperationalError("the database went away"), DatabaseError("strange")],
                         ids=["database away", "another error"])
def test_a_lost_answer_that_cannot_be_checked_is_a_database_error_never_decided_again(
        group_commit: bool, retried: bool, check_error: Exception) -> None:
    """Stored, but the store cannot be read to tell, for whatever reason: the outcome is unknown,
    so the caller gets a database error (a 503: try again) and the grant is not made twice (a
    conflict decided again, or a batch run again one command at a time, would make it twice)."""
    app, svc, lost, user_id = _losing(group_commit, stores=True, retried=retried)
    loader = svc.executor.cache.loader if group_commit else svc.executor.loader  # type: ignore[attr-defined]
    newer_than = loader.newer_than

    def unreadable(versions: Any) -> Any:
        if lost.armed:  # before the save: read as usual
            return newer_than(versions)
        loader.newer_than = newer_than  # the check after it fails, once
        raise check_error

    lost.armed = True
    loader.newer_than = unreadable
    with pytest.raises(OperationalError):
        svc.grant_credits(user_id, 7, "support")
    assert _folded(app, user_id).granted == svc.get_user(user_id).granted == 50 + 7


@pytest.mark.parametrize("group_commit", [False, True])
@pytest.mark.parametrize("stored_states", ["enciphered", "compressed"])
def test_a_lost_answer_is_told_from_a_conflict_when_stored_states_are_enciphered_or_compressed(
        group_commit: bool, stored_states: str) -> None:
    """A cipher's nonce is new each time it enciphers: the save's own events, enciphered again for
    the check, differ from the stored bytes, so the states are compared as the transcoder wrote
    them (deciphered, decompressed); else the retry's conflict was decided again (granted twice)."""
    from eventsourcing.cryptography import AESCipher

    extra = ({"CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher", "CIPHER_KEY": AESCipher.create_key(16)}
             if stored_states == "enciphered" else {"COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor"})
    svc = _service(group_commit, **extra)
    app = svc.app
    user_id, _ = svc.register("enciphered").value
    lost = AnswerLost(app.recorder, retried=True)
    lost.armed = True
    assert svc.grant_credits(user_id, 7, "support").value == 50 + 7
    assert not lost.armed
    assert _folded(app, user_id).granted == svc.get_user(user_id).granted == 50 + 7


def test_the_writer_cache_weighs_a_kept_job_again_when_loading_brings_it_up_to_date() -> None:
    """Loading brings a cached job up to date in place (results another process recorded): what
    the cache says it holds follows, or a process that only reads such jobs holds more than its
    bytes and evicts nothing for it."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    at = StepClock().now()
    job = Job.create(uuid4(), uuid4(), "interior", 200, at)
    app.save(job)
    cache = WriterCache(app, RecorderStreamLoader(app.recorder), maxsize=100)
    kept = cache.fetch_one(job.id)
    assert isinstance(kept, Job)
    cache.keep([kept])
    new = cache.held_bytes
    elsewhere: Job = app.repository.get(job.id)  # another process, its own copy
    app.save(_with_results(elsewhere, 150, at))
    read = cache.fetch_one(job.id)  # a read: brought up to date, never kept again
    assert read is kept and len(kept.items) == 150  # the cached object itself
    assert cache.held_bytes == approx_bytes(kept) > new
    cache.evict([job.id])
    assert cache.held_bytes == 0


def test_a_job_is_weighed_by_the_concepts_it_was_given_too() -> None:
    """A request's concepts and protected names are kept with the job (up to 32 each, a name of
    up to 64 characters): weighed as a job without them, one with them all was counted at a
    twelfth of what it holds. Measured as what making it allocates and keeps, its strings
    included (a deep copy shares those)."""
    at = StepClock().now()

    def given_all() -> Job:
        job = Job.create(uuid4(), uuid4(), "interior", 200, at)
        job.confirm_upload(at)
        job.execute({f"{i:02d}".ljust(64, "c"): {"action": "tone", "value": f"{i:02d}".ljust(32, "v")}
                     for i in range(32)}, [f"{i:02d}".ljust(64, "p") for i in range(32)], None, at)
        return job

    given_all()  # what a first job allocates once (classes' caches) is no part of one
    job, held = _allocated(given_all)
    assert 0.5 < approx_bytes(job) / held < 2, (approx_bytes(job), held)


def test_an_answer_the_writer_gave_as_its_callers_bound_ran_out_is_the_callers() -> None:
    """The writer's answer and the end of the caller's bound in one turn of the loop, the answer
    first: the future held the outcome (a command saved), and the caller was told NotAnswered, a
    503 for a command whose commit had landed."""
    svc = _service(group_commit=True)
    committer = svc.executor
    assert isinstance(committer, GroupCommitter)
    user_id, _ = svc.register("bound").value
    committer.answer_within_s = 0.01
    gate, _ = _hold_writer(committer)

    def grant(uow):  # type: ignore[no-untyped-def]
        uow.get(User, user_id).grant(5, "bound", StepClock().now())
        return "granted"

    def answered_and_bound_run_out() -> None:
        """The loop held while the writer answers and the caller's bound passes."""
        gate.set()
        for _ in range(2):  # the second in a batch after the grant's, whose answers had gone out
            committer.submit(touches(user_id)(lambda uow: None)).result(10)
        time.sleep(2 * committer.answer_within_s)  # the bound itself passing, not a wait on anyone

    async def main() -> str:
        loop = asyncio.get_running_loop()
        granting = asyncio.ensure_future(committer.execute_async(touches(user_id)(grant)))
        loop.call_soon(answered_and_bound_run_out)  # right after the command is queued
        answer: str = (await granting).value
        return answer

    try:
        assert asyncio.run(main()) == "granted"
    finally:
        gate.set()
        committer.stop()
    assert svc.get_user(user_id).credits == 55
