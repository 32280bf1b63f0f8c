"""Kafka producers and consumers configured for Palette (works on Apache Kafka and Tansu)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException
from kafka import KafkaConsumer
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from adapters.settings import Settings

logging.getLogger("kafka").setLevel(logging.WARNING)
log = logging.getLogger("palette.kafka")
# A group member's session. The embedded broker holds a JoinGroup for about half of it (measured
# on Tansu 0.6: 10 s -> 5.1 s, 6 s -> 3.0 s, 3 s -> 2.0 s), at every start and after it restarts
# (it forgot the group). Kept long all the same: a process on a loaded machine that misses its
# heartbeats for a short session is thrown out and rejoins, and the projector folds from the
# event log while it waits after a restart (adapters.projector), so the pause costs little lag.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_MS = 2000
# How old a member's metadata gets: a topic recreated under it shows within this (see GroupConsumer).
METADATA_MAX_AGE_MS = 5000


def keyed_partitioner(remember: int = 100_000) -> Any:
    """kafka-python's default partitioner (murmur2 of the key over the sorted partitions, the Java
    client's choice), its answer remembered per key while the topic's partition count holds: it
    sorts and lists the partitions on every send, a quarter of the relay's ``send`` (py-spy)."""
    from kafka.partitioner.default import DefaultPartitioner

    class KeyedPartitioner(DefaultPartitioner):  # type: ignore[misc]
        def __init__(self) -> None:
            self.chosen: dict[tuple[str, bytes], tuple[int, int]] = {}

        def partition(self, topic: str, key: Any, serialized_key: bytes | None, value: Any,
                      serialized_value: bytes | None, cluster: Any) -> int:
            partitions = cluster.partitions_for_topic(topic)
            if serialized_key is None or not partitions:  # random, or the default's error
                return int(super().partition(topic, key, serialized_key, value, serialized_value, cluster))
            seen = self.chosen.get((topic, serialized_key))
            if seen is not None and seen[0] == len(partitions):
                return seen[1]
            chosen = int(super().partition(topic, key, serialized_key, value, serialized_value, cluster))
            if len(self.chosen) >= remember:  # a bounded memory: most keys (streams) end
                self.chosen.clear()
            self.chosen[topic, serialized_key] = (len(partitions), chosen)
            return chosen

    return KeyedPartitioner()


def producer(settings: Settings, linger_ms: int = 5, batch_size: int = 256 * 1024) -> Any:
    """acks=all, one request in flight per connection: retries never reorder a stream (and may
    repeat a message, which every consumer takes as a duplicate)."""
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=settings.effective_kafka_bootstrap, acks="all", linger_ms=linger_ms,
        partitioner=keyed_partitioner(),
        batch_size=batch_size, max_in_flight_requests_per_connection=1, retries=5,
        request_timeout_ms=30000,
        # No idempotent producer: a broker that restarted empty does not know its producer id and
        # refuses every send (UnknownProducerId). Consumers are idempotent; one request in flight
        # keeps a stream's order on retries.
        enable_idempotence=False,
    )


class Delivery:
    """One message's acknowledgement, read as kafka-python's future is: ``get`` answers its
    ``partition`` and ``offset`` once delivered, and raises a ``kafka.errors.KafkaError`` when the
    broker refused it or did not answer in time (the error family the rest of Palette handles)."""

    __slots__ = ("_error", "_producer", "done", "offset", "partition")

    def __init__(self, producer: LogProducer) -> None:
        self._producer = producer
        self.partition = self.offset = -1
        self._error: str | None = None
        self.done = False

    def settle(self, error: Any, message: Any) -> None:  # librdkafka's delivery report
        if error is not None:
            self._error = f"{error.name()}: {error.str()}"
        else:
            self.partition, self.offset = message.partition(), message.offset()
        self.done = True

    def get(self, timeout: float | None = None) -> Delivery:
        if not self.done:
            self._producer.flush(timeout)
        if not self.done:
            raise KafkaTimeoutError(f"no acknowledgement within {timeout} s")
        if self._error is not None:
            raise KafkaError(self._error)
        return self


