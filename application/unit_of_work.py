"""The unit of work a command runs in, what a command is and returns, and what runs it
(the executors themselves are in application.executors)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import DomainError

T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)


class ConflictError(DomainError, code="CONFLICT"):
    """Optimistic concurrency kept failing after bounded retries; the client may retry."""


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

    def stamp(self, key: str, value: str) -> None:
        """Put ``key = value`` on every event the current command recorded (it is stored with
        the event's state, e.g. the trace of the request that caused it)."""
        for aggregate_id, before in self._touched.items():
            agg = self._loaded.get(aggregate_id)
            for event in agg.pending_events[before:] if agg is not None else ():
                object.__setattr__(event, key, value)  # events are frozen: set once, before the save

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

    def command_touched(self) -> set[UUID]:
        """The aggregates the current command read or added."""
        return set(self._touched)


def touches(
    *aggregate_ids: UUID, related: Callable[[Any], Iterable[UUID]] | None = None
) -> Callable[[Callable[[UnitOfWork], T]], Callable[[UnitOfWork], T]]:
    """Declare the aggregates a command will load, so a batch fetches them all in one query;
    ``related`` names more ids from a loaded aggregate (a job's owner), fetched in a second one;
    it is given whatever the id holds, which a client or worker chose, so it checks the kind."""
    def mark(command: Callable[[UnitOfWork], T]) -> Callable[[UnitOfWork], T]:
        command.aggregate_ids = aggregate_ids  # type: ignore[attr-defined]
        command.related_ids = related  # type: ignore[attr-defined]
        return command
    return mark


Command = Callable[[UnitOfWork], T]


@dataclass(frozen=True)
class Committed(Generic[T]):
    """A command's result, the event-store position its save reached (None: nothing new, or a
    save whose answer was lost and which was found stored, whose position is not known), the
    stream versions it saved (for readers that wait on a projection), and whether this command
    itself recorded an event (the save and its versions are its batch's, which other commands
    share)."""

    value: T
    position: int | None
    versions: Mapping[UUID, int] = field(default_factory=dict)
    recorded: bool = False


class CommandExecutor(Protocol):
    """What runs commands (application.executors): DirectExecutor, GroupCommitter."""

    def execute(self, command: Command[T]) -> Committed[T]:
        """Run ``command`` and save what it recorded; ConflictError after bounded retries."""
        ...

    def read(self, aggregate_id: UUID) -> Aggregate | None:
        """A private copy of the aggregate as last committed (None: no such aggregate)."""
        ...

    async def execute_async(self, command: Command[T]) -> Committed[T]:
        """``execute`` for an event loop: the caller awaits the outcome."""
        ...

    async def read_async(self, aggregate_id: UUID, view: Callable[[Aggregate | None], T]) -> T:
        """``view`` of the aggregate as last committed, for an event loop (``view`` must neither
        change the aggregate nor return anything sharing its state)."""
        ...
