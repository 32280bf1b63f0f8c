"""The relay's pipeline: the next batch is read and sent while the previous one is acknowledged,
and a saved position never covers an event the broker has not acknowledged."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka.errors import KafkaError, KafkaTimeoutError

from adapters.kafka_io import Delivery
from adapters.relay import LossWatch, Relay
from projections.stored_events import from_notification
from tests.unit.test_broker_loss import FakeBroker, FakeState
from tests.unit.test_read_side_faults import Stored


class Recorder:
    def __init__(self, count: int) -> None:
        stream = uuid.uuid4()
        state = json.dumps({"timestamp": "2026-01-01T00:00:00+00:00"}).encode()
        self.log = [Stored(i, stream, i, "domain.job:Job.ItemCompleted", state) for i in range(1, count + 1)]

    def select_notifications(self, start: int, limit: int, topics: Sequence[str] = ()) -> list[Stored]:
        return [n for n in self.log if n.id >= start and (not topics or n.topic in topics)][:limit]


class App:
    def __init__(self, count: int) -> None:
        self.recorder = Recorder(count)
        self.mapper = self  # the relay asks for app.mapper.transcoder; plain JSON needs none
        self.transcoder = None


@dataclass
class Meta:
    partition: int
    offset: int


class Broker:
    """Acknowledges what was sent once flushed, with growing offsets on one partition (or, once
    ``restart_after`` records are in, from offset 0 again: a log that restarted); a future asked
    before that has not been acknowledged, and says so."""

    def __init__(self, restart_after: int | None = None) -> None:
        self.timeline: list[tuple[str, int]] = []  # ("send", event id) / ("flush", 0) / ("save", position)
        self.pending: list[Future] = []
        self.acked: list[int] = []
        self.restart_after = restart_after

    def send(self, topic: str, key: bytes, value: bytes, headers: Any = None) -> Future:
        future = Future(self, json.loads(value)["id"])
        self.timeline.append(("send", future.event))
        self.pending.append(future)
        return future

    def flush(self) -> None:
        self.timeline.append(("flush", 0))
        for future in self.pending:
            offset = len(self.acked)
            if self.restart_after is not None and offset >= self.restart_after:
                offset -= self.restart_after
            future.meta = Meta(0, offset)
            self.acked.append(future.event)
        self.pending = []

    def close(self) -> None:
        pass


class Future:
    def __init__(self, broker: Broker, event: int) -> None:
        self.event = event
        self.meta: Meta | None = None
        self.error: KafkaError | None = None

    def get(self, timeout: float | None = None) -> Meta:
        if self.error is not None:
            raise self.error
        assert self.meta is not None, f"event {self.event} was waited for before it was flushed"
        return self.meta


class Positions:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.saved = 0

    def get(self, name: str) -> int:
        return self.saved

    def save(self, name: str, position: int) -> None:
        assert set(range(1, position + 1)) <= set(self.broker.acked), f"position {position} saved before its acks"
        self.broker.timeline.append(("save", position))
        self.saved = position


def relay(events: int, broker: Broker, batch_size: int = 2) -> tuple[Relay, Positions]:
    positions = Positions(broker)
    return Relay(App(events), broker, positions, batch_size=batch_size), positions


def test_a_saved_position_only_ever_covers_acknowledged_events() -> None:
    broker = Broker()
    r, positions = relay(5, broker)
    position = 0
    for _ in range(4):  # three batches, then an empty read that drains the last one
        position = r.step(position)
    assert position == 5 and positions.saved == 5 and r.acked == 5 and r.published == 5
    assert broker.acked == [1, 2, 3, 4, 5]  # in order, each once


def test_the_next_batch_is_sent_before_the_previous_ones_position_is_saved() -> None:
    broker = Broker()
    r, _ = relay(4, broker)
    r.step(r.step(0))
    # batch 1 (events 1, 2) flushed and acknowledged, batch 2 sent, then batch 1's position saved
    assert broker.timeline == [("send", 1), ("send", 2), ("flush", 0), ("send", 3), ("send", 4), ("save", 2)]
    r.drain()
    assert broker.timeline[-2:] == [("flush", 0), ("save", 4)]


def test_after_a_lost_acknowledgement_it_sends_nothing_more_and_saves_nothing() -> None:
    broker = Broker(restart_after=2)  # the third record is acknowledged at offset 0 again
    positions = Positions(broker)
    state = FakeState()
    loss = LossWatch(FakeBroker({}), lambda: 1, state, "relay")  # type: ignore[arg-type]
    r = Relay(App(6), broker, positions, batch_size=2, loss=loss)
    position = r.step(r.step(0))  # batch 1 acknowledged (saved with its offsets), batch 2 sent
    assert state.saved == [(2, {0: 1})]
    assert r.step(position) == position  # batch 2's acks restart the log: batch 3 is not sent
    assert r._lost and [e for kind, e in broker.timeline if kind == "send"] == [1, 2, 3, 4]
    assert state.saved == [(2, {0: 1})]


@pytest.mark.parametrize("events", [1, 2, 3, 7])
def test_every_event_is_published_once_whatever_the_batch_boundaries(events: int) -> None:
    broker = Broker()
    r, positions = relay(events, broker, batch_size=3)
    position = 0
    while (after := r.step(position)) != position:  # an empty read drains the last batch
        position = after
    assert broker.acked == list(range(1, events + 1)) and positions.saved == events


def test_a_jobs_milestone_is_logged_once_acknowledged_with_its_trace(caplog: pytest.LogCaptureFixture) -> None:
    """The relay's lines for a job's milestones come from the rows and messages it sent (no second
    decode): the job, the event's position and its trace id, after the broker acknowledged it;
    the measurement hook gets the envelopes as stored."""
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    app = App(3)
    job = app.recorder.log[0].originator_id
    app.recorder.log[1] = Stored(2, job, 2, "domain.job:Job.JobQueued", json.dumps(
        {"timestamp": "2026-01-01T00:00:01+00:00", "protect": [], "_trace": traceparent}).encode())
    seen: list[Any] = []
    broker = Broker()
    r = Relay(app, broker, Positions(broker), batch_size=3, on_acked=seen.extend)
    with caplog.at_level(logging.INFO, logger="palette.relay"):
        position = r.step(0)
        assert not [rec for rec in caplog.records if rec.getMessage().startswith("published")]  # not acked yet
        r.step(position)
    lines = [rec for rec in caplog.records if rec.getMessage().startswith("published")]
    assert [rec.getMessage() for rec in lines] == [f"published JobQueued of job {job} (event 2)"]
    assert (lines[0].job_id, lines[0].trace_id) == (str(job), trace_id)  # type: ignore[attr-defined]
    assert seen == [from_notification(n, None) for n in app.recorder.log]
    assert seen[1].trace == traceparent and "_trace" not in seen[1].data


class FlakyBroker(Broker):
    """Fails the ``failing`` flushes (counted from 1): what they were to acknowledge raises and is
    not acknowledged. Sets ``stop`` once ``last`` is sent, or after ``most`` sends in all (a relay
    that never gets there)."""

    def __init__(self, stop: threading.Event, last: int, failing: tuple[int, ...] = (), most: int = 100) -> None:
        super().__init__()
        self.stop, self.last, self.failing, self.most = stop, last, failing, most
        self.flushes = self.sends = 0

    def send(self, topic: str, key: bytes, value: bytes, headers: Any = None) -> Future:
        future = super().send(topic, key, value, headers)
        self.sends += 1
        if future.event == self.last or self.sends >= self.most:
            self.stop.set()
        return future

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes in self.failing:
            self.timeline.append(("flush", 0))
            for future in self.pending:
                future.error = KafkaTimeoutError("no acknowledgement")
            self.pending = []
        else:
            super().flush()


def test_a_batch_the_broker_did_not_acknowledge_is_published_again_from_the_saved_position() -> None:
    stop = threading.Event()
    broker = FlakyBroker(stop, last=7, failing=(2,))  # batch 2's acknowledgement fails (events 3, 4)
    positions = Positions(broker)  # asserts that a saved position only covers acknowledged events
    relay = Relay(App(7), broker, positions, batch_size=2)
    relay.run(stop, idle_s=0.0, max_idle_s=0.0)
    assert positions.saved == 7 and set(broker.acked) == set(range(1, 8))
    assert broker.acked == sorted(broker.acked)  # in order: the failed batch first, again


def test_on_stop_what_was_sent_is_acknowledged_and_its_position_saved() -> None:
    stop = threading.Event()
    broker = FlakyBroker(stop, last=5)  # stop as the last batch leaves
    positions = Positions(broker)
    Relay(App(5), broker, positions, batch_size=2).run(stop, idle_s=0.0, max_idle_s=0.0)
    assert positions.saved == 5 and broker.acked == [1, 2, 3, 4, 5]


class Rollover:
    """``LogRollover`` as the relay drives it, always due and read by every group: each fresh start
    records what was still unacknowledged and what the loss watch still held, then stops the relay."""

    missing = False

    def __init__(self, broker: Broker, loss: LossWatch, stop: threading.Event) -> None:
        self.broker, self.loss, self.stop = broker, loss, stop
        self.starts: list[tuple[list[int], dict[int, int]]] = []

    def count(self, partitions: Any) -> None:
        pass

    def due(self, ends: dict[int, int]) -> bool:
        return True

    def read_by_all(self, ends: dict[int, int]) -> bool:
        return True

    def start_afresh(self) -> None:
        self.starts.append(([f.event for f in self.broker.pending], dict(self.loss.acked)))
        self.stop.set()

    def postpone(self, why: str) -> None:
        pass


def test_the_log_starts_afresh_only_with_nothing_in_flight_and_its_old_offsets_forgotten() -> None:
    """A batch still in flight would land in the log about to be deleted, read by no one; offsets
    of the old log kept would make the new log's first acknowledgements look like a loss."""
    stop = threading.Event()
    broker = FlakyBroker(stop, last=0)
    state = FakeState()
    loss = LossWatch(FakeBroker({0: 6}), lambda: 1, state, "relay")  # type: ignore[arg-type]
    rollover = Rollover(broker, loss, stop)
    relay = Relay(App(6), broker, Positions(broker), batch_size=2, loss=loss, rollover=rollover)  # type: ignore[arg-type]
    relay.run(stop, idle_s=0.0, max_idle_s=0.0)
    assert rollover.starts == [([], {})]
    assert broker.acked == [1, 2, 3, 4, 5, 6] and state.saved[-1][0] == 6 and state.acked == {}