class LogProducer:
    """The relay's producer: librdkafka (``confluent-kafka``), with kafka-python's ``send`` /
    ``flush`` / ``close`` and futures (``Delivery``). A message costs the relay a few microseconds
    where kafka-python's pure-Python batching cost ~35 (its ``send`` was most of the relay's time).

    Same promises as ``producer``: acks=all, one request in flight per connection and no
    idempotence (see there), and the same partition for a key: librdkafka's ``murmur2_random``
    is the Java client's murmur2, as kafka-python's default partitioner is (a test compares them),
    so a stream's events stay on one partition across relays of either client."""

    def __init__(self, settings: Settings, linger_ms: int = 5, batch_size: int = 1024 * 1024,
                 delivery_timeout_ms: int = 30_000) -> None:
        from confluent_kafka import Producer

        self._producer = Producer({
            "bootstrap.servers": settings.effective_kafka_bootstrap, "acks": "all",
            "linger.ms": linger_ms, "batch.size": batch_size, "partitioner": "murmur2_random",
            "enable.idempotence": False, "max.in.flight.requests.per.connection": 1,
            "message.send.max.retries": 5, "request.timeout.ms": 30_000,
            # A message not acknowledged by then fails (its Delivery raises): the relay publishes
            # again from its saved position, as it does when kafka-python gave up.
            "message.timeout.ms": delivery_timeout_ms,
            # A broker back from a restart is found within a second (the default backs off to 10 s).
            "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 1000,
            "queue.buffering.max.messages": 200_000,
            "message.max.bytes": 1_048_576,  # kafka-python's max_request_size, as before
            "logger": log,  # librdkafka's lines (a broker away) into logging, not stderr
        })

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, str | bytes | None]] | None = None) -> Delivery:
        delivery = Delivery(self)
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=delivery.settle)
                return delivery
            except BufferError:  # the local queue is full: serve delivery reports until it is not
                self._producer.poll(0.05)
            except KafkaException as e:  # refused at once (a message too large): the relay's error family
                raise KafkaError(str(e)) from None

    def flush(self, timeout: float | None = None) -> None:
        """Until every message sent is acknowledged or failed (``timeout``: at most that long)."""
        self._producer.flush(-1 if timeout is None else timeout)

    def close(self, timeout: float = 30) -> None:
        self.flush(timeout)


# What a commit may meet while a group or its broker comes back: the records come again.
PASSING = (CommitFailedError, RebalanceInProgressError, UnknownMemberIdError, IllegalGenerationError)


if TYPE_CHECKING:
    from kafka import KafkaConsumer as _Consumer  # what the mixin's super() calls reach
else:
    _Consumer = object


