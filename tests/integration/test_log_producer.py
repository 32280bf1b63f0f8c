"""The relay's producer (librdkafka) on the real broker: it keeps the promises of the kafka-python
producer it replaced — a key's partition, a partition's order, the headers — and reports a broker
that does not answer as the ``KafkaError`` the relay handles, within its delivery timeout."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError

from adapters import kafka_io
from adapters.settings import Settings
from infra.kafka_admin import ensure_topics


def fresh_topic(settings: Settings) -> str:
    topic = f"test.log-producer.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], settings.kafka_partitions)
    return topic


def test_a_key_goes_to_the_partition_kafka_pythons_partitioner_chooses(settings: Settings) -> None:
    """A stream's events stay on one partition whichever client published them (a relay of the
    other client before an upgrade, the dispatcher's producer): kafka-python's default
    partitioner, the oracle here, is an implementation of murmur2 of its own."""
    assert settings.kafka_partitions > 1  # else every key agrees trivially
    topic = fresh_topic(settings)
    keys = [uuid.uuid4().hex.encode() for _ in range(300)]
    ours = kafka_io.LogProducer(settings)
    theirs = kafka_io.producer(settings)
    try:
        mine = [ours.send(topic, key=k, value=b"v") for k in keys]
        ours.flush()
        other = [theirs.send(topic, key=k, value=b"v") for k in keys]
        theirs.flush()
        chosen = [d.get(timeout=30).partition for d in mine]
        assert chosen == [f.get(timeout=30).partition for f in other]
        assert len(set(chosen)) == settings.kafka_partitions  # 300 keys reach every partition
    finally:
        ours.close()
        theirs.close()


def test_one_keys_messages_come_back_in_order_with_their_offsets_and_headers(settings: Settings) -> None:
    topic = fresh_topic(settings)
    producer = kafka_io.LogProducer(settings)
    sent = [producer.send(topic, key=b"stream", value=b"%d" % i, headers=[("traceparent", b"t%d" % i)])
            for i in range(500)]
    producer.flush()
    acks = [d.get(timeout=30) for d in sent]
    producer.close()
    assert len({a.partition for a in acks}) == 1
    offsets = [a.offset for a in acks]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)

    consumer = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    try:
        tp = TopicPartition(topic, acks[0].partition)
        consumer.assign([tp])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
    finally:
        consumer.close()
    assert [r.value for r in got] == [b"%d" % i for i in range(500)]
    assert [r.offset for r in got] == offsets
    assert [dict(r.headers)["traceparent"] for r in got] == [b"t%d" % i for i in range(500)]


def test_a_broker_that_does_not_answer_fails_the_delivery_within_its_timeout(settings: Settings) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    producer = kafka_io.LogProducer(nowhere, delivery_timeout_ms=1500)
    delivery = producer.send("palette.events", key=b"k", value=b"v")
    with pytest.raises(KafkaError) as failed:
        delivery.get(timeout=20)
    # librdkafka's delivery report ended it, not the caller's wait (that raises KafkaTimeoutError)
    assert not isinstance(failed.value, KafkaTimeoutError) and "_MSG_TIMED_OUT" in str(failed.value), failed.value
    producer.close(timeout=1)