class Refused:
    """librdkafka's error in a delivery report."""

    def name(self) -> str:
        return "MSG_SIZE_TOO_LARGE"

    def str(self) -> str:
        return "Broker: Message size too large"


class Delivered:
    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41


class Flushing:
    def flush(self, timeout: float | None = None) -> None:
        pass


def test_a_delivery_the_broker_refused_raises_why_and_one_it_acknowledged_answers_where() -> None:
    refused, delivered, pending = (Delivery(Flushing()) for _ in range(3))  # type: ignore[arg-type]
    refused.settle(Refused(), None)
    delivered.settle(None, Delivered())
    with pytest.raises(KafkaError, match="MSG_SIZE_TOO_LARGE"):
        refused.get(timeout=1)
    assert (delivered.get(timeout=1).partition, delivered.offset) == (3, 41)
    with pytest.raises(KafkaTimeoutError):
        pending.get(timeout=0.01)  # not acknowledged: never taken for delivered


def test_a_standby_relay_publishes_nothing_until_it_leads() -> None:
    stop = threading.Event()
    broker = FlakyBroker(stop, last=3)

    def lead(name: str) -> bool:  # another relay leads at the first ask, not at the second
        broker.timeline.append(("lead", 0))
        return broker.timeline.count(("lead", 0)) == 2

    Relay(App(3), broker, Positions(broker), batch_size=2, lead=lead).run(stop, idle_s=0.0, max_idle_s=0.0)
    assert broker.timeline[:3] == [("lead", 0), ("lead", 0), ("send", 1)] and broker.acked == [1, 2, 3]