class RewindsNewLogs(_Consumer):  # type: ignore[misc]
    """A consumer group's member that reads a topic the broker recreated from its start.

    A broker that restarted empty (memory storage) recreates its topics under new ids, but a
    member that lives through the restart keeps its offsets in the old log: kafka-python keeps
    a partition's position across a rebalance, and the embedded broker answers a fetch past
    the end of a log with nothing rather than OFFSET_OUT_OF_RANGE. So the member would wait,
    silently, until the new log grows past where it was, and skip everything before. Each
    poll and commit compares the topic ids in the client's metadata with those last seen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._topic_ids: dict[str, Any] = {}
        self._renewed: dict[str, Any] = {}  # topic -> the metadata update asked for after a rewind
        self.rewound: set[Any] = set()  # the partitions the last poll moved to the start

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        self.rewound = set()
        records = super().poll(*args, **kwargs)
        self.rewind_recreated()
        self.rewind_truncated()
        return records

    def seek(self, partition: Any, offset: int) -> None:
        """As kafka-python's, and the partition's last known log end is dropped: it came with
        records before the new position (``rewind_truncated`` would take it for a log that
        ends before it)."""
        super().seek(partition, offset)
        state = self._subscription.assignment.get(partition)
        if state is not None:
            state.highwater = None

    def rewind_truncated(self) -> bool:
        """Move to the start of every assigned partition of a topic one of whose logs now
        ends before this member's position (the broker's last fetch answer says so): the
        relay started the topic's log afresh (``adapters.rollover``), or the broker lost it.
        Each of its partitions is new then, not only that one: another may have grown past
        this member's position in it already, and would be read from there on, its start
        skipped, once the topic's new id (taken as it is after this) no longer tells.
        Returns whether it moved any."""
        assigned = self._subscription.assignment
        truncated = set()
        for tp, state in assigned.items():
            position = state.position if state.has_valid_position else None
            if position is not None and state.highwater is not None and position.offset > state.highwater:
                truncated.add(tp.topic)
        if not truncated:
            return False
        moved = [tp for tp in assigned if tp.topic in truncated]
        self.seek_to_beginning(*moved)
        self.rewound.update(moved)
        for topic in truncated:
            self._topic_ids.pop(topic, None)
            self._renewed[topic] = self._client.cluster.request_update()
        log.info("a log ended before this member's position: reading %d partition(s) of %s from the start",
                 len(moved), ", ".join(sorted(truncated)))
        return True

    def rewind_recreated(self) -> bool:
        """Move to the start of each assigned partition of a topic whose id changed since it
        was last seen; returns whether it moved any. What this member held came from the old
        log, so nothing is lost, and every consumer here takes what comes again as
        duplicates. (A partition not assigned now has no position to keep: when assigned, it
        starts from the group's offset in the new broker, or from the start.)"""
        cluster = self._client.cluster
        recreated: set[str] = set()
        for topic in self.subscription() or ():
            renewal = self._renewed.get(topic)
            if renewal is not None:  # rewound already: the id is taken once the metadata is new
                if not renewal.is_done:
                    continue
                del self._renewed[topic]
            now = cluster.topic_id(topic)
            if now is not None and self._topic_ids.setdefault(topic, now) != now:
                self._topic_ids[topic] = now
                recreated.add(topic)
        if not recreated:
            return False
        moved = [tp for tp in self.assignment() if tp.topic in recreated]
        if moved:
            self.seek_to_beginning(*moved)
            self.rewound.update(moved)
        for topic in recreated:
            log.warning("the broker recreated %s: reading %d partition(s) of it again from the start",
                        topic, sum(tp.topic == topic for tp in moved))
        return bool(moved)

    def commit(self, *args: Any, **kwargs: Any) -> None:
        """A group that no longer knows this member (a broker that restarted, a rebalance)
        or a broker not back yet refuses the commit (anything else raises): the records come
        again and every consumer here takes them as duplicates, so the process goes on and
        rejoins on its next poll instead of exiting. Nothing is committed when the topic was
        just found recreated: the offsets at hand point into the old log."""
        if self.rewind_recreated():
            return
        try:
            super().commit(*args, **kwargs)
        except KafkaError as e:
            if not (isinstance(e, PASSING) or e.retriable):  # a broker away, no coordinator yet
                raise
            log.warning("offsets not committed (%s); they come again", e)


class GroupConsumer(RewindsNewLogs, KafkaConsumer):  # type: ignore[misc]
    """kafka-python's consumer, reading a topic the broker recreated or started afresh from its
    start (RewindsNewLogs)."""


def consumer(settings: Settings, group_id: str, *topics: str, max_poll_records: int = 1000,
             fetch_max_wait_ms: int = 20) -> GroupConsumer:
    """Manual offset commits (after the database commit). The fetch wait bounds latency: new data
    does not wake a waiting fetch on the embedded broker, so latency-bound consumers keep it short."""
    return GroupConsumer(
        *topics, bootstrap_servers=settings.effective_kafka_bootstrap, group_id=group_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS,
        fetch_max_wait_ms=fetch_max_wait_ms, max_poll_records=max_poll_records,
        max_poll_interval_ms=300000, metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def end_offsets(consumer: Any, topic: str) -> dict[int, int]:
    """The next offset of each partition of ``topic``, asked of the broker by a consumer outside
    any group; empty when the topic does not exist."""
    from kafka import TopicPartition

    consumer.topics()  # fresh metadata: a restarted broker may have forgotten the topic
    partitions = consumer.partitions_for_topic(topic) or set()
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    return {tp.partition: int(offset) for tp, offset in ends.items()}


class TopicEnds:
    """The end offsets of one topic's partitions, asked of the broker (no consumer group)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from kafka import KafkaConsumer

        self.topic = topic
        self.consumer = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap,
                                      enable_auto_commit=False, request_timeout_ms=10000)

    def end_offsets(self) -> dict[int, int]:
        """The next offset of each partition; empty when the topic does not exist."""
        return end_offsets(self.consumer, self.topic)

    def close(self) -> None:
        self.consumer.close()
