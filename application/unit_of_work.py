"""Unit of work and the two ways to run a command: group commit and one save per command."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError

from domain.errors import DomainError

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)


class ConflictError(DomainError):
    """Optimistic concurrency kept failing after bounded retries; the client may retry."""

    code = "CONFLICT"


class UnitOfWork:
    """The aggregates one batch of commands works on; later commands see earlier changes."""

    def __init__(self, fetch: Callable[[UUID], Aggregate | None],
                 loaded: dict[UUID, Aggregate | None] | None = None) -> None:
        self._fetch = fetch
        self._loaded: dict[UUID, Aggregate | None] = dict(loaded or {})
        # What the current command touched, with each aggregate's pending count at first touch.
        self._touched: dict[UUID, int] = {}

    def get(self, cls: type[A], aggregate_id: UUID) -> A | None:
        if aggregate_id not in self._loaded:
            self._loaded[aggregate_id] = self._fetch(aggregate_id)
        agg = self._loaded[aggregate_id]
        if agg is not None and aggregate_id not in self._touched:
            self._touched[aggregate_id] = len(agg.pending_events)
        if agg is not None and not isinstance(agg, cls):
            return None
        return agg

    def add(self, aggregate: Aggregate) -> None:
        if self._loaded.get(aggregate.id) is not None:
            raise ValueError(f"aggregate {aggregate.id} already exists in this unit of work")
        self._loaded[aggregate.id] = aggregate
        self._touched[aggregate.id] = 0

    def begin_command(self) -> None:
        self._touched = {}

    def command_recorded(self) -> bool:
        """Whether the current command recorded events (checked when it refuses)."""
        for aggregate_id, before in self._touched.items():
            agg = self._loaded.get(aggregate_id)
            if agg is not None and len(agg.pending_events) != before:
                return True
        return False

    def changed(self) -> list[Aggregate]:
        return [a for a in self._loaded.values() if a is not None and a.pending_events]

    def aggregates(self) -> list[Aggregate]:
        return [a for a in self._loaded.values() if a is not None]

    def ids(self) -> list[UUID]:
        return list(self._loaded)


def touches(
    *aggregate_ids: UUID, related: Callable[[Any], Iterable[UUID]] | None = None
) -> Callable[[Callable[[UnitOfWork], T]], Callable[[UnitOfWork], T]]:
    """Declare the aggregates a command will load, so a batch fetches them all in one query;
    ``related`` names more ids from a loaded aggregate (a job's owner), fetched in a second one."""
    def mark(command: Callable[[UnitOfWork], T]) -> Callable[[UnitOfWork], T]:
        command.aggregate_ids = aggregate_ids  # type: ignore[attr-defined]
        command.related_ids = related  # type: ignore[attr-defined]
        return command
    return mark


class WriterCache:
    """The group committer's own aggregates: as this writer last saved them, brought up to date
    with ONE query per batch (new events of every aggregate the batch declares). Owned by the
    writer thread alone, so no copies: a failed save or a broken command evicts what it touched."""

    def __init__(self, app: Application[UUID], maxsize: int = 20_000) -> None:
        from collections import OrderedDict

        self.app = app
        self.maxsize = maxsize
        self._cache: OrderedDict[UUID, Aggregate] = OrderedDict()
        recorder: Any = app.recorder
        self._sql = None
        if hasattr(recorder, "datastore") and hasattr(recorder.datastore, "get_connection"):
            from psycopg import sql

            # LATERAL: one index range scan per aggregate, whatever the planner guesses for
            # unnest() (a hash join would scan the whole events table as it grows).
            self._sql = sql.SQL(
                "SELECT e.originator_id, e.originator_version, e.topic, e.state "
                "FROM unnest(%s::uuid[], %s::int[]) AS v(id, ver) CROSS JOIN LATERAL ("
                " SELECT originator_id, originator_version, topic, state FROM {}.{}"
                " WHERE originator_id = v.id AND originator_version > v.ver ORDER BY originator_version) e"
            ).format(sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name))

    def _new_events(self, versions: dict[UUID, int]) -> list[Any]:
        from eventsourcing.persistence import StoredEvent

        if self._sql is None:  # the in-memory store (unit tests): per aggregate, same semantics
            return [e for i, v in versions.items() for e in self.app.recorder.select_events(i, gt=v or None)]
        recorder: Any = self.app.recorder
        with recorder.datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(self._sql, [list(versions), list(versions.values())], prepare=True)
            rows = cur.fetchall()
        return [StoredEvent(r["originator_id"], r["originator_version"], r["topic"], bytes(r["state"])) for r in rows]

    def load(self, ids: set[UUID] | list[UUID]) -> dict[UUID, Aggregate | None]:
        if not ids:
            return {}
        versions = {i: (self._cache[i].version if i in self._cache else 0) for i in ids}
        out: dict[UUID, Aggregate | None] = {i: self._cache.get(i) for i in ids}
        for stored in self._new_events(versions):
            event: Any = self.app.mapper.to_domain_event(stored)
            out[stored.originator_id] = event.mutate(out[stored.originator_id])
        return out

    def fetch_one(self, aggregate_id: UUID) -> Aggregate | None:
        return self.load([aggregate_id])[aggregate_id]

    def keep(self, aggregates: list[Aggregate]) -> None:
        for agg in aggregates:
            self._cache[agg.id] = agg
            self._cache.move_to_end(agg.id)
        while len(self._cache) > self.maxsize:
            self._cache.popitem(last=False)

    def evict(self, ids: list[UUID]) -> None:
        for i in ids:
            self._cache.pop(i, None)


