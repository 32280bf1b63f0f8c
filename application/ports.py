"""Ports: what the application needs from the outside, as Protocols; adapters implement them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID

from eventsourcing.persistence import StoredEvent


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""
        ...


class IdGenerator(Protocol):
    def new_id(self) -> UUID: ...


class ObjectStore(Protocol):
    def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """The size in bytes of each key among ``keys`` that exists in the store."""
        ...

    async def sizes_async(self, keys: Sequence[str]) -> dict[str, int]:
        """sizes from an event loop."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete these objects (one absent already is no error)."""
        ...


class StreamLoader(Protocol):
    def newer_than(self, versions: Mapping[UUID, int]) -> list[StoredEvent]:
        """The stored events of each stream in ``versions`` past the version given for it (0: the
        whole stream), each stream's in version order; a stream with none contributes nothing."""
        ...

    def since_snapshots(self, versions: Mapping[UUID, int]) -> tuple[list[StoredEvent], list[StoredEvent]]:
        """``newer_than``, from snapshots where they help: the newest snapshot of each stream in
        ``versions`` past the version given for it and at most its last event's (none where the
        store keeps no snapshots), and the stream's events from that snapshot's version on (its
        event too, which the snapshot must agree with: a store restored behind its snapshots and
        written again has an event of that version from another history), past the version given
        where it has none."""
        ...


class VersionUnknown(Exception):
    """The store could not say a stream's version (it is down, or the query failed)."""


class StreamVersions(Protocol):
    async def current(self, aggregate_id: UUID) -> int:
        """The stream's version in the store as of a moment after the call began (0: no such
        stream); raises VersionUnknown when it cannot tell."""
        ...

    async def close(self) -> None:
        """Release what it holds (a connection), on the loop it was used on."""
        ...
