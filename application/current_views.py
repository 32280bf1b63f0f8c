"""Strongly consistent views of aggregates answered on the event loop.

A read through the group committer is one hop to the writer thread and back, and under load the
two threads take turns at the GIL: ``GET /me`` cost about twice a static route. Most reads of a
view repeat it unchanged, so the view is kept with the stream version it was taken at, and a
read asks the store only for the stream's version now (one batched query per round trip, on the
loop; ``StreamVersions``): the same version means no event since, so the kept view is the
committed state now. Anything else (a new event, no view kept, the store unable to tell) reads
through the executor as before, and keeps that view.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar
from uuid import UUID

from application.ports import StreamVersions, VersionUnknown

V = TypeVar("V")


class CurrentViews(Generic[V]):
    """Views by aggregate id, each with the version it was taken at; at most ``maxsize`` (least
    recently read dropped first). For one event loop: not thread-safe. ``read`` returns the view
    of the aggregate as last committed and that aggregate's version; views must be immutable."""

    def __init__(self, versions: StreamVersions, read: Callable[[UUID], Awaitable[tuple[int, V]]],
                 maxsize: int = 20_000) -> None:
        self.versions = versions
        self.read = read
        self.maxsize = maxsize
        self._kept: OrderedDict[UUID, tuple[int, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def get(self, aggregate_id: UUID) -> V:
        kept = self._kept.get(aggregate_id)
        if kept is not None:
            try:
                current = await self.versions.current(aggregate_id)
            except VersionUnknown:
                current = None
            if current == kept[0]:
                self.hits += 1
                self._keep(aggregate_id, *kept)  # dropped meanwhile, perhaps, for another's view
                return kept[1]
        self.misses += 1
        version, view = await self.read(aggregate_id)
        self._keep(aggregate_id, version, view)
        return view

    def _keep(self, aggregate_id: UUID, version: int, view: V) -> None:
        kept = self._kept.get(aggregate_id)
        if kept is not None and kept[0] > version:  # a slower read of an older state came back last
            return
        self._kept[aggregate_id] = (version, view)
        self._kept.move_to_end(aggregate_id)
        while len(self._kept) > self.maxsize:
            self._kept.popitem(last=False)

    @property
    def kept(self) -> int:
        """How many views are kept."""
        return len(self._kept)
