"""Read-your-writes for projection-backed lists: remember each user's recent writes per model."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from uuid import UUID

STREAMS_PER_USER = 32  # a user's recent streams per model; older ones have long been folded
# A write is remembered this long unless a read sees it folded first: the read model folds one in
# ~100 ms, GET /rules waits at most 5 s for it (wait_for_streams) and GET /jobs reads it from the
# write side meanwhile, so a caller's own new jobs stay listed through a projector restarted, or
# away, for up to ten minutes; what it costs is the writes of the last ten minutes not read back.
WRITE_TTL_S = 600.0
EXPIRED_PER_RECORD = 64  # stale writers a record drops at most (it adds one): no long sweep under the lock

Streams = OrderedDict[UUID, tuple[int, float]]  # stream id -> (version, written at), oldest first


class LastWrites:
    """user -> model -> {stream id: version} of the user's recent writes in this process (LRU).

    All of them are waited for: streams land on different partitions, so the last write being
    folded says nothing about an earlier one on another stream. A write is forgotten once a read
    has seen the model fold it (``folded``) or ``ttl_s`` after it was made, so what is held is the
    writes of the last ten minutes not yet read back, not every user's last 32 for good."""

    def __init__(self, max_users: int = 100_000, ttl_s: float = WRITE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._data: OrderedDict[UUID, dict[str, Streams]] = OrderedDict()  # least recent writer first
        self._lock = threading.Lock()
        self.max_users = max_users
        self.ttl_s = ttl_s
        self.clock = clock

    def record(self, user_id: UUID, model: str, stream_id: UUID, version: int | None) -> None:
        if version is None:
            return
        now = self.clock()
        with self._lock:
            self._expire_writers(now)
            streams = self._data.setdefault(user_id, {}).setdefault(model, OrderedDict())
            held, _ = streams.pop(stream_id, (0, now))
            streams[stream_id] = (max(version, held), now)
            while len(streams) > STREAMS_PER_USER:
                streams.popitem(last=False)
            self._data.move_to_end(user_id)
            while len(self._data) > self.max_users:
                self._data.popitem(last=False)

    def recent(self, user_id: UUID, model: str) -> dict[UUID, int]:
        """The user's writes to ``model`` made within ``ttl_s``."""
        now = self.clock()
        with self._lock:
            streams = self._data.get(user_id, {}).get(model)
            if streams is None:
                return {}
            while streams and now - next(iter(streams.values()))[1] >= self.ttl_s:
                streams.popitem(last=False)
            result = {stream: version for stream, (version, _) in streams.items()}
            self._drop_if_empty(user_id, model)
            return result

    def folded(self, user_id: UUID, model: str, seen: dict[UUID, int]) -> None:
        """Forget the writes a read saw ``model`` fold (stream id -> the version it had reached):
        later reads see it there too. A stream written again since, to a higher version, stays."""
        with self._lock:
            streams = self._data.get(user_id, {}).get(model)
            if streams is None:
                return
            for stream, version in seen.items():
                if stream in streams and streams[stream][0] <= version:
                    del streams[stream]
            self._drop_if_empty(user_id, model)

    def close(self) -> None:
        """Nothing held outside this process (``SharedLastWrites`` holds a socket)."""

    def _drop_if_empty(self, user_id: UUID, model: str) -> None:
        models = self._data[user_id]
        if not models[model]:
            del models[model]
            if not models:
                del self._data[user_id]

    def _expire_writers(self, now: float) -> None:
        """Drop the least recent writers whose newest write is past ``ttl_s``, EXPIRED_PER_RECORD at
        most: writers are kept in the order of their last write, so each record sweeps what went
        stale before it, faster than records add writers."""
        for _ in range(EXPIRED_PER_RECORD):
            if not self._data:
                return
            user_id, models = next(iter(self._data.items()))
            newest = max(next(reversed(streams.values()))[1] for streams in models.values())
            if now - newest < self.ttl_s:
                return
            del self._data[user_id]
