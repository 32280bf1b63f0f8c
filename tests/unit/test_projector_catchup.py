"""The projector's side of catch-up (pure: fake broker, fake catch-up, recording store): it looks
only once it has joined its group (start-up readiness never waits for a catch-up), then again
only every ``CATCHUP_CHECK_S``, and what the broker delivers up to the position the catch-up
reached never reaches the store. Then the same projector around a lost broker log (a partitioned
fake log, the relay's acknowledged offsets): the catch-up's skip moves each partition just past what
the relay had acknowledged, the tail after a loss folds each event from the oldest needed once and
never past the relay, and the sweep (a property) folds each event the broker never delivered."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from psycopg import sql

from adapters.projector import CATCHUP_CHECK_S, SWEEP, Projector
from domain.contracts import topics
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


# --- The projector's own paths around losses, catch-up and the sweep (a partitioned fake log) ---


class PartitionedLog:
    """``palette.events`` as a group member sees it: partitions (each a list of event positions, its
    offsets), one position per partition, a poll hands out what lies past each position; seek,
    seek_to_beginning and commit as kafka-python's do. ``other`` is a partition of another topic."""

    def __init__(self, partitions: dict[int, list[int]], other: bool = False) -> None:
        self.logs = {TopicPartition(topics.EVENTS, p): ids for p, ids in partitions.items()}
        if other:
            self.logs[TopicPartition("palette.other", 0)] = []
        self.at = dict.fromkeys(self.logs, 0)
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    def position(self, tp: TopicPartition) -> int:
        return self.at[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.at[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps or self.logs:
            self.at[tp] = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
        out = {}
        for tp, ids in self.logs.items():
            got = [Record(encode(event(i)), offset=o, partition=tp.partition, topic=tp.topic)
                   for o, i in enumerate(ids) if o >= self.at[tp]]
            self.at[tp] += len(got)
            if got:
                out[tp] = got
        return out

    def commit(self) -> None:
        self.commits.append(dict(self.at))

    def close(self) -> None:
        pass


class RelayLosses:
    """``LossSignal`` as the projector reads it: the relay's position and acknowledged offsets, and
    a loss once ``lose`` says so."""

    def __init__(self, relay_at: int = 0, acked: dict[int, int] | None = None) -> None:
        self.relay_at, self.acked = relay_at, acked or {}
        self.pending = False
        self.republish_from = 0

    def lose(self, republish_from: int) -> None:
        self.pending, self.republish_from = True, republish_from

    def new_loss(self) -> bool:
        return self.pending

    def handled(self) -> None:
        self.pending = False

    def published_offsets(self) -> tuple[int, dict[int, int]]:
        return self.relay_at, dict(self.acked)

    def close(self) -> None:
        pass


class EventLog(FakeLog):
    """The event store's log, positions 1..``head``: pages in commit order, as ``LogReader.read``."""

    events_table = sql.Identifier("events")

    def __init__(self, head: int) -> None:
        self.events = [event(p) for p in range(1, head + 1)]

    def head(self) -> int:
        return len(self.events)

    def read(self, after: int, upto: int, limit: int, stream_types: Any = ()) -> list[EventEnvelope]:
        return [e for e in self.events if after < e.id <= upto][:limit]


class FoldingStore(RecordingStore):
    """A read store that knows which positions it folded (``first_unfolded`` as the SQL answers it)."""

    def __init__(self, folded: set[int]) -> None:
        super().__init__()
        self.folded = set(folded)

    def apply(self, envelopes: Sequence[EventEnvelope], fill: Any = None) -> BatchResult:
        self.applied.append([e.id for e in envelopes])
        fresh = {e.id for e in envelopes} - self.folded
        self.folded |= fresh
        return BatchResult(applied=len(fresh), skipped=len(envelopes) - len(fresh))

    def first_unfolded(self, events: Any, after: int, upto: int) -> int | None:
        return min((p for p in range(after + 1, upto + 1) if p not in self.folded), default=None)


def test_a_catch_up_to_where_the_relay_is_moves_each_partition_just_past_what_it_acknowledged() -> None:
    # Positions 1..10 over two partitions; the relay published up to 6 (offsets 2 and 2 acknowledged).
    log = PartitionedLog({0: [1, 3, 5, 7, 9], 1: [2, 4, 6, 8, 10]}, other=True)
    p0, p1 = TopicPartition(topics.EVENTS, 0), TopicPartition(topics.EVENTS, 1)
    other = TopicPartition("palette.other", 0)
    log.at[p1] = 2  # at the acknowledged offset itself: moved past it too
    store = RecordingStore()
    projector = Projector(log, store, catchup=FakeCatchUp(upto=6),  # type: ignore[arg-type]
                          losses=RelayLosses(relay_at=6, acked={0: 2, 1: 2}))  # type: ignore[arg-type]

    projector.step()

    assert log.commits[0] == {p0: 3, p1: 3, other: 0}  # the skip is committed before any poll
    assert sorted(i for batch in store.applied for i in batch) == [7, 8, 9, 10]  # none lost, none again
    assert projector.totals.skipped == 0


def test_a_relay_ahead_of_the_catch_up_or_a_partition_past_its_offset_leaves_the_positions_alone() -> None:
    for relay_at, at in ((7, 0), (6, 4)):
        log = PartitionedLog({0: [1, 3, 5, 7, 9]})
        tp = TopicPartition(topics.EVENTS, 0)
        log.at[tp] = at
        projector = Projector(log, RecordingStore(), catchup=FakeCatchUp(upto=6),  # type: ignore[arg-type]
                              losses=RelayLosses(relay_at=relay_at, acked={0: 2}))  # type: ignore[arg-type]
        projector.catch_up()
        assert log.at[tp] == at and log.commits == []


def test_after_a_loss_the_tail_folds_from_the_oldest_event_needed_each_once_up_to_the_relay() -> None:
    store, losses = RecordingStore(), RelayLosses()
    published = [8]
    log = PartitionedLog({0: []})
    tp = TopicPartition(topics.EVENTS, 0)
    projector = Projector(log, store, EventLog(20), published=lambda: published[0],  # type: ignore[arg-type]
                          sweep_every_s=3600.0, losses=losses)  # type: ignore[arg-type]
    losses.lose(republish_from=5)  # everything before 5 is folded

    projector.step()  # the loss: tailing from 4 on, its first page at once, up to the relay
    assert projector.tailing and store.positions[SWEEP] == 4 and not losses.pending
    assert [i for batch in store.applied for i in batch] == [5, 6, 7, 8]
    published[0] = 12
    projector.tail(limit=3)
    projector.tail(limit=3)
    assert [i for batch in store.applied for i in batch] == list(range(5, 13)) and projector.caught_up_to == 12

    log.logs[tp] += [9, 10, 11, 12]  # the broker's copies of what the tail folded: dropped, still tailing
    projector.step()
    assert projector.tailing and projector.totals.skipped == 4
    published[0] = 13
    log.logs[tp] += [13]  # past the tail: the broker carries on from here
    projector.step()
    assert not projector.tailing and store.positions[SWEEP] == 12
    assert sorted(i for batch in store.applied for i in batch) == list(range(5, 14))


def test_a_loss_with_no_known_start_sweeps_to_the_relay_now_instead_of_tailing() -> None:
    now = [100.0]
    projector = Projector(PartitionedLog({0: []}), RecordingStore(), EventLog(0), published=lambda: 7,
                          sweep_every_s=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    projector.after_loss(republish_from=0)
    assert not projector.tailing and projector.caught_up_to == 0
    assert projector.sweep_bound == 7 and projector._next_sweep == 100.0


def test_a_catch_up_that_ends_before_the_tail_or_the_sweep_moves_neither_back() -> None:
    store = RecordingStore()
    store.positions[SWEEP] = 10
    projector = Projector(PartitionedLog({0: []}), store, EventLog(12),  # type: ignore[arg-type]
                          catchup=FakeCatchUp(upto=6))  # type: ignore[arg-type]
    projector.caught_up_to = 9
    projector.catch_up()
    assert projector.caught_up_to == 9 and store.positions[SWEEP] == 10


@settings(max_examples=60, deadline=None)
@given(head=st.integers(1, 60), lost=st.sets(st.integers(1, 60)), limit=st.integers(1, 7),
       scan=st.integers(1, 25))
def test_the_sweep_folds_each_event_the_broker_never_delivered_once_and_stops_at_the_relay(
        head: int, lost: set[int], limit: int, scan: int) -> None:
    lost = {p for p in lost if p <= head}
    store = FoldingStore(set(range(1, head + 1)) - lost)
    now = [0.0]
    projector = Projector(PartitionedLog({0: []}), store, EventLog(head + 5), published=lambda: head,
                          sweep_every_s=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] = 30.0  # the first sweep is due
    projector.sweep_bound = head  # the relay's position at the previous sweep; the log goes on past it
    with patch("adapters.projector.SWEEP_SCAN", scan):
        for _ in range(2 * head + 2):  # each sweep moves its position on, at least by one
            if projector._next_sweep > 30.0:
                break
            projector.sweep(limit=limit)
    swept = [i for batch in store.applied for i in batch]
    assert sorted(swept) == sorted(set(swept)) and lost <= set(swept)  # every lost one, once
    assert all(p <= head for p in swept) and store.positions[SWEEP] == head  # never past the relay
    assert projector.swept == len(lost) and projector._next_sweep == 60.0  # then the next interval


class AskedStore(FoldingStore):
    """A ``FoldingStore`` that records each range the sweep asks it about."""

    def __init__(self, folded: set[int]) -> None:
        super().__init__(folded)
        self.asked: list[tuple[int, int]] = []

    def first_unfolded(self, events: Any, after: int, upto: int) -> int | None:
        self.asked.append((after, upto))
        return super().first_unfolded(events, after, upto)


def test_one_step_of_the_sweep_asks_the_database_about_at_most_sweep_scan_positions() -> None:
    store = AskedStore(set(range(1, 21)))  # nothing lost
    now = [0.0]
    projector = Projector(PartitionedLog({0: []}), store, EventLog(20), published=lambda: 20,  # type: ignore[arg-type]
                          sweep_every_s=30.0, clock=lambda: now[0])
    now[0] = 30.0  # the first sweep is due
    projector.sweep_bound = 20
    with patch("adapters.projector.SWEEP_SCAN", 5):
        assert projector.sweep() == 0
        assert store.asked == [(0, 5)] and store.positions[SWEEP] == 5 and projector._next_sweep == 30.0
        for _ in range(3):
            projector.sweep()
    assert store.asked == [(0, 5), (5, 10), (10, 15), (15, 20)] and store.positions[SWEEP] == 20
    assert store.applied == [] and projector._next_sweep == 60.0
