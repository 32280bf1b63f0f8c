"""Read-your-writes for projection-backed lists: remember each user's last write per model."""

from __future__ import annotations

import threading
from collections import OrderedDict
from uuid import UUID


class LastWrites:
    """user -> model -> (stream id, version) of the user's last write in this process (LRU)."""

    def __init__(self, max_users: int = 100_000) -> None:
        self._data: OrderedDict[UUID, dict[str, tuple[UUID, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_users = max_users

    def record(self, user_id: UUID, model: str, stream_id: UUID, version: int | None) -> None:
        if version is None:
            return
        with self._lock:
            self._data.setdefault(user_id, {})[model] = (stream_id, version)
            self._data.move_to_end(user_id)
            while len(self._data) > self.max_users:
                self._data.popitem(last=False)

    def last(self, user_id: UUID, model: str) -> tuple[UUID, int] | None:
        with self._lock:
            return self._data.get(user_id, {}).get(model)
