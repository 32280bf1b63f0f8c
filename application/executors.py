"""The two ways to run a command: one save per command (DirectExecutor) and group commit
(GroupCommitter, with the process's one aggregate cache, brought up to date through the
StreamLoader port). Each runs commands for threads (``execute``) and for an event loop
(``execute_async``): a coroutine waiting on the group committer holds no thread."""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

import anyio.to_thread
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, Recorder, StoredEvent

from application.ports import StreamLoader
from application.unit_of_work import Command, Committed, ConflictError, UnitOfWork
from domain.contracts import trace as tracing
from domain.contracts.streams import COMMIT_LAG_MAX_S
from domain.errors import DomainError
from domain.job import Job

log = logging.getLogger(__name__)

T = TypeVar("T")
# The traceparent of the request (or task) being served: the API sets it, and the executors stamp
# it on the events a command records (a command queued to the group committer carries it along).
CURRENT_TRACE: ContextVar[str] = ContextVar("palette_traceparent", default="")

# The database, not a command, failed: the batch's outcome is unknown (the commit may have landed),
# so it is not run again here; every caller gets the error.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, ConnectionError)
# How long a coroutine waits for the writer's answer (NotAnswered): past COMMIT_LAG_MAX_S, so a
# command queued in time is answered unless the database holds its batch.
ANSWER_WITHIN_S = 10.0


class WrittenTooLate(OperationalError):
    """A command was still unsaved COMMIT_LAG_MAX_S after it was queued (a backlog, a database
    that was away, conflicts decided again): refused, as a database that does not answer is, so
    its caller tries again and its events are stamped anew. Nothing of it is saved, unless an
    earlier attempt's commit landed and its answer was lost (as with any database error). Readers
    of the log rely on the bound (TIME_SLACK_S)."""


class NotAnswered(OperationalError):
    """The writer gave no answer within the caller's bound (``answer_within_s``): a database that
    stopped answering mid-batch (a server frozen, a stalled disk, a network dropping packets)
    holds the writer, and every caller behind it, for as long. Refused as a database that does not
    answer is; the command itself is refused when the writer reaches it (WrittenTooLate: the
    bound is past COMMIT_LAG_MAX_S), unless it is in the batch being saved, whose commit may land
    (as with any lost answer: a retry with its Idempotency-Key is safe)."""


class OutcomeUnknown(OperationalError):
    """A save met a conflict that could not be told from its own lost answer (the store could not
    be read to tell): its commit may have landed, so its commands are not decided again; the
    caller tries again (a 503, as the database not answering is)."""


class RecorderStreamLoader:
    """The StreamLoader port on any eventsourcing recorder, one query per stream (the in-memory
    store of the unit tests; PostgreSQL has adapters.pg_streams.PgStreamLoader, one query in all)."""

    def __init__(self, recorder: Recorder, snapshots: Recorder | None = None) -> None:
        self.recorder: Any = recorder
        self.snapshots: Any = snapshots

    def newer_than(self, versions: Mapping[UUID, int]) -> list[StoredEvent]:
        return [e for i, v in versions.items() for e in self.recorder.select_events(i, gt=v or None)]

    def since_snapshots(self, versions: Mapping[UUID, int]) -> tuple[list[StoredEvent], list[StoredEvent]]:
        if self.snapshots is None:
            return [], self.newer_than(versions)
        snapshots = []
        for i, v in versions.items():  # the newest one the stream has an event of its version for
            for snapshot in self.snapshots.select_events(i, gt=v or None, desc=True):
                if self.recorder.select_events(i, gt=snapshot.originator_version - 1,
                                               lte=snapshot.originator_version):
                    snapshots.append(snapshot)
                    break
        past = {s.originator_id: s.originator_version - 1 for s in snapshots}  # its event too
        return snapshots, self.newer_than({i: past.get(i, v) for i, v in versions.items()})


def snapshot_recorder(app: Application[UUID]) -> Recorder | None:
    """Where ``app`` keeps its snapshots (None: it keeps none)."""
    return app.snapshots.recorder if app.snapshots is not None else None


AGGREGATE_BYTES = 1_500  # about what a user, a rule or a new job holds in memory (tracemalloc)


