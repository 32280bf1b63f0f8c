"""kafka_io's group consumer deciding what to read again from the start, on a stand-in for
kafka-python's consumer state (the parts the decision reads: assigned partitions with their
positions and last known log ends, the cluster metadata's topic ids). The real broker's cases
are tests/integration/test_log_rollover.py."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
)
from kafka.structs import OffsetAndMetadata

from adapters import kafka_io


class Partition:
    def __init__(self, position: int | None, highwater: int | None) -> None:
        self.position = None if position is None else OffsetAndMetadata(position, "", -1)
        self.highwater = highwater

    @property
    def has_valid_position(self) -> bool:
        return self.position is not None


class Update:
    is_done = False


class Cluster:
    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.updates: list[Update] = []

    def request_update(self) -> Update:
        self.updates.append(Update())
        return self.updates[-1]

    def topic_id(self, topic: str) -> str | None:
        return self.ids.get(topic)


class Client:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster


class Subscription:
    def __init__(self) -> None:
        self.assignment: OrderedDict[TopicPartition, Partition] = OrderedDict()


class StandIn:
    """kafka.KafkaConsumer as far as GroupConsumer uses it; seek_to_beginning leaves a partition
    awaiting its reset (no valid position), as kafka-python does."""

    def __init__(self, *topics: str, **_: Any) -> None:
        self._topics = topics
        self._subscription = Subscription()
        self._client = Client(Cluster({t: f"{t}-old" for t in topics}))
        self.committed: dict[TopicPartition, int] = {}

    def subscription(self) -> set[str]:
        return set(self._topics)

    def assignment(self) -> set[TopicPartition]:
        return set(self._subscription.assignment)

    def poll(self, *_: Any, **__: Any) -> dict[Any, Any]:
        return {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._subscription.assignment[tp].position = OffsetAndMetadata(offset, "", -1)

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self._subscription.assignment[tp].position = None

    def commit(self, *_: Any, **__: Any) -> None:
        self.committed.update({tp: p.position.offset for tp, p in self._subscription.assignment.items()
                               if p.position is not None})


class Member(kafka_io.RewindsNewLogs, StandIn):
    """GroupConsumer's decisions on the stand-in instead of kafka-python's consumer."""


@pytest.fixture
def member() -> Any:
    consumer = Member("events", "other")
    consumer.poll()  # the topic ids as they are now
    return consumer


def reset_to_start(member: Any) -> None:
    """What kafka-python does for partitions awaiting a reset to the earliest offset."""
    for state in member._subscription.assignment.values():
        if state.position is None:
            state.position = OffsetAndMetadata(0, "", -1)


def test_one_partition_ending_before_the_position_sends_every_partition_of_its_topic_back(member: Any) -> None:
    assigned = member._subscription.assignment
    assigned[TopicPartition("events", 0)] = Partition(100, 5)  # the new log ends before it
    assigned[TopicPartition("events", 1)] = Partition(10, 30)  # the new log grew past it already
    assigned[TopicPartition("other", 0)] = Partition(7, 9)  # another topic, not started afresh
    member.poll()
    assert member.rewound == {TopicPartition("events", 0), TopicPartition("events", 1)}
    assert [tp for tp, p in assigned.items() if p.has_valid_position] == [TopicPartition("other", 0)]
    member.commit()
    assert member.committed == {TopicPartition("other", 0): 7}  # nothing of the old log's positions
    # The new id is taken once the metadata asked for is in, with no second rewind.
    member._client.cluster.ids["events"] = "events-new"
    reset_to_start(member)
    member.poll()
    assert member.rewound == set()
    member._client.cluster.updates[-1].is_done = True
    member.poll()
    assert member.rewound == set()
    assert member._topic_ids["events"] == "events-new"
    assert assigned[TopicPartition("events", 1)].position.offset == 0


def test_a_topic_id_that_changed_sends_its_partitions_back_without_a_short_log(member: Any) -> None:
    assigned = member._subscription.assignment
    assigned[TopicPartition("events", 0)] = Partition(40, 60)
    assigned[TopicPartition("other", 0)] = Partition(7, 9)
    member._client.cluster.ids["events"] = "events-new"
    member.poll()
    assert member.rewound == {TopicPartition("events", 0)}
    member.commit()
    assert member.committed == {TopicPartition("other", 0): 7}  # not the old log's 40


def test_a_commit_that_finds_the_topic_id_changed_commits_nothing(member: Any) -> None:
    assigned = member._subscription.assignment
    assigned[TopicPartition("events", 0)] = Partition(40, 60)
    member.poll()
    member._client.cluster.ids["events"] = "events-new"  # seen by the commit, after the poll
    member.commit()  # the positions at hand point into the old log
    assert member.committed == {}
    assert member.rewound == {TopicPartition("events", 0)}


def test_positions_within_their_logs_are_left_alone(member: Any) -> None:
    assigned = member._subscription.assignment
    assigned[TopicPartition("events", 0)] = Partition(5, 5)  # at the end
    assigned[TopicPartition("events", 1)] = Partition(3, None)  # no fetch answer yet
    assigned[TopicPartition("events", 2)] = Partition(None, 2)  # awaiting a reset
    member.poll()
    assert member.rewound == set()
    member.commit()
    assert member.committed == {TopicPartition("events", 0): 5, TopicPartition("events", 1): 3}


def test_a_seek_past_the_last_known_log_end_is_not_taken_for_a_log_that_ended(member: Any) -> None:
    """The projector moves a partition past what a catch-up folded, ahead of the log end its last
    fetch saw: the next poll keeps that position instead of reading the whole log again."""
    tp = TopicPartition("events", 0)
    member._subscription.assignment[tp] = Partition(5, 10)
    member.seek(tp, 20)
    member.poll()
    assert member._subscription.assignment[tp].position.offset == 20 and not member.rewound


class Refusing(StandIn):
    """A consumer whose commits the group refuses with ``error``."""

    error: Exception = KafkaError()

    def commit(self, *_: Any, **__: Any) -> None:
        raise self.error


class RefusedMember(kafka_io.RewindsNewLogs, Refusing):
    pass


@pytest.mark.parametrize("error", [RebalanceInProgressError(), NodeNotReadyError(), KafkaTimeoutError()])
def test_a_commit_a_rebalance_or_a_broker_not_back_refuses_passes_and_the_records_come_again(
        error: Exception) -> None:
    member = RefusedMember("events")
    member.error = error
    member.poll()
    member.commit()


def test_a_commit_refused_for_any_other_reason_raises() -> None:
    member = RefusedMember("events")
    member.error = TopicAuthorizationFailedError()
    member.poll()
    with pytest.raises(TopicAuthorizationFailedError):
        member.commit()
