"""Read-your-writes for projection-backed lists: remember each user's recent writes per model."""

from __future__ import annotations

import threading
from collections import OrderedDict
from uuid import UUID

STREAMS_PER_USER = 32  # a user's recent streams per model; older ones have long been folded


class LastWrites:
    """user -> model -> {stream id: version} of the user's recent writes in this process (LRU).

    All of them are waited for: streams land on different partitions, so the last write being
    folded says nothing about an earlier one on another stream."""

    def __init__(self, max_users: int = 100_000) -> None:
        self._data: OrderedDict[UUID, dict[str, OrderedDict[UUID, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_users = max_users

    def record(self, user_id: UUID, model: str, stream_id: UUID, version: int | None) -> None:
        if version is None:
            return
        with self._lock:
            streams = self._data.setdefault(user_id, {}).setdefault(model, OrderedDict())
            streams[stream_id] = max(version, streams.get(stream_id, 0))
            streams.move_to_end(stream_id)
            while len(streams) > STREAMS_PER_USER:
                streams.popitem(last=False)
            self._data.move_to_end(user_id)
            while len(self._data) > self.max_users:
                self._data.popitem(last=False)

    def recent(self, user_id: UUID, model: str) -> dict[UUID, int]:
        with self._lock:
            return dict(self._data.get(user_id, {}).get(model, {}))