def approx_bytes(agg: Aggregate) -> int:
    """About what ``agg`` holds in memory. A job grows: ~0.4 KB more each concept it was given and
    ~0.1 KB each protected name (names of up to 64 characters: 18 KB with 32 of each), ~0.7 KB
    each result it keeps with its keys (tracemalloc: 0.1 MB with 150 results)."""
    if isinstance(agg, Job):
        return AGGREGATE_BYTES + 400 * len(agg.concepts) + 120 * len(agg.protect) + 700 * len(agg.items)
    return AGGREGATE_BYTES


class WriterCache:
    """The process's aggregates: as the writer last saved them, brought up to date with ONE
    loader call per batch (new events of every aggregate the batch declares). Owned by the
    writer thread alone, so no copies: a failed save or a broken command evicts what it touched;
    readers get copies through the writer (GroupCommitter.read).

    At most ``maxsize`` aggregates and about ``max_bytes`` (``approx_bytes``, weighed as each is
    kept, and again when loading brings it up to date in place), the least recently saved out
    first: a job holding 200 results is ~0.14 MB, so 20,000 of them, all the count allowed, would
    hold ~2.8 GB in one API process (reckoned from that size, not measured whole)."""

    def __init__(self, app: Application[UUID], loader: StreamLoader, maxsize: int = 20_000,
                 max_bytes: int = 64 << 20) -> None:
        self.app = app
        self.loader = loader
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._cache: OrderedDict[UUID, Aggregate] = OrderedDict()
        self._bytes: dict[UUID, int] = {}  # each kept aggregate's weight when last weighed
        self.held_bytes = 0

    def load(self, ids: set[UUID] | list[UUID]) -> dict[UUID, Aggregate | None]:
        if not ids:
            return {}
        out: dict[UUID, Aggregate | None] = {i: self._cache.get(i) for i in ids}
        versions = {i: (agg.version if agg is not None else 0) for i, agg in out.items()}
        try:
            snapshots, events = self.loader.since_snapshots(versions)
        except TRANSIENT:  # the database, not the snapshots: the events would wait for it as long
            raise
        except Exception as e:  # noqa: BLE001 - the snapshots' table gone, say: read the events alone
            log.warning("loading from snapshots failed (%s: %s): reading the events", type(e).__name__, e)
            snapshots, events = [], self.loader.newer_than(versions)
        # Each snapshot's own event, which it must agree with (not applied: the snapshot holds it).
        at = {(s.originator_id, s.originator_version) for s in snapshots}
        backing = {(e.originator_id, e.originator_version): e for e in events
                   if (e.originator_id, e.originator_version) in at}
        events = [e for e in events if (e.originator_id, e.originator_version) not in backing]
        unreadable: set[UUID] = set()
        for stored in snapshots:  # each newer than what the cache holds, if anything
            restored = self._restore(stored, backing.get((stored.originator_id, stored.originator_version)))
            if restored is not None:
                out[restored.id] = restored
            else:
                unreadable.add(UUID(str(stored.originator_id)))
        if unreadable:  # those streams' events from where the cache was
            events = [e for e in events if e.originator_id not in unreadable]
            events += self.loader.newer_than({i: versions[i] for i in unreadable})
        grown: set[UUID] = set()
        for stored in events:
            event: Any = self.app.mapper.to_domain_event(stored)
            out[event.originator_id] = event.mutate(out[event.originator_id])
            grown.add(event.originator_id)
        for i in grown:  # a cached one brought up to date in place (another process wrote to it)
            if (agg := out[i]) is not None and self._cache.get(i) is agg:
                self._weigh(agg)
        return out

    def _restore(self, stored: StoredEvent, its_event: StoredEvent | None) -> Aggregate | None:
        """The aggregate a snapshot holds; None (its events are read instead) when it cannot be
        read, or is not of the stream's history: the aggregate it holds was last changed at
        another time than the stream's event of its version says (``its_event``; a store
        restored behind its snapshots, then written again up to their versions). A snapshot is a
        shortcut, never the only copy of anything."""
        try:
            aggregate: Aggregate = self.app.mapper.to_domain_event(stored).mutate(None)  # type: ignore[attr-defined]
            if its_event is None:
                raise LookupError("the stream has no event of its version")
            changed_at = self.app.mapper.to_domain_event(its_event).timestamp  # type: ignore[attr-defined]
            if aggregate.modified_on != changed_at:
                raise ValueError(f"not of the stream's history: last changed at {aggregate.modified_on}, "
                                 f"the stream's event of its version at {changed_at}")
        except Exception as e:  # noqa: BLE001 - a class changed without its upcast, bytes damaged
            log.warning("the snapshot of %s at version %d cannot be read (%s: %s): reading its events",
                        stored.originator_id, stored.originator_version, type(e).__name__, e)
            return None
        return aggregate

    def fetch_one(self, aggregate_id: UUID) -> Aggregate | None:
        return self.load([aggregate_id])[aggregate_id]

    def keep(self, aggregates: list[Aggregate]) -> None:
        for agg in aggregates:
            self._weigh(agg)
            self._cache[agg.id] = agg
            self._cache.move_to_end(agg.id)
        while len(self._cache) > self.maxsize or (self.held_bytes > self.max_bytes and len(self._cache) > 1):
            oldest, _ = self._cache.popitem(last=False)
            self.held_bytes -= self._bytes.pop(oldest)

    def _weigh(self, agg: Aggregate) -> None:
        """Count ``agg`` at what it holds now, in place of what it held when last weighed."""
        self.held_bytes += (size := approx_bytes(agg)) - self._bytes.get(agg.id, 0)
        self._bytes[agg.id] = size

    def evict(self, ids: list[UUID]) -> None:
        for i in ids:
            if self._cache.pop(i, None) is not None:
                self.held_bytes -= self._bytes.pop(i)


