"""The broker's log of ``palette.events`` started afresh once every consumer has read it.

The embedded broker (Tansu 0.6, memory or S3 storage) finds a fetch's records by listing every
record batch the partition holds: a fetch costs ~0.6 µs per batch the partition ever took
(``python -m tests.bench.broker_growth``), so under steady load the broker's CPU grows with its
age until projection lag does too. It has no retention and no DeleteRecords (its storage panics
on one). The event store is the source of truth and every consumer of the log tells where it is
in it by committed offsets, so the relay, its only producer, deletes and creates the topic again
at a moment when nothing in it is still needed: between two of its batches, once the longest
partition has taken ``every_batches`` batches and each consumer group of the topic that has
members or committed offsets has committed up to the end of what the relay published. A group
that is behind, joining, or stopped with offsets postpones it, and so does one seen reading the
topic before (the broker forgets a group's offsets with the topic), kept in the relay's
PostgreSQL state (``palette_relay.log_readers``) across its restarts: the dispatcher, stopped
across one fresh start, would otherwise lose to a second the ``JobQueued`` published between the
two, and its jobs wait for its stale sweep. A group never seen reading does not hold it (never
started: what it missed reaches it through its own sweep of the event store, as after a broker
that restarted empty); a group retired for good is let go by deleting its row.

The consumers see the new log at their next fetch: it ends before their position, and
``kafka_io``'s group consumer reads every partition of the topic it is assigned again from its
start. Each partition of the old log held at least ``min_messages``, so the new one, published to
from offset 0, passes a member's old position only if that member fetched nothing for as long as
that many messages take to arrive; the topic id it later sees changed makes it read the new log
from the start then (duplicates, which every consumer takes).

The broker makes a topic that a client's metadata request names, with its default partition
count (4): a consumer polling between the delete and the create makes it first. The create is
followed by a count of the topic's partitions, and an empty topic of the wrong count is deleted
and made again (``KafkaLogAdmin``)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

log = logging.getLogger("palette.rollover")  # in the relay and the dispatcher
POLL_S = 0.02  # between two looks at the groups' offsets while the relay waits for them
MAKE_TRIES = 5  # deletes and creates of a topic the broker made with its default partition count
SEEN_TRIES = 20  # looks at the metadata, 0.1 s apart, for a topic just made


class LogAdmin(Protocol):
    def committed(self, groups: Iterable[str], topic: str) -> dict[str, dict[int, int]]:
        """By group that reads ``topic``, its committed offset by partition: a group with members
        but no commit yet, or joining or rebalancing, is there with none (so it is behind); a group
        with neither members nor offsets is left out."""

    def recreate(self, topic: str, partitions: int) -> None:
        """Delete ``topic`` and create it again, empty, with ``partitions`` partitions."""

    def ensure(self, topic: str, partitions: int) -> None:
        """Create ``topic`` with ``partitions`` partitions if it does not exist (or exists empty
        with another count: one the broker made with its default)."""


class LogReaders(Protocol):
    """Where the groups seen reading a topic are kept (the relay's: ``RelayState``)."""

    def log_readers(self, topic: str) -> set[str]: ...

    def add_log_readers(self, topic: str, groups: Iterable[str]) -> None: ...


class KafkaLogAdmin:
    """``LogAdmin`` on the admin clients (kafka-python's for offsets and topics; librdkafka's for
    group states, which kafka-python cannot decode from the embedded broker)."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient
        from kafka import KafkaAdminClient

        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        self.groups = AdminClient({"bootstrap.servers": bootstrap})

    def committed(self, groups: Iterable[str], topic: str) -> dict[str, dict[int, int]]:
        from confluent_kafka import ConsumerGroupState, KafkaException
        from kafka.errors import KafkaError

        groups = list(groups)
        out: dict[str, dict[int, int]] = {}
        joining: set[str] = set()
        try:
            for group, state in self.groups.describe_consumer_groups(groups, request_timeout=2).items():
                now = state.result().state
                if now not in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD):
                    out[group] = {}  # members; joining or rebalancing (the embedded broker: UNKNOWN)
                    if now != ConsumerGroupState.STABLE:
                        joining.add(group)
        except KafkaException as e:
            raise KafkaError(str(e)) from None
        for group in groups:
            offsets = self.admin.list_group_offsets({group: None}).get(group, {})
            mine = {tp.partition: int(meta.offset) for tp, meta in offsets.items()
                    if tp.topic == topic and meta.offset >= 0}
            if mine and group not in joining:  # a member may keep a position over a rebalance
                out[group] = mine
        return out

    def recreate(self, topic: str, partitions: int) -> None:
        self._make(topic, partitions, delete=True)

    def ensure(self, topic: str, partitions: int) -> None:
        self._make(topic, partitions, delete=False)

    def _make(self, topic: str, partitions: int, delete: bool) -> None:
        """Made, then its partitions counted: the embedded broker creates a topic a client's
        metadata request names (a consumer polling it, ``allow_auto_create_topics`` or not) with
        its own default count (4, not configurable), so between the delete and the create a
        consumer may make it first, and the create answers TopicAlreadyExists. Such a topic holds
        nothing yet (the relay, its producer, is here) and is deleted and made again; one that
        holds records is left as it is (a warning), never emptied here."""
        from kafka.errors import KafkaError, UnknownTopicOrPartitionError

        for _ in range(MAKE_TRIES):
            if delete:
                with contextlib.suppress(UnknownTopicOrPartitionError):  # gone already (a broker that restarted)
                    self.admin.delete_topics([topic])
            self._create(topic, partitions)
            have = self._made(topic)
            if len(have) == partitions:
                return
            if any(self._ends(topic, have).values()):
                log.warning("the topic %s has %d partitions, not %d, and holds records: left as it is",
                            topic, len(have), partitions)
                return
            log.warning("the topic %s was made with %d partitions, not %d (the broker's default, on a "
                        "client's metadata request): deleted and made again", topic, len(have), partitions)
            delete = True
        raise KafkaError(f"the topic {topic} kept being made with the broker's default partition count")

    def _made(self, topic: str) -> list[int]:
        """The partitions of a topic just made, once the metadata shows it: none is a topic the
        broker answering has not learnt of yet (Apache Kafka's learn it after the controller has
        answered the create), not one of another count, and deleting it would delete the one made."""
        from kafka.errors import KafkaError

        for _ in range(SEEN_TRIES):
            if have := self.partitions(topic):
                return have
            time.sleep(0.1)
        raise KafkaError(f"the topic {topic} was made and is not in the broker's metadata yet")

    def partitions(self, topic: str) -> list[int]:
        """The partitions ``topic`` has (none: it does not exist)."""
        return sorted(int(p["partition_index"]) for t in self.admin.describe_topics([topic]) if t["name"] == topic
                      for p in t["partitions"])

    def _ends(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        from kafka import TopicPartition
        from kafka.admin import OffsetSpec

        answer = self.admin.list_partition_offsets({TopicPartition(topic, p): OffsetSpec.LATEST for p in partitions})
        return {tp.partition: int(info.offset) for tp, info in answer.items()}

    def _create(self, topic: str, partitions: int) -> None:
        from kafka.admin import NewTopic
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        for attempt in range(5):  # the broker has answered a CreateTopics with a truncated response
            try:
                self.admin.create_topics([NewTopic(topic, partitions, 1)])
                return
            except TopicAlreadyExistsError:
                return
            except KafkaError:
                if attempt == 4:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.admin.close()


class LogRollover:
    """When to start the log afresh, and doing it (see the module's docstring)."""

    def __init__(self, admin: LogAdmin, topic: str, partitions: int, groups: Iterable[str], every_batches: int,
                 min_messages: int | None = None, wait_s: float = 0.2, retry_s: float = 5.0,
                 max_retry_s: float = 60.0, readers: LogReaders | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Any] = time.sleep) -> None:
        self.admin = admin
        self.topic = topic
        self.partitions = partitions
        self.groups = tuple(groups)
        self.every_batches = every_batches
        self.min_messages = every_batches if min_messages is None else min_messages
        self.wait_s = wait_s  # the longest the relay holds its next batch for the groups to catch up
        self.retry_s = retry_s  # after a postponement; doubled after each in a row, up to max_retry_s
        self.max_retry_s = max_retry_s
        self._backoff = retry_s
        self.clock = clock
        self.sleep = sleep
        self.batches: dict[int, int] = {}  # produce batches each partition took since the log began
        self._next_try = 0.0
        self.rollovers = 0
        self.postponed = 0
        # Groups seen reading the topic: one stopped across a fresh start has no offsets after it
        # (the broker forgets them with the topic), and still holds the log until it is back. Kept
        # in ``readers`` too where given (the relay's PostgreSQL state), and read from there at
        # each try: a relay restarted, or one taking over, would otherwise let a second fresh
        # start take from such a group what came between the two.
        self.readers = readers
        self.seen: set[str] = set()
        self.missing = True  # not known to exist: unchecked since this relay started, or deleted and not created again

    def hold(self, groups: Iterable[str]) -> None:
        """These groups hold the log even with no member and no offsets (a reader with no sweep
        of its own to find what a fresh start took from it)."""
        self.seen.update(groups)

    def ensure_topic(self) -> None:
        """At the relay's start, and before its next batch while ``missing``: a relay that died
        (or a broker that failed) between deleting the topic and creating it again would
        otherwise leave the relay publishing into one the broker makes with its own defaults."""
        self.admin.ensure(self.topic, self.partitions)
        self.missing = False

    def count(self, partitions: Iterable[int]) -> None:
        """One acknowledged batch of the relay's, on these partitions."""
        for p in set(partitions):
            self.batches[p] = self.batches.get(p, 0) + 1

    def due(self, ends: dict[int, int]) -> bool:
        """Whether to try now, the relay's acknowledged ends (next offset by partition) at hand."""
        return (self.every_batches > 0 and max(self.batches.values(), default=0) >= self.every_batches
                and len(ends) == self.partitions and min(ends.values()) >= self.min_messages
                and self.clock() >= self._next_try)

    def read_by_all(self, ends: dict[int, int]) -> bool:
        """Until about ``wait_s`` has passed, every group reading the topic (or seen reading it)
        has committed up to ``ends`` on each partition; False when one has not (and no try for
        ``retry_s``, doubled for each postponement in a row: a stopped group costs the relay
        ``wait_s`` about once a minute). An admin request that hangs is bounded by its own
        2 s timeout."""
        deadline = self.clock() + self.wait_s
        if self.readers is not None:
            # Only the groups asked about below: a row of another (a group of an older version, a
            # test relay's on the same database) could never be seen caught up, and held it for good.
            self.seen.update(self.readers.log_readers(self.topic) & set(self.groups))
        while True:
            committed = self.admin.committed(self.groups, self.topic)
            if new := set(committed) - self.seen:
                if self.readers is not None:
                    self.readers.add_log_readers(self.topic, new)
                self.seen.update(new)
            # Exactly the end: an offset past it is a member's commit from the log before (made
            # after the topic was recreated, before it fetched from the new one), not progress.
            behind = [g for g in sorted(self.seen)
                      if any(committed.get(g, {}).get(p, -1) != end for p, end in ends.items())]
            if not behind:
                self._backoff = self.retry_s
                return True
            if self.clock() + POLL_S >= deadline:
                if absent := [g for g in behind if g not in committed]:
                    # No member and no offsets: held only for having been seen (stopped, or an app
                    # this deployment does not start), which "behind" did not tell, nor how to end it.
                    log.warning("the broker's log of %s waits for %s, seen reading it before and with no member "
                                "and no offsets now: each holds it until it reads again%s", self.topic,
                                ", ".join(absent), "" if self.readers is None else
                                " (one retired for good: delete its row in palette_relay.log_readers)")
                self.postpone(f"{', '.join(behind)} behind")
                return False
            self.sleep(POLL_S)

    def postpone(self, why: str) -> None:
        self.postponed += 1
        self._next_try = self.clock() + self._backoff
        self._backoff = min(self.max_retry_s, 2 * self._backoff)
        log.info("the broker's log of %s is not started afresh yet: %s", self.topic, why)

    def start_afresh(self) -> None:
        """Delete and create the topic (everything in it was read: see ``read_by_all``)."""
        longest = max(self.batches.values(), default=0)
        self.missing = True
        self.admin.recreate(self.topic, self.partitions)
        self.missing = False
        self.batches.clear()
        self.rollovers += 1
        log.info("the broker's log of %s started afresh (its longest partition had taken %d batches; "
                 "every consumer group had read it)", self.topic, longest)

    def close(self) -> None:
        close = getattr(self.admin, "close", None)
        if close is not None:
            close()