def test_a_standby_that_takes_over_compares_the_broker_with_the_offsets_the_leader_left() -> None:
    """A standby reads the acknowledged offsets when it takes over, not when it started: the
    leader may have started the log afresh (or recorded a loss) meanwhile, forgetting its old
    offsets, and the new log's first acknowledgements are no loss."""
    stop = threading.Event()
    broker = FlakyBroker(stop, last=3)
    state = FakeState({0: 100})  # the leader's offsets in the old log as the standby starts
    loss = LossWatch(FakeBroker({0: 6}), lambda: 1, state, "relay")  # type: ignore[arg-type]

    def lead(name: str) -> bool:  # the leader starts the log afresh, then goes
        if state.acked:
            state.forget_acked(name)
            return False
        return True

    Relay(App(3), broker, Positions(broker), batch_size=2, loss=loss, lead=lead).run(stop, idle_s=0.0, max_idle_s=0.0)
    assert state.losses == [] and broker.acked == [1, 2, 3] and state.saved[-1] == (3, {0: 2})


def test_an_idle_relay_records_its_last_batch_once() -> None:
    """Each empty read drains what is in flight: the batch acknowledged by the first is not taken
    again by the next (its offsets would come back as a log that restarted)."""
    broker = Broker()
    state = FakeState()
    loss = LossWatch(FakeBroker({0: 3}), lambda: 1, state, "relay")  # type: ignore[arg-type]
    r = Relay(App(3), broker, Positions(broker), batch_size=3, loss=loss)
    position = r.step(0)
    for _ in range(3):
        assert r.step(position) == position
    assert not r._lost and r.published == 3 and state.saved == [(3, {0: 2})]


def test_a_lost_acknowledgement_seen_as_the_last_batch_drains_saves_nothing() -> None:
    broker = Broker(restart_after=2)  # batch 2 is acknowledged at offsets 0 and 1 again
    state = FakeState()
    loss = LossWatch(FakeBroker({}), lambda: 1, state, "relay")  # type: ignore[arg-type]
    r = Relay(App(4), broker, Positions(broker), batch_size=2, loss=loss)
    position = r.step(r.step(0))
    assert r.step(position) == position and r._lost  # nothing more to read: batch 2 is drained
    assert state.saved == [(2, {0: 1})]