class _CommandBug(Exception):
    """A command raised something other than a domain refusal, or refused after recording."""


def _run_one(uow: UnitOfWork, command: Command[Any], trace: str = "") -> Any:
    """One command in ``uow``; the events it records carry ``trace`` (the caller's request)."""
    uow.begin_command()
    try:
        value = command(uow)
    except DomainError:
        if uow.command_recorded():
            raise _CommandBug("command refused after recording events") from None
        raise
    if trace:
        uow.stamp(tracing.TRACE_KEY, trace)
    return value


def _backoff(attempt: int) -> None:
    # Jitter spreads competing writers apart so the next attempt is likely to win.
    time.sleep(random.uniform(0, 0.002 * 2**attempt))


def _position(recordings: list[Any]) -> int | None:
    ids = [r.notification.id for r in recordings]
    return max(ids) if ids else None


def _save(app: Application[UUID], loader: StreamLoader, changed: list[Aggregate]) -> list[Any]:
    """Save ``changed``: the recordings of its events (none when nothing changed: no transaction
    opened, or when the save was stored but its answer was lost).

    A save whose commit landed and whose answer was lost (the connection broke after the COMMIT)
    is found stored (``_stored_as_decided``) and returns as saved. eventsourcing retries a save
    that failed so, and the retry meets the save's own events as a conflict: deciding its
    commands again would apply them twice (a grant granted twice) or refuse what did happen.
    A failure that cannot be told from that (the store cannot be read to tell, for whatever
    reason) is a database error (``OutcomeUnknown``, or the save's own): the commit may have
    landed, so the commands are not decided again; the caller tries again."""
    if not changed:
        return []
    events = [e for agg in changed for e in agg.pending_events]  # saving collects them
    try:
        return app.save(*changed)
    except IntegrityError:
        try:
            stored = _stored_as_decided(app, loader, events)
        except Exception as e:  # any, as itself, would have the batch decided again (one by one)
            raise OutcomeUnknown(f"a conflict that may be this save's own lost answer could not be told "
                                 f"({type(e).__name__}); try again") from e
        if not stored:
            raise
    except TRANSIENT:
        try:
            stored = _stored_as_decided(app, loader, events)
        except Exception:  # noqa: BLE001 - nor can this be told: the save's error stands
            stored = False
        if not stored:
            raise
    log.warning("a save of %d event(s) lost its answer but is stored: answered as saved", len(events))
    return []


