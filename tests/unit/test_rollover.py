"""When the relay starts the broker's log afresh (adapters.rollover), decided on fakes: only once a
partition took enough batches, every partition holds enough, and every group that committed on
the topic has committed up to the end; a group behind postpones it, later each time in a row."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest

from adapters.rollover import LogRollover


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Admin:
    """Committed offsets that move on as they are asked for (``catch_up`` per ask and partition,
    up to the log's end ``until``, as a member's commits do)."""

    def __init__(self, committed: dict[str, dict[int, int]], catch_up: int = 0, until: int = 0) -> None:
        self.offsets = committed
        self.catch_up = catch_up
        self.until = until
        self.asked = 0
        self.recreated: list[tuple[str, int]] = []

    def committed(self, groups: Iterable[str], topic: str) -> dict[str, dict[int, int]]:
        self.asked += 1
        out = {g: dict(self.offsets[g]) for g in groups if g in self.offsets}
        for offsets in self.offsets.values():
            for p in offsets:
                offsets[p] = max(offsets[p], min(self.until, offsets[p] + self.catch_up))
        return out

    def recreate(self, topic: str, partitions: int) -> None:
        self.recreated.append((topic, partitions))

    def ensure(self, topic: str, partitions: int) -> None:
        raise AssertionError("not at a relay's start")


def rollover(admin: Admin, clock: Clock, every: int = 3, min_messages: int | None = None) -> LogRollover:
    return LogRollover(admin, "events", 2, ("projector", "dispatcher"), every, min_messages=min_messages,
                       wait_s=0.2, retry_s=5, max_retry_s=20, clock=clock, sleep=clock.sleep)


def test_due_once_a_partition_took_enough_batches_and_every_partition_holds_enough() -> None:
    clock = Clock()
    r = rollover(Admin({}), clock, every=3, min_messages=10)
    ends = {0: 10, 1: 12}
    r.count([0, 1])
    r.count([0, 0, 1])  # one batch per partition per acknowledgement, however many records
    assert r.batches == {0: 2, 1: 2}
    assert not r.due(ends)
    r.count([0])
    assert r.due(ends)
    assert not r.due({0: 10, 1: 9})  # a partition the relay filled less: its readers could be passed
    assert not r.due({0: 10})  # a partition the relay has no offsets of (since a loss): not known
    assert not r.due({})
    assert not rollover(Admin({}), clock, every=0).due(ends)  # 0: never


def test_read_by_all_waits_for_the_groups_that_committed_and_ignores_the_others() -> None:
    clock = Clock()
    admin = Admin({"projector": {0: 7, 1: 9}, "dispatcher": {0: 10, 1: 10}, "stranger": {0: 0}}, catch_up=1,
                  until=10)
    r = rollover(admin, clock)
    assert r.read_by_all({0: 10, 1: 10})  # the projector catches up while the relay waits
    assert admin.asked == 4 and clock.now > 0  # "stranger" is not one of its groups
    r.count([0, 1])
    r.start_afresh()
    assert admin.recreated == [("events", 2)] and r.batches == {} and r.rollovers == 1


def test_a_group_not_there_does_not_hold_it_but_a_joining_one_or_one_missing_a_partition_does() -> None:
    clock = Clock()
    assert rollover(Admin({"projector": {0: 10, 1: 10}}), clock).read_by_all({0: 10, 1: 10})
    assert not rollover(Admin({"projector": {0: 10, 1: 10}, "dispatcher": {}}), clock).read_by_all({0: 10, 1: 10})
    assert not rollover(Admin({"projector": {0: 10}}), clock).read_by_all({0: 10, 1: 10})


def test_a_group_seen_before_holds_it_when_its_offsets_are_gone_with_the_last_log() -> None:
    clock = Clock()
    admin = Admin({"projector": {0: 10, 1: 10}, "dispatcher": {0: 10, 1: 10}})
    r = rollover(admin, clock)
    assert r.read_by_all({0: 10, 1: 10})
    r.start_afresh()
    del admin.offsets["dispatcher"]  # stopped, caught up: the broker forgot its offsets with the topic
    admin.offsets["projector"] = {0: 12, 1: 11}
    assert not r.read_by_all({0: 12, 1: 11})
    admin.offsets["dispatcher"] = {0: 12, 1: 11}  # back, and through the new log
    assert r.read_by_all({0: 12, 1: 11})


class Readers:
    """The groups seen reading a topic, as the relay's PostgreSQL state keeps them."""

    def __init__(self) -> None:
        self.kept: dict[str, set[str]] = {}

    def log_readers(self, topic: str) -> set[str]:
        return set(self.kept.get(topic, set()))

    def add_log_readers(self, topic: str, groups: Iterable[str]) -> None:
        self.kept.setdefault(topic, set()).update(groups)


def test_a_group_seen_before_holds_it_across_a_restart_of_the_relay() -> None:
    """The dispatcher, stopped across one fresh start, has no offsets after it: a relay restarted
    (or taking over) still waits for it, or a second fresh start would take the events between
    the two from it (its JobQueued: the jobs would wait for its stale sweep)."""
    clock, readers = Clock(), Readers()
    admin = Admin({"projector": {0: 10, 1: 10}, "dispatcher": {0: 10, 1: 10}})
    r = LogRollover(admin, "events", 2, ("projector", "dispatcher"), 3, wait_s=0.2, readers=readers,
                    clock=clock, sleep=clock.sleep)
    assert r.read_by_all({0: 10, 1: 10})
    r.start_afresh()
    del admin.offsets["dispatcher"]  # stopped, caught up: the broker forgot its offsets with the topic
    admin.offsets["projector"] = {0: 12, 1: 11}
    restarted = LogRollover(admin, "events", 2, ("projector", "dispatcher"), 3, wait_s=0.2, readers=readers,
                            clock=clock, sleep=clock.sleep)
    assert not restarted.read_by_all({0: 12, 1: 11})
    assert readers.kept == {"events": {"projector", "dispatcher"}}
    admin.offsets["dispatcher"] = {0: 12, 1: 11}  # back, and through the new log
    assert restarted.read_by_all({0: 12, 1: 11})