class Idle:
    """The relay's wakeup: it idles here (``then`` runs at each wait); a relay still idle after
    ``most`` waits is stopped (one that never gets on)."""

    def __init__(self, stop: threading.Event, then: Any = None, most: int = 20) -> None:
        self.stop, self.then, self.most = stop, then, most
        self.waits = 0

    def wait(self, timeout_s: float) -> bool:
        self.waits += 1
        if self.then is not None:
            self.then()
        if self.waits >= self.most:
            self.stop.set()
        return False


@pytest.mark.parametrize("postponed", [False, True])
def test_a_lost_tail_is_recorded_once_and_what_is_still_needed_published_again_before_anything_new(
        postponed: bool) -> None:
    """The broker restarted empty under load (batch 2 comes back at offsets 0 and 1): the relay
    records the loss once and publishes again from the oldest event a consumer needs, sending
    nothing new before; a broker that does not answer the recovery yet postpones it, the loss
    still known (the new log's next offsets would be above the old ones: nothing else tells)."""
    stop = threading.Event()
    broker = FlakyBroker(stop, last=6)
    broker.restart_after = 2
    state = FakeState()
    asked: list[int] = []

    def republish_from() -> int:
        asked.append(1)
        if len(asked) >= 5:  # a relay that recovers again and again
            stop.set()
        if postponed and len(asked) == 1:
            raise KafkaTimeoutError("the broker is not back")
        return 2

    loss = LossWatch(FakeBroker({0: 6}), republish_from, state, "relay")  # type: ignore[arg-type]
    relay = Relay(App(6), broker, Positions(broker), batch_size=2, loss=loss, wakeup=Idle(stop))
    relay.run(stop, idle_s=0.0, max_idle_s=0.0)
    assert state.losses == [2] and loss.losses == 1
    assert [e for kind, e in broker.timeline if kind == "send"] == [1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert state.saved[-1][0] == 6


@pytest.mark.parametrize(("events", "emptied_at_start"), [(6, True), (4, False)])
def test_a_broker_found_empty_is_a_loss_recorded_before_anything_more_is_sent(
        events: int, emptied_at_start: bool) -> None:
    """The relay had published events 1 to 4 (offsets 0 to 3) when the broker came back empty:
    found so as the relay starts (new events waiting), or by its probe while it idles, the loss
    is recorded and the events still needed (from 2) are published again first."""
    stop = threading.Event()
    broker = FlakyBroker(stop, last=events)
    state = FakeState({0: 3})
    ends = FakeBroker({0: 0} if emptied_at_start else {0: 4})

    def empty() -> None:
        ends.ends = {0: 0}

    loss = LossWatch(ends, lambda: 2, state, "relay", probe_every_s=0.0)  # type: ignore[arg-type]
    positions = Positions(broker)
    positions.saved = 4
    relay = Relay(App(events), broker, positions, batch_size=2, loss=loss, wakeup=Idle(stop, then=empty))
    relay.run(stop, idle_s=0.0, max_idle_s=0.0)
    assert state.losses == [2]
    assert [e for kind, e in broker.timeline if kind == "send"] == list(range(2, events + 1))


def test_a_standby_stopped_before_it_leads_leaves_the_log_alone() -> None:
    """Stopped while another relay publishes: no loss recorded, no position saved, nothing sent,
    though the broker looks emptied (the leader's to handle)."""
    stop = threading.Event()
    broker = FlakyBroker(stop, last=3)
    state = FakeState({0: 5})
    loss = LossWatch(FakeBroker({}), lambda: 1, state, "relay")  # type: ignore[arg-type]

    def lead(name: str) -> bool:
        stop.set()
        return False

    Relay(App(3), broker, Positions(broker), batch_size=2, loss=loss, lead=lead).run(stop, idle_s=0.0, max_idle_s=0.0)
    assert state.losses == [] and state.position == 0 and state.saved == [] and broker.timeline == []


def test_the_ack_latency_observed_is_that_of_the_batchs_oldest_event() -> None:
    app = App(3)
    now = datetime.now(UTC)
    for i, n in enumerate(app.recorder.log):  # decided 300, 200 and 100 s ago
        state = json.dumps({"timestamp": (now - timedelta(seconds=100 * (3 - i))).isoformat()}).encode()
        app.recorder.log[i] = Stored(n.id, n.originator_id, n.originator_version, n.topic, state)
    broker = Broker()
    r = Relay(app, broker, Positions(broker), batch_size=3)
    seen: list[float] = []
    r.observe_ack = seen.append
    r.step(r.step(0))
    assert len(seen) == 1 and 300 <= seen[0] < 400
