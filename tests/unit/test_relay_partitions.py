"""The producers' partitioner: every key goes where kafka-python's default partitioner (the Java
client's murmur2) sends it, whatever it remembers, so a stream keeps its partition (and its
order) across a relay restart, a client change or a topic with more partitions."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.partitioner.default import DefaultPartitioner

from adapters.kafka_io import keyed_partitioner


class Cluster:
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self.partitions = partitions

    def topics(self) -> set[str]:
        return set(self.partitions)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions.get(topic)

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions.get(topic, set())


@given(keys=st.lists(st.uuids().map(lambda u: str(u).encode()), min_size=1, max_size=50),
       counts=st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_each_key_goes_where_the_default_partitioner_sends_it(keys: list[bytes], counts: list[int]) -> None:
    ours, default = keyed_partitioner(remember=16), DefaultPartitioner()
    for count in counts:  # the topic grows (or is made again) between rounds
        cluster = Cluster({"t": set(range(count))})
        for key in [*keys, *keys]:  # the second time from memory
            assert ours.partition("t", None, key, None, b"", cluster) == \
                default.partition("t", None, key, None, b"", cluster)


def test_a_message_without_key_still_gets_a_partition_of_its_topic() -> None:
    cluster = Cluster({"t": {0, 1, 2}})
    assert keyed_partitioner().partition("t", None, None, None, b"", cluster) in {0, 1, 2}


def test_a_topic_it_does_not_know_is_refused_as_the_default_refuses_it() -> None:
    with pytest.raises(ValueError, match="not found"):
        keyed_partitioner().partition("gone", None, uuid.uuid4().bytes, None, b"", Cluster({}))
