"""The relay's watch on the broker: a log that restarted below an acknowledged offset, or that
ends before one, is a loss; the relay then publishes again from the oldest event still needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError

from adapters.relay import LossWatch


class FakeConnection:
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield


class FakeState:
    conn = FakeConnection()

    def __init__(self, acked: dict[int, int] | None = None) -> None:
        self.acked = dict(acked or {})
        self.saved: list[tuple[int, dict[int, int]]] = []
        self.losses: list[int] = []
        self.position = 0

    def acked_offsets(self, name: str) -> dict[int, int]:
        return dict(self.acked)

    def save_acked(self, name: str, position: int, offsets: dict[int, int]) -> None:
        self.saved.append((position, dict(offsets)))
        self.acked.update(offsets)  # as the table's upsert: a partition not given keeps what it had

    def record_loss(self, name: str, republish_from: int) -> None:
        self.losses.append(republish_from)

    def forget_acked(self, name: str) -> None:
        self.acked = {}

    def save(self, name: str, position: int) -> None:
        self.position = position


class FakeBroker:
    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends

    def end_offsets(self) -> dict[int, int]:
        return dict(self.ends)


def watch(state: FakeState, broker: FakeBroker, oldest: int = 41) -> LossWatch:
    now = [0.0]
    return LossWatch(broker, lambda: oldest, state, "relay", probe_every_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]


def test_acknowledgements_that_only_grow_are_no_loss_and_are_saved_with_the_position() -> None:
    state = FakeState()
    w = watch(state, FakeBroker({}))
    assert not w.on_acks([(0, 0), (1, 0), (0, 1)])
    assert not w.on_acks([(0, 2), (1, 1)])
    w.save(9)
    assert state.saved == [(9, {0: 2, 1: 1})]


def test_an_acknowledgement_at_or_below_one_before_it_is_a_restarted_log() -> None:
    w = watch(FakeState({0: 5, 1: 3}), FakeBroker({}))
    assert w.on_acks([(0, 0)])


def test_a_relay_that_restarted_still_sees_an_emptied_partition_it_had_acknowledged() -> None:
    state = FakeState({0: 5, 1: 3})
    assert watch(state, FakeBroker({0: 6, 1: 4})).probe(force=True) is False
    # Tansu answers the end of its last batch: a partition ending "before" offset 3 holds data
    assert watch(state, FakeBroker({0: 1, 1: 1})).probe(force=True) is False
    assert watch(state, FakeBroker({0: 6, 1: 0})).probe(force=True) is True  # partition 1 is empty
    assert watch(state, FakeBroker({})).probe(force=True) is True  # the topic itself is gone


def test_while_running_two_probes_in_a_row_must_see_the_emptied_partition() -> None:
    broker = FakeBroker({0: 6, 1: 0})
    w = watch(FakeState({0: 5, 1: 3}), broker)
    w.probe_every_s = 0.0
    assert w.probe() is False  # a broker still starting may answer without the topic
    assert w.probe() is True
    broker.ends = {0: 6, 1: 4}
    assert w.probe() is False and w.probe() is False


def test_recovery_records_the_loss_forgets_the_offsets_and_rewinds_before_the_oldest_needed() -> None:
    state = FakeState({0: 5})
    w = watch(state, FakeBroker({}), oldest=41)
    assert w.recover() == 40
    assert state.losses == [41] and state.position == 40 and w.acked == {} and state.acked == {}
    assert not w.on_acks([(0, 0)])  # the new log starts afresh


def test_the_probe_asks_the_broker_at_most_once_per_interval() -> None:
    asked = []

    class Counting(FakeBroker):
        def end_offsets(self) -> dict[int, int]:
            asked.append(1)
            return {0: 10}

    w = watch(FakeState({0: 5}), Counting({}))
    assert [w.probe(), w.probe(), w.probe()] == [False, False, False] and len(asked) == 1


def test_an_acknowledgement_equal_to_the_last_one_is_a_restarted_log_too() -> None:
    """One offset holds one record: the broker handing out an offset it had acknowledged before
    has lost the record that offset held."""
    w = watch(FakeState({0: 5}), FakeBroker({}))
    assert w.on_acks([(0, 5)])


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5))
def test_the_acknowledged_ends_are_how_many_records_each_partition_took(partitions: list[int], batch: int) -> None:
    """Offsets count records from 0 on each partition, so a group that read everything the relay
    published has committed exactly this many (the oracle: a count of the records sent)."""
    w = watch(FakeState(), FakeBroker({}))
    next_offset: dict[int, int] = {}
    acks = []
    for p in partitions:
        acks.append((p, next_offset.get(p, 0)))
        next_offset[p] = next_offset.get(p, 0) + 1
    for i in range(0, len(acks), batch):
        assert not w.on_acks(acks[i:i + batch])
    assert w.ends() == {p: partitions.count(p) for p in set(partitions)}


def test_two_probes_that_see_an_emptied_partition_must_follow_each_other() -> None:
    """A probe that finds the partition again clears the suspicion: two broker answers without the
    topic a while apart (each a broker still starting, say) are no loss."""
    broker = FakeBroker({0: 0})
    w = watch(FakeState({0: 5}), broker)
    w.probe_every_s = 0.0
    assert w.probe() is False
    broker.ends = {0: 6}
    assert w.probe() is False
    broker.ends = {0: 0}
    assert w.probe() is False and w.probe() is True


class Away(FakeBroker):
    def __init__(self, error: Exception) -> None:
        super().__init__({})
        self.error = error

    def end_offsets(self) -> dict[int, int]:
        raise self.error


@pytest.mark.parametrize("error", [KafkaTimeoutError("no answer"), ConnectionRefusedError("refused")])
def test_a_probe_the_broker_does_not_answer_is_no_loss(error: Exception) -> None:
    assert watch(FakeState({0: 5}), Away(error)).probe(force=True) is False
