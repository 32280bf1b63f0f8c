"""Stand-ins for kafka-python's consumer records and a consumer that hands out fixed polls
(pure code paths of the worker loops; the real broker is in the integration suites)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    value: bytes | None
    key: bytes | None = None
    offset: int = 0
    partition: int = 0
    topic: str = "palette.events"


class FakeConsumer:
    """Hands out one list of records per poll, then nothing; counts commits."""

    def __init__(self, *polls: list[Record]) -> None:
        self.polls = deque(polls)
        self.commits = 0
        self.last: list[Record] = []

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
        if not self.polls:
            return {}
        self.last = records = self.polls.popleft()
        return {(records[0].topic if records else "", 0): records}

    def seek(self, tp: Any, offset: int) -> None:
        """The last poll's records from ``offset`` on come again in the next poll."""
        self.polls.appendleft([r for r in self.last if r.offset >= offset])

    def commit(self) -> None:
        self.commits += 1

    def close(self) -> None:
        pass


class FakeLog:
    """One partition's log as a group member sees it: a poll returns up to ``max_records`` from its
    position on, ``seek`` moves the position, and ``commit`` records it as the group's offset."""

    def __init__(self, topic: str = "palette.gpu-jobs") -> None:
        self.tp = (topic, 0)
        self.records: list[Record] = []
        self.position = 0
        self.commits: list[int] = []

    def append(self, value: bytes, key: bytes | None = None) -> None:
        self.records.append(Record(value, key, len(self.records), 0, self.tp[0]))

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
        got = self.records[self.position:][:max_records]
        self.position += len(got)
        return {self.tp: got} if got else {}

    def seek(self, tp: Any, offset: int) -> None:
        assert tp == self.tp
        self.position = offset

    def commit(self) -> None:
        self.commits.append(self.position)

    def close(self) -> None:
        pass