Command = Callable[[UnitOfWork], T]


@dataclass(frozen=True)
class Committed(Generic[T]):
    """A command's result, the event-store position its save reached (None: nothing new), and
    the stream versions it saved (for readers that wait on a projection)."""

    value: T
    position: int | None
    versions: Mapping[UUID, int] = field(default_factory=dict)


# The database, not a command, failed: the batch's outcome is unknown (the commit may have landed),
# so it is not run again here; every caller gets the error.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, ConnectionError)


class CommandExecutor(Protocol):
    def execute(self, command: Command[T]) -> Committed[T]: ...


class _CommandBug(Exception):
    """A command raised something other than a domain refusal, or refused after recording."""


def _run_one(uow: UnitOfWork, command: Command[Any]) -> Any:
    uow.begin_command()
    try:
        return command(uow)
    except DomainError:
        if uow.command_recorded():
            raise _CommandBug("command refused after recording events") from None
        raise


def _evict(app: Application[UUID], ids: list[UUID]) -> None:
    cache = app.repository.cache
    if cache is not None:
        for aggregate_id in ids:
            with contextlib.suppress(KeyError):
                cache.get(aggregate_id, evict=True)


def _backoff(attempt: int) -> None:
    # Jitter spreads competing writers apart so the next attempt is likely to win.
    time.sleep(random.uniform(0, 0.002 * 2**attempt))


def _position(recordings: list[Any]) -> int | None:
    ids = [r.notification.id for r in recordings]
    return max(ids) if ids else None


class DirectExecutor:
    """The naive path: one load-decide-save transaction per command, retried on conflict."""

    def __init__(self, app: Application[UUID], max_attempts: int = 10) -> None:
        self.app = app
        self.max_attempts = max_attempts

    def _fetch(self, aggregate_id: UUID) -> Aggregate | None:
        try:
            return self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def execute(self, command: Command[T]) -> Committed[T]:
        for attempt in range(self.max_attempts):
            uow = UnitOfWork(self._fetch)
            try:
                value = _run_one(uow, command)
            except _CommandBug as e:
                raise RuntimeError(str(e)) from e
            changed = uow.changed()
            try:
                recordings = self.app.save(*changed)
            except IntegrityError:
                _evict(self.app, uow.ids())
                _backoff(attempt)
                continue
            return Committed(value, _position(recordings), {a.id: a.version for a in changed})
        raise ConflictError("too much contention on this object; try again")


@dataclass
class _Pending:
    command: Command[Any]
    future: Future[Committed[Any]]


class GroupCommitter:
    """Runs queued commands in batches on one writer thread, saving each batch in one transaction.

    Commands for one aggregate apply in arrival order against the same in-memory object, so a
    hot stream sees no conflicts from this process; a conflict with another process reloads and
    decides the whole batch again, bounded, with jitter. A refused command (DomainError) fails
    alone; a command that raises anything else is dropped from the batch, which is then redone;
    a batch whose prefetch or save fails for a reason other than the database runs again one
    command per transaction, so only the command at fault fails.
    """

    def __init__(self, app: Application[UUID], max_batch: int = 500, max_attempts: int = 10) -> None:
        self.app = app
        self.max_batch = max_batch
        self.max_attempts = max_attempts
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.cache = WriterCache(app)
        self.batches = 0
        self.commands = 0

    def start(self) -> GroupCommitter:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def submit(self, command: Command[T]) -> Future[Committed[T]]:
        if self._thread is None:
            self.start()
        future: Future[Committed[T]] = Future()
        self._queue.put(_Pending(command, future))
        return future

    def execute(self, command: Command[T]) -> Committed[T]:
        return self.submit(command).result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - never leave a caller waiting forever
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

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

    def _run(self, batch: list[_Pending]) -> None:
        attempt = 0
        while batch:
            try:
                prefetched = self._prefetch(batch)
            except TRANSIENT:
                raise
            except Exception as e:  # noqa: BLE001 - one command's declared ids may be at fault
                self._one_by_one(batch, e)
                return
            uow = UnitOfWork(self.cache.fetch_one, prefetched)
            outcomes: list[tuple[_Pending, bool, Any]] = []
            bug: _Pending | None = None
            for p in batch:
                try:
                    outcomes.append((p, True, _run_one(uow, p.command)))
                except DomainError as e:
                    outcomes.append((p, False, e))
                except Exception as e:  # noqa: BLE001 - isolate the broken command, redo the rest
                    p.future.set_exception(e)
                    bug = p
                    break
            if bug is not None:
                self.cache.evict(uow.ids())  # it may have changed what it touched
                batch = [p for p in batch if p is not bug]
                continue
            changed = uow.changed()
            try:
                recordings = self.app.save(*changed)
            except IntegrityError:
                self.cache.evict(uow.ids())
                attempt += 1
                if attempt >= self.max_attempts:
                    for p in batch:
                        p.future.set_exception(ConflictError("too much contention; try again"))
                    return
                _backoff(attempt)
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
            position = _position(recordings)
            versions = {a.id: a.version for a in changed}
            self.batches += 1
            self.commands += len(batch)
            for p, ok, value in outcomes:
                if ok:
                    p.future.set_result(Committed(value, position, versions))
                else:
                    p.future.set_exception(value)
            return