def test_a_kept_group_this_relay_does_not_ask_about_does_not_hold_it() -> None:
    """A row of a group the relay never asks the broker about (a group of an older version, a
    test relay's own groups on the same database) could never be seen caught up: it held every
    fresh start for good."""
    clock, readers = Clock(), Readers()
    readers.add_log_readers("events", ["palette-old-name"])
    admin = Admin({"projector": {0: 10, 1: 10}, "dispatcher": {0: 10, 1: 10}})
    r = LogRollover(admin, "events", 2, ("projector", "dispatcher"), 3, wait_s=0.2, readers=readers,
                    clock=clock, sleep=clock.sleep)
    assert r.read_by_all({0: 10, 1: 10})


def test_a_group_held_only_by_having_been_seen_is_named_with_how_to_let_it_go(
        caplog: pytest.LogCaptureFixture) -> None:
    """A group seen reading once and absent since (no member, no offsets: stopped for good, or an
    app not started in this deployment) holds every fresh start: the relay says so as a warning,
    naming the row that keeps it, where a stopped group read as merely "behind"."""
    clock, readers = Clock(), Readers()
    readers.add_log_readers("events", ["dispatcher"])
    admin = Admin({"projector": {0: 10, 1: 10}})
    r = LogRollover(admin, "events", 2, ("projector", "dispatcher"), 3, wait_s=0.2, readers=readers,
                    clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.INFO, logger="palette.rollover"):
        assert not r.read_by_all({0: 10, 1: 10})
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warned) == 1 and "dispatcher" in warned[0] and "projector" not in warned[0]
    assert "palette_relay.log_readers" in warned[0]


def test_an_offset_past_the_end_is_a_commit_from_the_log_before_and_holds_it() -> None:
    clock = Clock()
    admin = Admin({"projector": {0: 10, 1: 10}})
    r = rollover(admin, clock)
    assert r.read_by_all({0: 10, 1: 10})
    r.start_afresh()
    admin.offsets["projector"] = {0: 10, 1: 10}  # committed after the delete, from its old positions
    assert not r.read_by_all({0: 4, 1: 3})
    admin.offsets["projector"] = {0: 4, 1: 3}  # through the new log
    assert r.read_by_all({0: 4, 1: 3})


def test_a_group_behind_postpones_it_for_longer_each_time_in_a_row() -> None:
    clock = Clock()
    admin = Admin({"projector": {0: 10, 1: 10}, "dispatcher": {0: 3, 1: 10}})  # the dispatcher stopped
    r = rollover(admin, clock, every=1, min_messages=1)
    r.count([0, 1])
    ends = {0: 10, 1: 10}
    gaps = []
    for _ in range(4):
        assert r.due(ends)
        start = clock.now
        assert not r.read_by_all(ends)
        assert 0.15 <= clock.now - start <= 0.2  # waited about wait_s for it
        assert not r.due(ends)
        waited = clock.now
        while not r.due(ends):
            clock.now += 0.5
        gaps.append(clock.now - waited)
    assert gaps[0] < gaps[1] < gaps[2] and gaps[3] <= 20.5  # 5, 10, 20, then at most max_retry_s
    assert r.postponed == 4 and admin.recreated == []
    admin.offsets["dispatcher"][0] = 10  # back, and caught up
    assert r.read_by_all(ends)
    r.start_afresh()
    r.count([0, 1])
    admin.offsets["dispatcher"][0] = 3
    start = clock.now
    assert not r.read_by_all(ends)
    while not r.due(ends):
        clock.now += 0.5
    assert clock.now - start <= 5.5  # a success started the wait over


class TopicAdmin:
    """kafka-python's admin client on a cluster whose metadata lags its CreateTopics (Apache
    Kafka's brokers learn a new topic after the controller has answered): the topic is first
    described with no partitions."""

    def __init__(self, partitions: int, unseen: int) -> None:
        self.partitions = partitions
        self.unseen = unseen  # describes still answering no partitions
        self.deleted = 0

    def create_topics(self, new: list[object]) -> None:
        from kafka.errors import TopicAlreadyExistsError
        raise TopicAlreadyExistsError()

    def describe_topics(self, topics: list[str]) -> list[dict[str, object]]:
        if self.unseen:
            self.unseen -= 1
            return [{"name": topics[0], "error_code": 3, "partitions": []}]
        return [{"name": topics[0], "error_code": 0,
                 "partitions": [{"partition_index": p} for p in range(self.partitions)]}]

    def list_partition_offsets(self, specs: dict[object, object]) -> dict[object, object]:
        return {}

    def delete_topics(self, topics: list[str]) -> None:
        self.deleted += 1


def test_a_topic_made_and_not_yet_in_the_metadata_is_not_taken_for_one_of_the_wrong_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic described with no partitions is one the broker answering has not learnt of yet,
    not one made with another count: it was deleted (each try, up to a KafkaError), the topic the
    create had just made among them."""
    from adapters.rollover import KafkaLogAdmin

    monkeypatch.setattr("time.sleep", lambda s: None)
    admin = KafkaLogAdmin.__new__(KafkaLogAdmin)
    admin.admin = fake = TopicAdmin(2, unseen=2)
    admin.ensure("events", 2)
    assert fake.deleted == 0