def _stored_as_decided(app: Application[UUID], loader: StreamLoader, events: list[Any]) -> bool:
    """Whether ``events``, whose save failed, are in the store all the same, byte for byte as the
    transcoder wrote them. One transaction stored them, so all are there or none is."""
    before: dict[UUID, int] = {}
    for e in events:
        before.setdefault(e.originator_id, e.originator_version - 1)
    stored = {(s.originator_id, s.originator_version): s for s in loader.newer_than(before)}
    for e in events:
        mine = app.mapper.to_stored_event(e)
        found = stored.get((mine.originator_id, mine.originator_version))
        if found is None or found.topic != mine.topic or not _same_state(app, found.state, mine.state):
            return False
    return True


def _same_state(app: Application[UUID], stored: bytes, mine: bytes) -> bool:
    """Whether two stored states hold the same bytes as the transcoder wrote them: deciphered and
    decompressed first, as a cipher's nonce is new each time it enciphers (the same event
    enciphered twice differs). A state that cannot be deciphered (another key's) is not ours."""
    mapper: Any = app.mapper
    try:
        if mapper.cipher is not None:
            stored, mine = mapper.cipher.decrypt(bytes(stored)), mapper.cipher.decrypt(bytes(mine))
        if mapper.compressor is not None:
            stored, mine = mapper.compressor.decompress(stored), mapper.compressor.decompress(mine)
    except Exception:  # noqa: BLE001 - an AEAD tag that does not verify, damaged bytes
        return False
    return bytes(stored) == bytes(mine)


class DirectExecutor:
    """The naive path: one load-decide-save transaction per command, retried on conflict; no
    cache (every load replays the stream)."""

    def __init__(self, app: Application[UUID], max_attempts: int = 10, loader: StreamLoader | None = None) -> None:
        self.app = app
        self.max_attempts = max_attempts
        # What a save that failed left stored. The recorder's reads retry as its inserts do (ten
        # tries, each up to the pool's timeout): on PostgreSQL the caller gives the one-query
        # loader, which reads again only after a dead pooled connection (never after the pool's
        # wait ran out), so a save that failed while the database is away is not followed by a
        # check as long again.
        self.loader = loader or RecorderStreamLoader(app.recorder)

    def _fetch(self, aggregate_id: UUID) -> Aggregate | None:
        try:
            return self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def read(self, aggregate_id: UUID) -> Aggregate | None:
        return self._fetch(aggregate_id)

    async def read_async(self, aggregate_id: UUID, view: Callable[[Aggregate | None], T]) -> T:
        return await anyio.to_thread.run_sync(lambda: view(self._fetch(aggregate_id)))

    async def execute_async(self, command: Command[T]) -> Committed[T]:
        # The naive path as it is: a worker thread per command for the whole load-decide-save.
        return await anyio.to_thread.run_sync(self.execute, command)

    def execute(self, command: Command[T]) -> Committed[T]:
        for attempt in range(self.max_attempts):
            uow = UnitOfWork(self._fetch)
            try:
                value = _run_one(uow, command, CURRENT_TRACE.get())
            except _CommandBug as e:
                raise RuntimeError(str(e)) from e
            changed = uow.changed()
            try:
                recordings = _save(self.app, self.loader, changed)
            except IntegrityError:
                _backoff(attempt)
                continue
            return Committed(value, _position(recordings), {a.id: a.version for a in changed}, bool(changed))
        raise ConflictError("too much contention on this object; try again")


class _Outcome(Protocol):
    """Where a queued command's outcome goes (a concurrent Future, or a _LoopOutcome)."""

    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class _Outbox:
    """Outcomes for event loops, held by the writer until its batch is done, then handed to each
    loop in ONE call_soon_threadsafe (one wake-up of the loop per batch, not per command)."""

    def __init__(self) -> None:
        self._held: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any, BaseException | None]] = []

    def hold(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
             exception: BaseException | None) -> None:
        self._held.append((loop, future, result, exception))

    def flush(self) -> None:
        held, self._held = self._held, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for loop, future, result, exception in held:
            by_loop.setdefault(loop, []).append((future, result, exception))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                continue


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, exception in outcomes:
        if future.cancelled():  # the request went away while its command ran
            continue
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def _queued_future() -> Future[Any]:
    """A future for a queued command's outcome, already running: ``cancel`` refuses (as for a
    task a thread pool has begun), so the writer can always settle it."""
    future: Future[Any] = Future()
    future.set_running_or_notify_cancel()
    return future


