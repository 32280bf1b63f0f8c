"""The projector's side of catch-up (pure: fake broker, fake catch-up, recording store): it looks
only once it has joined its group (start-up readiness never waits for a catch-up), then again
only every ``CATCHUP_CHECK_S``, and what the broker delivers up to the position the catch-up
reached never reaches the store."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from adapters.projector import CATCHUP_CHECK_S, SWEEP, Projector
from domain.contracts.envelope import EventEnvelope, encode
from projections.store import BatchResult
from tests.unit.broker_fakes import FakeConsumer, Record

STREAM = uuid.uuid4()


def event(position: int) -> EventEnvelope:
    return EventEnvelope(id=position, stream_id=STREAM, stream_type="Job", version=position, type="JobStarted",
                         timestamp=datetime(2026, 1, 1, tzinfo=UTC), data={})


class JoiningConsumer(FakeConsumer):
    """Assigned partitions from its first poll on, as a consumer that joined its group."""

    joined = False

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
        self.joined = True
        return super().poll(timeout_ms, max_records)

    def assignment(self) -> set[int]:
        return {0} if self.joined else set()


class RecordingStore:
    def __init__(self) -> None:
        self.applied: list[list[int]] = []
        self.positions: dict[str, int] = {}

    def apply(self, envelopes: Sequence[EventEnvelope], fill: Any = None) -> BatchResult:
        self.applied.append([e.id for e in envelopes])
        return BatchResult(applied=len(envelopes))

    def position(self, name: str) -> int:
        return self.positions.get(name, 0)

    def save_position(self, name: str, position: int) -> None:
        self.positions[name] = position


class FakeCatchUp:
    """Reaches ``upto`` on its first run; not behind afterwards."""

    def __init__(self, upto: int) -> None:
        self.upto = upto
        self.runs = 0

    def run(self) -> tuple[int, BatchResult] | None:
        self.runs += 1
        return (self.upto, BatchResult(applied=self.upto)) if self.runs == 1 else None


class FakeLog:
    def stream_events(self, gaps: Any) -> list[EventEnvelope]:
        return []

    def close(self) -> None:
        pass


def records(*positions: int) -> list[Record]:
    return [Record(encode(event(p)), offset=p) for p in positions]


def test_after_joining_it_catches_up_and_drops_what_the_broker_delivers_up_to_there() -> None:
    now = [0.0]
    consumer = JoiningConsumer(records(1, 2), records(3, 4, 5, 6, 7), records(8, 9))
    store, catchup = RecordingStore(), FakeCatchUp(upto=6)
    projector = Projector(consumer, store, FakeLog(), published=lambda: 9,  # type: ignore[arg-type]
                          clock=lambda: now[0], catchup=catchup)  # type: ignore[arg-type]

    projector.step()  # joins the group: no catch-up before readiness
    assert catchup.runs == 0 and store.applied == [[1, 2]]
    projector.step()  # joined: it catches up to 6 first, then the broker's 3..6 are dropped
    assert catchup.runs == 1 and store.applied[-1] == [7]
    assert projector.caught_up_to == 6 and store.positions[SWEEP] == 6
    assert projector.totals.applied == 2 + 6 + 1 and projector.totals.skipped == 4
    projector.step()  # within CATCHUP_CHECK_S: no new look
    assert catchup.runs == 1 and store.applied[-1] == [8, 9]
    now[0] += CATCHUP_CHECK_S
    projector.step()  # the next look finds it close enough: nothing changes
    assert catchup.runs == 2 and projector.caught_up_to == 6 and consumer.commits == 3
