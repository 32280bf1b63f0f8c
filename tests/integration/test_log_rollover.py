"""The broker's log of palette.events started afresh (adapters.rollover) on the real broker: a
group member reads the new log from its start without being told, and the live relay does it
under load, several times, while the stack's projector folds every event from the broker (not
from its sweep of the event log)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import uuid
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from adapters import kafka_io
from adapters.bootstrap import build_relay
from adapters.rollover import KafkaLogAdmin, LogRollover
from adapters.settings import Settings
from application.services import PaletteService
from domain.contracts import topics
from infra.kafka_admin import ensure_topics

from .test_projections import assert_models_agree_with_the_aggregates, drained, service, workload  # noqa: F401
from .test_stack import wait_until


def produce(settings: Settings, topic: str, values: range, partition: int | None = None) -> None:
    producer = Producer({"bootstrap.servers": settings.effective_kafka_bootstrap, "linger.ms": 1})
    for v in values:
        if partition is None:
            producer.produce(topic, key=str(v).encode(), value=str(v).encode())
        else:
            producer.produce(topic, partition=partition, value=str(v).encode())
    assert producer.flush(30) == 0


def test_a_topic_of_another_partition_count_is_named_with_both_counts_and_used_as_it_is(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """`palette up` (and the relay's republish) made the topics missing and took any there as they
    were: one left by a run under another PALETTE_KAFKA_PARTITIONS (a broker on S3 storage keeps
    it) was used without a word. It is still used, never emptied at start, and named once."""
    topic, missing = f"partitions-{uuid.uuid4().hex[:8]}", f"partitions-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    produce(settings, topic, range(5))
    with caplog.at_level(logging.WARNING, logger="palette.kafka"):
        ensure_topics(settings.effective_kafka_bootstrap, [topic, missing], 3)
    assert [r.getMessage() for r in caplog.records if r.name == "palette.kafka"] == [
        f"the topic {topic} has 2 partitions, not the 3 PALETTE_KAFKA_PARTITIONS asks for: used as it is"]
    admin = KafkaLogAdmin(settings.effective_kafka_bootstrap)
    try:
        assert (admin.partitions(topic), admin.partitions(missing)) == ([0, 1], [0, 1, 2])
    finally:
        admin.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palette.kafka"):
        ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    assert [r for r in caplog.records if r.name == "palette.kafka"] == []


def test_a_member_reads_a_log_started_afresh_from_its_start(settings: Settings) -> None:
    topic, group = f"rollover-{uuid.uuid4().hex[:8]}", f"rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    admin = KafkaLogAdmin(settings.effective_kafka_bootstrap)
    member = kafka_io.consumer(settings, group, topic)
    seen: list[int] = []

    def read(count: int) -> bool:
        for records in member.poll(timeout_ms=100).values():
            seen.extend(int(r.value) for r in records)
        member.commit()
        return len(seen) >= count

    try:
        produce(settings, topic, range(200))
        wait_until(lambda: read(200), what="the first log read")
        assert sorted(seen) == list(range(200))
        assert admin.committed([group], topic) == {group: {0: member.position(TopicPartition(topic, 0)),
                                                           1: member.position(TopicPartition(topic, 1))}}
        admin.recreate(topic, 2)
        assert admin.committed([group], topic) == {group: {}}  # a member, and no offsets: the broker forgot them
        produce(settings, topic, range(200, 220))  # far fewer than the member's positions
        wait_until(lambda: read(220), what="the new log read from its start")
        assert sorted(seen) == list(range(220))  # each once: nothing skipped, nothing read twice
        # What the group committed is where it is in the new log, not where it was in the old one.
        committed = admin.committed([group], topic)[group]
        assert sum(committed.values()) == 20
        assert committed == {p: member.position(TopicPartition(topic, p)) for p in committed}
    finally:
        member.close()
        admin.close()


def test_a_stopped_group_holds_the_log_with_its_offsets_even_at_the_start_and_one_never_started_does_not(
        settings: Settings) -> None:
    """A group with no member is known by its committed offsets alone: one committed at offset 0
    (it read nothing yet) is behind the log, not a group the relay may leave out."""
    topic = f"rollover-{uuid.uuid4().hex[:8]}"
    stopped, never = f"rollover-{uuid.uuid4().hex[:8]}", f"rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    admin = KafkaLogAdmin(settings.effective_kafka_bootstrap)
    member = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap, group_id=stopped,
                           enable_auto_commit=False)
    try:
        member.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])  # no join: offsets only
        member.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1),
                       TopicPartition(topic, 1): OffsetAndMetadata(3, "", -1)})
        assert admin.committed([stopped, never], topic) == {stopped: {0: 0, 1: 3}}
        rollover = LogRollover(admin, topic, 2, [stopped, never], every_batches=1, wait_s=0.0)
        assert not rollover.read_by_all({0: 5, 1: 3})  # partition 0 not read: the log is not started afresh
    finally:
        member.close()
        admin.close()


def test_a_group_seen_reading_holds_the_log_across_a_restart_of_the_relay(settings: Settings) -> None:
    """A group stopped once it had read the log (the dispatcher) has no offsets after a fresh
    start: the relay that saw it waits for it, and so does one restarted, which reads the groups
    seen from its PostgreSQL state (it kept them in memory only: a second fresh start took the
    JobQueued published between the two from the dispatcher, its jobs left to its stale sweep).
    The relays' rollovers are pointed at a topic of the test's own."""
    topic, group = f"rollover-{uuid.uuid4().hex[:8]}", f"rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], settings.kafka_partitions)
    member = KafkaConsumer(bootstrap_servers=settings.effective_kafka_bootstrap, group_id=group,
                           enable_auto_commit=False)
    ends = {p: 3 for p in range(settings.kafka_partitions)}

    def relay_on_the_topic() -> Any:
        relay = build_relay(settings)
        assert isinstance(relay.rollover, LogRollover)
        relay.rollover.topic, relay.rollover.groups, relay.rollover.wait_s = topic, (group,), 0.0
        return relay

    relay = relay_on_the_topic()
    try:
        member.assign([TopicPartition(topic, p) for p in ends])  # no join: offsets only
        member.commit({TopicPartition(topic, p): OffsetAndMetadata(end, "", -1) for p, end in ends.items()})
        assert relay.rollover.read_by_all(ends)
        relay.rollover.start_afresh()
        assert relay.rollover.admin.committed([group], topic) == {}  # stopped: its offsets went with the log
        relay.close()
        relay = relay_on_the_topic()  # the relay restarted
        assert not relay.rollover.read_by_all({p: 1 for p in ends})  # not until the group is back and through it
    finally:
        with (psycopg.connect(settings.effective_database_url, autocommit=True) as conn,
              contextlib.suppress(psycopg.errors.UndefinedTable)):  # the table, where it is not there yet
            conn.execute("DELETE FROM palette_relay.log_readers WHERE topic = %s", [topic])
        relay.close()
        member.close()


def test_a_member_reads_every_partition_of_a_new_log_from_its_start_when_one_ends_before_it(
        settings: Settings) -> None:
    """One partition's new log ends before the member's position there (it rewinds), while the
    other's has grown past it already: that one is new too, and read from its start, not from
    the old position (a clean-clone CI run's projector skipped 80 events so, until its sweep)."""
    topic, group = f"rollover-{uuid.uuid4().hex[:8]}", f"rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    admin = KafkaLogAdmin(settings.effective_kafka_bootstrap)
    member = kafka_io.consumer(settings, group, topic)
    seen: set[int] = set()

    def read(wanted: set[int]) -> bool:
        for records in member.poll(timeout_ms=100).values():
            seen.update(int(r.value) for r in records)
        member.commit()
        return wanted <= seen

    try:
        old = {0: range(0, 100), 1: range(1000, 1010)}
        for p, values in old.items():
            produce(settings, topic, values, partition=p)
        wait_until(lambda: read({*old[0], *old[1]}), what="the first log read")
        admin.recreate(topic, 2)
        new = {0: range(2000, 2005), 1: range(3000, 3030)}  # 5 < 100 on 0; 30 > 10 on 1
        for p, values in new.items():
            produce(settings, topic, values, partition=p)
        everything = {*old[0], *old[1], *new[0], *new[1]}
        wait_until(lambda: read(everything), timeout_s=30, what="the new log read from the start of both partitions")
    finally:
        member.close()
        admin.close()


def test_a_topic_a_member_makes_between_the_delete_and_the_create_is_made_again_with_its_partitions(
        settings: Settings) -> None:
    """The broker makes a topic a consumer's metadata request names, with its own default
    partition count (4): a member polling while the log is started afresh may make it between the
    delete and the create, which then answers TopicAlreadyExists. It holds nothing yet, and is
    made again with the count asked for (2 here; with 4 the relay's ``due`` never held again)."""
    topic, group = f"rollover-{uuid.uuid4().hex[:8]}", f"rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 2)
    admin = KafkaLogAdmin(settings.effective_kafka_bootstrap)
    member = kafka_io.consumer(settings, group, topic)
    delete = admin.admin.delete_topics
    made_by_the_member: list[list[int]] = []

    def partitions() -> list[int]:
        return sorted(int(p["partition_index"]) for t in admin.admin.describe_topics([topic]) for p in t["partitions"])

    def made() -> bool:
        member.poll(timeout_ms=50)
        return topic in admin.admin.list_topics()

    def delete_then_the_member_polls(topics: list[str], **kwargs: Any) -> Any:
        answer = delete(topics, **kwargs)
        if not made_by_the_member:  # the first delete only: the member's poll makes it at once
            wait_until(made, timeout_s=30, what="the topic made by the member's poll")
            made_by_the_member.append(partitions())
        return answer

    admin.admin.delete_topics = delete_then_the_member_polls
    try:
        produce(settings, topic, range(20))
        wait_until(lambda: bool(member.poll(timeout_ms=100)), what="the member reading")
        admin.recreate(topic, 2)
        assert made_by_the_member == [[0, 1, 2, 3]]  # the broker's default, not the topic's count
        assert partitions() == [0, 1]
        admin.ensure(topic, 2)
        assert partitions() == [0, 1]
    finally:
        member.close()
        admin.close()


def projector_lines(settings: Settings, since: int) -> list[str]:
    """The projector's log lines since byte ``since``."""
    with (settings.data_dir / "logs" / "projector.log").open("rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace").splitlines()


def test_the_relay_starts_the_log_afresh_under_load_and_the_read_side_misses_nothing(
        apps: Any, service: PaletteService, settings: Settings) -> None:  # noqa: F811
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the log so far")
        apps.stop_app("relay")
        relay = build_relay(settings.model_copy(update={"broker_log_batches": 5}))
        # Only the projector runs among the groups here: a dispatcher stopped after an earlier
        # module would hold the log (as it should in `palette up`) until it came back. Each
        # partition holds 40 messages before (a member fetching less often than 40 arrive on a
        # partition could pass the start of the new log: see adapters.rollover).
        assert isinstance(relay.rollover, LogRollover)
        relay.rollover.groups = (topics.PROJECTOR_GROUP,)
        relay.rollover.readers = None  # nor the groups the session's relay saw reading before
        relay.rollover.min_messages = 40
        log_size = (settings.data_dir / "logs" / "projector.log").stat().st_size
        stop = threading.Event()
        publishing = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        publishing.start()
        try:
            rng = random.Random(5)
            for _ in range(40):
                workload(service, 3, rng)
                if relay.rollover.rollovers >= 3:
                    break
            wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the workload")
        finally:
            stop.set()
            publishing.join(timeout=30)
            relay.close()
            apps.start_app("relay")
        assert relay.rollover.rollovers >= 3, relay.rollover.batches
        assert relay.loss is not None and relay.loss.losses == 0  # started afresh is not lost
        lines = projector_lines(settings, log_size)
        swept = [line for line in lines if "sweep folded" in line]
        # The broker delivered everything, not the sweep (its consumer's lines say what it saw).
        assert swept == [], [line for line in lines if "palette.kafka" in line or "kafka.cluster" in line]
        assert_models_agree_with_the_aggregates(service.app, conn)