class _LoopOutcome:
    """A command's outcome for a coroutine: an asyncio future of the caller's loop, settled
    through the writer's outbox."""

    __slots__ = ("_done", "future", "loop", "outbox")

    def __init__(self, outbox: _Outbox) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()
        self.outbox = outbox
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._done = True
        self.outbox.hold(self.loop, self.future, result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        self.outbox.hold(self.loop, self.future, None, exception)


@dataclass
class _Pending:
    command: Command[Any]
    future: _Outcome
    read: bool = False  # records nothing: served before the batch changes anything
    trace: str = field(default_factory=CURRENT_TRACE.get)  # the submitting request's, for its events
    queued_at: float = 0.0  # the committer's clock (monotonic) when it was queued


class _Viewing(Generic[T]):
    """A read as a command of the batch: ``view`` of one aggregate (declared, so the batch
    prefetches it). A class, not a closure marked with ``touches``: one is made per read."""

    __slots__ = ("aggregate_ids", "view")
    related_ids = None

    def __init__(self, aggregate_id: UUID, view: Callable[[Aggregate | None], T]) -> None:
        self.aggregate_ids = (aggregate_id,)
        self.view = view

    def __call__(self, uow: UnitOfWork) -> T:
        return self.view(uow.get(Aggregate, self.aggregate_ids[0]))


@dataclass
class _Decided:
    """A batch's commands as decided in one unit of work, in order: each one's outcome (ok and its
    value, or not and the refusal it raised), which recorded events, and what each read or added;
    ``bug``: the command that raised anything else, where deciding stopped (its caller has it)."""

    outcomes: list[tuple[_Pending, bool, Any]] = field(default_factory=list)
    recorded: set[int] = field(default_factory=set)  # the outcomes whose command recorded events
    touched: list[set[UUID]] = field(default_factory=list)  # by outcome: what its command read or added
    bug: _Pending | None = None


def _decide(uow: UnitOfWork, batch: list[_Pending]) -> _Decided:
    """Run the batch's commands in ``uow``, one after another, until one is broken."""
    decided = _Decided()
    for p in batch:
        try:
            decided.outcomes.append((p, True, _run_one(uow, p.command, p.trace)))
            if uow.command_recorded():
                decided.recorded.add(len(decided.outcomes) - 1)
        except DomainError as e:
            decided.outcomes.append((p, False, e))
        except Exception as e:  # noqa: BLE001 - isolate the broken command, redo the rest
            p.future.set_exception(e)
            decided.bug = p
            break
        decided.touched.append(uow.command_touched())
    return decided


class GroupCommitter:
    """Runs queued commands in batches on one writer thread, saving each batch in one transaction.

    Commands for one aggregate apply in arrival order against the same in-memory object, so a
    hot stream sees no conflicts from this process; a conflict with another process reloads and
    decides the batch again, bounded, with jitter: the commands that touched a stream written
    elsewhere meanwhile apart from the rest, which run first, so that a stream another process
    keeps writing fails only the commands on it. A refused command (DomainError) fails
    alone; a command that raises anything else is dropped from the batch, which is then redone;
    a batch whose prefetch or save fails for a reason other than the database runs again one
    command per transaction, so only the command at fault fails. Reads join the next batch and
    get a copy of the aggregate as last committed, before that batch's commands run. A saved
    aggregate whose stream reached a multiple of its ``snapshot_every`` is snapshotted once the
    batch's callers have their answers; loads start from a stream's newest snapshot.
    """

    def __init__(self, app: Application[UUID], loader: StreamLoader | None = None,
                 max_batch: int = 500, max_attempts: int = 10,
                 snapshot_every: Mapping[type[Aggregate], int] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.max_batch = max_batch
        self.max_attempts = max_attempts
        self.monotonic = monotonic  # how long a command waits to be written (COMMIT_LAG_MAX_S)
        self.answer_within_s = ANSWER_WITHIN_S
        self.written_too_late = 0  # commands refused as WrittenTooLate
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()  # each writer makes its own
        self._thread: threading.Thread | None = None
        self._stopping: threading.Thread | None = None  # the writer stop() ended last
        self._lock = threading.Lock()
        self.cache = WriterCache(app, loader or RecorderStreamLoader(app.recorder, snapshot_recorder(app)))
        self._outbox = _Outbox()
        self.batches = 0
        self.commands = 0
        self.conflicts = 0  # batches decided again after another process wrote one of their streams
        self.observe_batch: Callable[[int], None] | None = None  # each saved batch's size (metrics)
        # Streams that get a snapshot, and every how many events (the app's ``snapshot_every`` by
        # default; none where the app keeps no snapshots).
        if snapshot_every is None:
            snapshot_every = getattr(app, "snapshot_every", {})
        self.snapshot_every: Mapping[type[Aggregate], int] = snapshot_every if app.snapshots is not None else {}
        self._snapshot_class: Any = getattr(app, "snapshot_class", None) or Snapshot
        self.snapshots_taken = 0

    def start(self) -> GroupCommitter:
        with self._lock:
            self._start()
        return self

    def _start(self) -> None:
        # Each writer reads a queue of its own: a stopping writer's marker, and the commands queued
        # before it, are never taken by the writer started after it (both would wait forever). It
        # begins once the stopping one has ended: one writer at a time owns the cache and outbox.
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._loop, args=(self._queue, self._stopping),
                                            name="group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Serve what was queued, then end the writer; a command queued later starts another. A
        second stop meanwhile returns when the first does, once the writer has ended."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._stopping = thread
                self._queue.put(None)
            thread = self._stopping
        if thread is not None:
            thread.join()

    def _enqueue(self, pending: _Pending) -> None:
        pending.queued_at = self.monotonic()
        with self._lock:  # never behind a stopping writer's marker
            if self._thread is None:
                self._start()
            self._queue.put(pending)

    def submit(self, command: Command[T]) -> Future[Committed[T]]:
        """The command queued; its outcome comes on the future. Once queued it runs: the future
        cannot be canceled (its command may be saved in a batch with others)."""
        future = _queued_future()
        self._enqueue(_Pending(command, future))
        return future

    def execute(self, command: Command[T]) -> Committed[T]:
        return self.submit(command).result()

    async def execute_async(self, command: Command[T]) -> Committed[T]:
        """execute for a coroutine: it waits on an asyncio future the writer settles (no thread)."""
        outcome = _LoopOutcome(self._outbox)
        self._enqueue(_Pending(command, outcome))
        committed: Committed[T] = await self._answer_of(outcome)
        return committed

    def read(self, aggregate_id: UUID) -> Aggregate | None:
        """A private copy of the aggregate as last committed (None: no such aggregate)."""
        future: Future[Committed[Aggregate | None]] = _queued_future()
        self._enqueue(_Pending(_Viewing(aggregate_id, copy.deepcopy), future, read=True))
        return future.result().value

    async def read_async(self, aggregate_id: UUID, view: Callable[[Aggregate | None], T]) -> T:
        """``view`` of the aggregate as last committed (None: no such aggregate), computed on the
        writer thread from the cached object itself: it must not change it, and must return
        nothing that shares its state (a copy, or plain values), as the next batch changes it."""
        outcome = _LoopOutcome(self._outbox)
        self._enqueue(_Pending(_Viewing(aggregate_id, view), outcome, read=True))
        committed: Committed[T] = await self._answer_of(outcome)
        return committed.value

    async def _answer_of(self, outcome: _LoopOutcome) -> Any:
        """The writer's answer, or NotAnswered after ``answer_within_s`` (the future is canceled:
        the writer's late answer goes nowhere). An answer settled in the same turn of the loop as
        the bound ran out is the caller's: its command may be saved."""
        deadline = asyncio.timeout(self.answer_within_s)
        try:
            async with deadline:
                return await outcome.future
        except TimeoutError:
            if not deadline.expired():
                raise
            if outcome.future.done() and not outcome.future.cancelled():
                return outcome.future.result()
            raise NotAnswered(f"no answer within {self.answer_within_s:g} s; try again") from None

    def _loop(self, commands: queue.SimpleQueue[_Pending | None], previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        while True:
            first = commands.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = commands.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    commands.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - never leave a caller waiting forever
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
            finally:
                self._outbox.flush()

    def _prefetch(self, batch: list[_Pending]) -> dict[UUID, Aggregate | None]:
        declared = {i for p in batch for i in getattr(p.command, "aggregate_ids", ())}
        loaded = self.cache.load(declared)
        related: set[UUID] = set()
        for p in batch:
            name_more = getattr(p.command, "related_ids", None)
            if name_more is None:
                continue
            for i in getattr(p.command, "aggregate_ids", ()):
                if loaded.get(i) is not None:
                    related.update(name_more(loaded[i]))
        loaded.update(self.cache.load(related - set(loaded)))
        return loaded

    def _serve_reads(self, batch: list[_Pending], prefetched: dict[UUID, Aggregate | None]) -> list[_Pending]:
        """Answer the batch's reads from the state the batch starts from (all committed); the rest."""
        uow = UnitOfWork(self.cache.fetch_one, prefetched)
        rest = []
        for p in batch:
            if not p.read:
                rest.append(p)
                continue
            try:
                p.future.set_result(Committed(_run_one(uow, p.command), None))
            except Exception as e:  # noqa: BLE001 - that reader gets it
                p.future.set_exception(e)
        return rest

    def _one_by_one(self, batch: list[_Pending], error: BaseException) -> None:
        """Run each command of a failed batch in a transaction of its own (or fail the one)."""
        if len(batch) == 1:
            batch[0].future.set_exception(error)
            return
        log.warning("a batch of %d commands failed (%s: %s); running them one by one",
                    len(batch), type(error).__name__, error)
        for n, p in enumerate(batch):
            try:
                self._run([p])
            except TRANSIENT as e:  # the database went away: the rest would only wait for it too
                for rest in batch[n:]:
                    if not rest.future.done():
                        rest.future.set_exception(e)
                raise
            except BaseException as e:  # noqa: BLE001 - that command's caller gets it
                if not p.future.done():
                    p.future.set_exception(e)

    def _in_time(self, batch: list[_Pending]) -> list[_Pending]:
        """The batch less the commands queued longer than COMMIT_LAG_MAX_S ago, each refused
        (WrittenTooLate); reads stamp nothing and always run."""
        now = self.monotonic()
        in_time = []
        for p in batch:
            waited = now - p.queued_at
            if p.read or waited <= COMMIT_LAG_MAX_S:
                in_time.append(p)
                continue
            self.written_too_late += 1
            p.future.set_exception(WrittenTooLate(f"waited {waited:.1f} s to be written "
                                                  f"(at most {COMMIT_LAG_MAX_S:g} s); try again"))
        return in_time

    def _run(self, batch: list[_Pending], attempt: int = 0) -> None:  # noqa: C901 - the writer loop: a split adds calls to every batch
        while batch:
            batch = self._in_time(batch)  # each attempt: a conflict's retries take time too
            if not batch:
                return
            try:
                prefetched = self._prefetch(batch)
            except TRANSIENT:
                raise
            except Exception as e:  # noqa: BLE001 - one command's declared ids may be at fault
                self._one_by_one(batch, e)
                return
            batch = self._serve_reads(batch, prefetched)
            self._outbox.flush()  # the readers need not wait for the batch's save
            if not batch:
                return
            uow = UnitOfWork(self.cache.fetch_one, prefetched)
            decided = _decide(uow, batch)
            if decided.bug is not None:
                self.cache.evict(uow.ids())  # it may have changed what it touched
                batch = [p for p in batch if p is not decided.bug]
                continue
            in_time = self._in_time(batch)  # again: deciding took time too
            if len(in_time) < len(batch):  # those past the bound are refused; the rest decided again
                self.cache.evict(uow.ids())
                batch = in_time
                continue
            changed = uow.changed()
            due = self._snapshots_due(changed)
            based_on = {a.id: a.version - len(a.pending_events) for a in changed}  # the save collects them
            try:
                recordings = _save(self.app, self.cache.loader, changed)
            except IntegrityError:
                self.cache.evict(uow.ids())
                attempt += 1
                if self._after_conflict(batch, decided.touched, based_on, attempt):
                    return
                continue
            except TRANSIENT:
                # The database went away mid-save: what the batch decided may not be stored, so
                # the cached objects holding it must go too.
                self.cache.evict(uow.ids())
                raise
            except Exception as e:  # noqa: BLE001 - e.g. one command's events cannot be encoded
                self.cache.evict(uow.ids())
                self._one_by_one(batch, e)
                return
            except BaseException:
                self.cache.evict(uow.ids())
                raise
            self.cache.keep(uow.aggregates())
            self._answer(decided, _position(recordings), {a.id: a.version for a in changed})
            if due:
                self._outbox.flush()  # the callers need not wait for the snapshots
                self._take_snapshots(due)
            return

    def _after_conflict(self, batch: list[_Pending], touched: list[set[UUID]], based_on: Mapping[UUID, int],
                        attempt: int) -> bool:
        """Another process wrote a stream the batch decided on: the batch run again in two parts
        (True), refused when it has lost ``max_attempts`` times (True), or to be decided again
        whole after a pause (False)."""
        self.conflicts += 1
        split = self._apart_from_contended(batch, touched, based_on)
        if split is not None:
            # Each part decided again on its own: the commands on streams no other process
            # wrote are not refused with those that keep losing to one that writes on.
            clear, contended = split
            self._run(clear)
            self._outbox.flush()
            self._run(contended, attempt)
            return True
        if attempt >= self.max_attempts:
            for p in batch:
                p.future.set_exception(ConflictError("too much contention; try again"))
            return True
        _backoff(attempt)
        return False

    def _answer(self, decided: _Decided, position: int | None, versions: Mapping[UUID, int]) -> None:
        """Each caller of a saved batch its command's outcome: its value with the save's position
        and versions, or the refusal it raised."""
        self.batches += 1
        self.commands += len(decided.outcomes)
        if self.observe_batch is not None:
            self.observe_batch(len(decided.outcomes))
        for i, (p, ok, value) in enumerate(decided.outcomes):
            if ok:
                p.future.set_result(Committed(value, position, versions, i in decided.recorded))
            else:
                p.future.set_exception(value)

    def _apart_from_contended(self, batch: list[_Pending], touched: list[set[UUID]],
                              based_on: Mapping[UUID, int]) -> tuple[list[_Pending], list[_Pending]] | None:
        """After a conflict: the batch's commands that touched none of the streams another
        process wrote past what the batch decided on, and those that did; None when that cannot
        be told (the store cannot be read) or all of them are of one kind."""
        try:
            written = {UUID(str(e.originator_id)) for e in self.cache.loader.newer_than(based_on)}
        except Exception as e:  # noqa: BLE001 - the whole batch is decided again, as it was
            log.warning("the streams of a conflict could not be read (%s: %s)", type(e).__name__, e)
            return None
        clear = [p for p, ids in zip(batch, touched, strict=True) if not ids & written]
        contended = [p for p, ids in zip(batch, touched, strict=True) if ids & written]
        return (clear, contended) if clear and contended else None

    def _snapshots_due(self, changed: list[Aggregate]) -> list[Aggregate]:
        """The changed aggregates whose new events reach a multiple of their snapshot interval."""
        due = []
        for agg in changed:
            every = self.snapshot_every.get(type(agg))
            if every and agg.version // every > (agg.version - len(agg.pending_events)) // every:
                due.append(agg)
        return due

    def _take_snapshots(self, saved: list[Aggregate]) -> None:
        """Snapshots of aggregates as just saved (held by the writer, so as committed), each on its
        own. A failure costs only the shortcut: that stream's loads read further back meanwhile."""
        assert self.app.snapshots is not None
        for agg in saved:
            try:
                self.app.snapshots.put([self._snapshot_class.take(agg)])
            except Exception as e:  # noqa: BLE001 - never the batch's concern: it is saved
                log.warning("no snapshot of %s at version %d (%s: %s)", agg.id, agg.version, type(e).__name__, e)
            else:
                self.snapshots_taken += 1
