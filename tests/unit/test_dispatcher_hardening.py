"""The dispatcher against small fakes: a record it cannot handle is parked and the loop goes on;
the stale sweep sends again only tasks that left the queue (consumed, or lost by the broker)."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import OperationalError
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError

from adapters.dispatcher import DLQ_TOPIC, GPU_GROUP, Dispatcher, KafkaTaskQueue, Placement, Placements
from adapters.rollover import LogRollover
from domain.contracts.topics import GPU_TASKS as GPU_TOPIC
from domain.job import Job
from tests.unit.broker_fakes import FakeConsumer, Record
from tests.unit.test_rollover import Clock

AT = datetime(2025, 1, 1, tzinfo=UTC)
EDITS = {"wall": {"action": "recolor", "value": "#2255cc"}}


@dataclass
class Meta:
    partition: int
    offset: int


@dataclass
class Sent:
    meta: Meta

    def get(self, timeout: float = 0) -> Meta:
        return self.meta


@dataclass
class FakeProducer:
    """Every key to partition 0, offsets counted per topic as a broker would."""

    sent: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = field(default_factory=list)
    ends: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: list[tuple[str, bytes]] | None = None) -> Sent:
        self.sent.append((topic, key, value, dict(headers or [])))
        self.ends[topic] += 1
        return Sent(Meta(0, self.ends[topic] - 1))

    def tasks(self) -> list[dict[str, Any]]:
        return [json.loads(value) for topic, _, value, _ in self.sent if topic == GPU_TOPIC]

    def parked(self) -> list[tuple[bytes, dict[str, bytes]]]:
        return [(value, headers) for topic, _, value, headers in self.sent if topic == DLQ_TOPIC]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeRepository:
    def __init__(self, *jobs: Job, failure: Exception | None = None) -> None:
        self.jobs = {job.id: job for job in jobs}
        self.failure = failure

    def get(self, job_id: UUID, version: int | None = None) -> Job:
        if self.failure is not None:
            raise self.failure
        if job_id not in self.jobs:
            raise AggregateNotFoundError(job_id)
        return self.jobs[job_id]


@dataclass
class FakeApp:
    repository: FakeRepository

    def close(self) -> None:
        pass


@dataclass
class FakeQueue:
    """The GPU group's committed offsets, and the offsets the log still holds (below ``end``)."""

    consumed: dict[int, int] = field(default_factory=dict)
    end: int = 1_000_000

    def committed(self, partitions: Iterable[int]) -> dict[int, int]:
        return {p: o for p, o in self.consumed.items() if p in set(partitions)}

    def reaches(self, partition: int, offset: int) -> bool:
        return offset < self.end

    log: str = "the first log"  # the topic id: a broker restarted empty makes the topic anew

    def log_id(self) -> str:
        return self.log

    others: dict[int, int] = field(default_factory=dict)  # end offsets past this dispatcher's own tasks

    def ends(self) -> dict[int, int]:
        return dict(self.others)


def queued_job(items: int = 2, preset: str = "interior") -> Job:
    job = Job.create(uuid.uuid4(), uuid.uuid4(), preset, items, AT)
    job.confirm_upload(AT)
    job.execute(EDITS, [], None, AT)
    return job


def envelope(job_id: UUID, event: str = "JobQueued", version: int = 3) -> Record:
    return Record(json.dumps({"id": 1, "stream_id": str(job_id), "stream_type": "Job", "version": version,
                              "type": event, "timestamp": AT.isoformat(), "data": {}}).encode(),
                  str(job_id).encode())


def dispatcher(*polls: list[Record], jobs: Iterable[Job] = (), queue: FakeQueue | None = None,
               failure: Exception | None = None,
               rollover: LogRollover | None = None) -> tuple[Dispatcher, FakeProducer, FakeConsumer]:
    consumer, producer = FakeConsumer(*polls), FakeProducer()
    jobs = list(jobs)
    d = Dispatcher(consumer, producer, FakeApp(FakeRepository(*jobs, failure=failure)), stale_s=60.0,
                   clock=lambda: 0.0, queue=queue, stale_jobs=lambda stale_s, limit: [j.id for j in jobs],
                   rollover=rollover)
    return d, producer, consumer


# -- records it cannot handle ----------------------------------------------------------------------
def test_the_dispatcher_parks_what_it_cannot_handle_and_dispatches_the_next_good_job():
    good, unknown_preset, missing = queued_job(2), queued_job(1, preset="no-such-preset"), uuid.uuid4()
    records = [Record(b"\xff definitely not an envelope", b"k", 1), Record(None, b"k", 2),
               Record(b'{"id": "one"}', None, 3), envelope(missing), envelope(unknown_preset.id), envelope(good.id)]
    d, producer, consumer = dispatcher(records, jobs=[good, unknown_preset])
    assert d.step() == 2
    assert [(t["job_id"], t["idx"]) for t in producer.tasks()] == [(str(good.id), 0), (str(good.id), 1)]
    parked = producer.parked()
    assert len(parked) == 5 and d.parked == 5
    assert parked[0][0] == b"\xff definitely not an envelope" and parked[0][1]["offset"] == b"1"
    assert b"AggregateNotFoundError" in parked[3][1]["error"] and b"no-such-preset" in parked[4][1]["error"]
    assert consumer.commits == 1


@dataclass
class Refused:
    """A send the broker did not acknowledge: flush returns all the same (kafka-python's does),
    its future raises."""

    def get(self, timeout: float = 0) -> Meta:
        raise KafkaTimeoutError("the DLQ copy was not acknowledged")


def test_a_parked_records_copy_the_broker_did_not_take_commits_nothing():
    """Else its offset was committed with its only copy lost: the DLQ's is what an operator reads."""
    d, producer, consumer = dispatcher([Record(b"\xff not an envelope", b"k", 1)])
    producer.send = lambda *args, **kwargs: Refused()  # type: ignore[method-assign]
    with pytest.raises(KafkaTimeoutError):
        d.step()
    assert consumer.commits == 0


def test_a_database_outage_raises_and_commits_nothing():
    d, producer, consumer = dispatcher([envelope(uuid.uuid4())], failure=OperationalError("server closed"))
    with pytest.raises(OperationalError):
        d.step()
    assert consumer.commits == 0 and producer.parked() == []


# -- the lag-aware stale sweep --------------------------------------------------------------------
def test_the_sweep_leaves_tasks_waiting_in_the_queue_alone():
    job = queued_job(3)
    d, producer, _ = dispatcher([envelope(job.id)], jobs=[job], queue=FakeQueue(consumed={0: 0}))
    d.step()
    assert d.placements.get(str(job.id)) == Placement(0, 2)
    assert d.sweep() == 0 and len(producer.tasks()) == 3


def test_the_sweep_resends_once_the_gpu_group_consumed_past_without_progress():
    job = queued_job(3)
    job.record_result(1, "done", "o", "p", "", f"{job.id}:1", AT)
    queue = FakeQueue(consumed={0: 0})
    d, producer, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    d.step()
    assert [t["idx"] for t in producer.tasks()] == [0, 2]  # item 1 has its result already
    queue.consumed[0] = 2  # the worker consumed both tasks, yet neither item has a result
    assert d.sweep() == 2
    assert [t["idx"] for t in producer.tasks()[2:]] == [0, 2]
    assert d.placements.get(str(job.id)) == Placement(0, 3)
    assert d.sweep() == 0  # the tasks sent again wait in the queue in their turn


def test_the_sweep_resends_tasks_the_broker_lost():
    job = queued_job(2)
    queue = FakeQueue(consumed={0: 0})
    d, _, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    d.step()
    queue.end = 1  # restarted without the acknowledged records at offsets 1 and up
    assert d.sweep() == 2


def test_a_recreated_gpu_queue_gets_the_tasks_again_once_per_restart_however_it_is_seen():
    queue = FakeQueue()
    d, _, _ = dispatcher(queue=queue)
    d.queue_check_s = 0.0
    resent: list[str] = []
    d.queue_lost = lambda why, page=500: resent.append(why) or 0  # type: ignore[method-assign,assignment]
    d.step()
    assert resent == []  # the first id seen is the queue as it is
    queue.log = "the second log"
    d.step()
    d.step()
    assert resent == ["unfinished after the GPU queue was lost"]
    d.after_loss()  # the relay's word on the same restart, later
    assert len(resent) == 1
    queue.log = "the third log"
    d.after_loss()  # the relay's word first this time: the check finds nothing more to do
    d.step()
    assert resent[1:] == ["unfinished after a broker loss"]
    d.after_loss()  # a lost tail that kept the topic (s3 storage): sent again all the same
    assert resent[2:] == ["unfinished after a broker loss"]


class LogAdmin:
    """The GPU group's committed offsets on the queue, as the rollover asks for them (None: the
    group has neither members nor offsets); a recreate gives the queue a new topic id."""

    def __init__(self, committed: dict[int, int] | None, queue: FakeQueue | None = None) -> None:
        self.offsets = committed
        self.queue = queue
        self.recreated = 0
        self.ensured = 0

    def committed(self, groups: Iterable[str], topic: str) -> dict[str, dict[int, int]]:
        assert topic == GPU_TOPIC
        return {} if self.offsets is None else {g: dict(self.offsets) for g in groups}

    def recreate(self, topic: str, partitions: int) -> None:
        self.recreated += 1
        if self.queue is not None:
            self.queue.log = f"log {self.recreated + 1}"

    def ensure(self, topic: str, partitions: int) -> None:
        self.ensured += 1


def rolling(admin: LogAdmin, clock: Clock, partitions: int = 1, min_messages: int = 6) -> LogRollover:
    return LogRollover(admin, GPU_TOPIC, partitions, (GPU_GROUP,), every_batches=3, min_messages=min_messages,
                       wait_s=0.0, clock=clock, sleep=clock.sleep)


def test_the_gpu_queue_starts_afresh_once_the_gpu_group_read_every_task_and_is_no_lost_queue():
    jobs = [queued_job(2) for _ in range(3)]
    queue, clock = FakeQueue(), Clock()
    admin = LogAdmin({}, queue)
    r = rolling(admin, clock)
    d, producer, _ = dispatcher(*[[envelope(job.id)] for job in jobs], jobs=jobs, queue=queue, rollover=r)
    lost: list[str] = []
    d.queue_lost = lambda why, page=500: lost.append(why) or 0  # type: ignore[method-assign,assignment]
    d.queue_check_s = 0.0
    d.step()
    assert admin.ensured == 1  # made if missing, before the first task
    d.step()
    d.step()  # the third job's 2 tasks: 3 batches, 6 tasks on the one partition
    assert d.ends == {0: 6} and r.batches == {0: 3}
    admin.offsets = {0: 5}  # the GPU group is one task behind: not yet
    d.step()
    assert admin.recreated == 0 and d.placements.get(str(jobs[0].id)) is not None
    admin.offsets = {0: 6}  # every task read
    clock.sleep(60)  # past the postponement
    d.step()
    assert admin.recreated == 1 and d.ends == {} and len(d.placements) == 0
    d.step()
    assert lost == []  # the new topic id is this dispatcher's own
    queue.log = "a broker restarted"
    d.step()
    assert lost == ["unfinished after the GPU queue was lost"]  # a loss after it still is one
    assert d.sweep() == 6  # stalled jobs fall back to the time rule: no placement into the old log
    assert len(producer.tasks()) == 12


def test_the_gpu_queue_is_held_by_its_group_even_with_no_member_and_no_offsets():
    jobs = [queued_job(2) for _ in range(3)]
    admin = LogAdmin(None)  # every worker down, the broker forgot the group's offsets
    d, _, _ = dispatcher(*[[envelope(job.id)] for job in jobs], jobs=jobs, queue=FakeQueue(),
                         rollover=rolling(admin, Clock()))
    for _ in range(4):
        d.step()
    assert d.ends == {0: 6} and admin.recreated == 0 and d.rollover is not None and d.rollover.postponed == 1


def test_a_lost_queue_forgets_the_ends_and_batches_it_knew():
    jobs = [queued_job(2)]
    r = rolling(LogAdmin({}), Clock())
    d, _, _ = dispatcher([envelope(jobs[0].id)], jobs=jobs, queue=FakeQueue(), rollover=r)
    d.step()
    assert d.ends == {0: 2} and r.batches == {0: 1}
    d.queue_lost("lost")
    assert d.ends == {} and r.batches == {}


def test_the_gpu_queue_is_not_started_afresh_while_another_dispatchers_tasks_are_in_it():
    jobs = [queued_job(2) for _ in range(3)]
    queue, admin, clock = FakeQueue(others={0: 7}), LogAdmin({0: 6}), Clock()
    d, _, _ = dispatcher(*[[envelope(job.id)] for job in jobs], jobs=jobs, queue=queue,
                         rollover=rolling(admin, clock))
    for _ in range(4):
        d.step()
    assert d.ends == {0: 6} and admin.recreated == 0 and d.rollover is not None and d.rollover.postponed == 1
    queue.others = {0: 6}  # the broker's end is this dispatcher's own
    clock.sleep(60)  # past the postponement
    d.step()
    assert admin.recreated == 1


def test_the_gpu_queue_is_not_started_afresh_before_every_partition_holds_enough():
    jobs = [queued_job(2) for _ in range(3)]
    admin = LogAdmin({0: 6})
    d, _, _ = dispatcher(*[[envelope(job.id)] for job in jobs], jobs=jobs, queue=FakeQueue(),
                         rollover=rolling(admin, Clock(), partitions=2, min_messages=3))
    for _ in range(5):
        d.step()
    assert admin.recreated == 0  # partition 1 never got a task (FakeProducer: all to 0)


def test_without_a_known_placement_the_sweep_falls_back_to_the_time_rule():
    job = queued_job(2)
    d, _, _ = dispatcher(jobs=[job], queue=FakeQueue(consumed={}))  # dispatched before a restart
    assert d.sweep() == 2


def test_a_stalled_job_that_cannot_be_built_never_stops_the_sweep():
    good, broken = queued_job(1), queued_job(1, preset="no-such-preset")
    d, _, _ = dispatcher(jobs=[broken, good], queue=FakeQueue())
    assert d.sweep() == 1


@pytest.mark.parametrize("end", ["JobFinished", "JobCanceled"])
def test_a_finished_or_canceled_job_is_forgotten(end):
    job = queued_job(1)
    d, _, _ = dispatcher([envelope(job.id)], [envelope(job.id, end, 5)], jobs=[job], queue=FakeQueue())
    d.step()
    assert d.placements.get(str(job.id)) is not None
    d.step()
    assert d.placements.get(str(job.id)) is None


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 30), max_size=200), budget=st.integers(0, 5000))
def test_placements_stay_within_their_byte_budget(ids, budget):
    placements = Placements(budget)
    for n in ids:
        placements.put(f"job-{n}", Placement(0, n))
        assert len(placements) * Placements.ENTRY_BYTES <= budget
        if budget >= Placements.ENTRY_BYTES:
            assert placements.get(f"job-{n}") == Placement(0, n)


def test_placements_keep_the_one_looked_up_last_and_drop_the_least_recently_used():
    placements = Placements(2 * Placements.ENTRY_BYTES)
    placements.put("a", Placement(0, 1))
    placements.put("b", Placement(0, 2))
    assert placements.get("a") == Placement(0, 1)
    placements.put("c", Placement(0, 3))
    assert placements.get("b") is None and placements.get("a") == Placement(0, 1)


def ended(job: Job, how: str) -> Job:
    if how == "canceled":
        job.cancel("by its user", AT)
    else:
        job.record_result(0, "done", "o", "p", "", f"{job.id}:0", AT)
    assert job.status.terminal
    return job


@pytest.mark.parametrize("how", ["canceled", "finished"])
def test_the_sweep_sends_nothing_for_a_job_that_ended_since_the_read_model_saw_it(how):
    job = ended(queued_job(1), how)
    d, producer, _ = dispatcher(jobs=[job], queue=FakeQueue())  # the read model still says queued
    assert d.sweep() == 0 and producer.tasks() == []


@pytest.mark.parametrize("how", ["canceled", "finished"])
def test_a_job_queued_delivered_again_after_the_job_ended_sends_nothing(how):
    job = ended(queued_job(1), how)
    d, producer, consumer = dispatcher([envelope(job.id)], jobs=[job], queue=FakeQueue())
    assert d.step() == 0 and producer.tasks() == [] and consumer.commits == 1


def test_a_task_at_the_gpu_groups_committed_offset_is_still_waiting():
    """The group's committed offset is the next one it reads: the task there is not consumed."""
    job = queued_job(3)
    queue = FakeQueue(consumed={0: 2})
    d, _, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    d.step()
    assert d.placements.get(str(job.id)) == Placement(0, 2)
    assert d.sweep() == 0
    queue.consumed[0] = 3
    assert d.sweep() == 3


def test_the_sweep_asks_the_broker_about_one_offset_per_partition_however_many_jobs_wait():
    """Each ask may fetch for ``probe_timeout_s``: the highest offset held answers for those below."""
    jobs = [queued_job(1) for _ in range(4)]

    asked: list[int] = []

    class Counting(FakeQueue):
        def reaches(self, partition: int, offset: int) -> bool:
            asked.append(offset)
            return super().reaches(partition, offset)

    queue = Counting()
    d, _, _ = dispatcher(*[[envelope(job.id)] for job in jobs], jobs=jobs, queue=queue)
    for _ in jobs:
        d.step()
    assert d.sweep() == 0 and asked == [3]


def test_after_a_lost_queue_the_sweep_no_longer_counts_on_tasks_in_the_old_log():
    job = queued_job(2)
    d, _, _ = dispatcher([envelope(job.id)], jobs=[job], queue=FakeQueue())
    d.step()
    assert d.sweep() == 0  # waiting in the queue
    d.queue_lost("lost")
    assert d.sweep() == 2  # the time rule: its placement pointed into the lost log


class Probe:
    """A consumer outside any group: the end offset it is told, and a fetch that finds ``held``."""

    def __init__(self, end: int, held: list[int]) -> None:
        self.end, self.held, self.at = end, held, 0

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.end for tp in tps}

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.at = offset

    def poll(self, timeout_ms: int = 0, max_records: int = 1) -> dict[TopicPartition, list[Record]]:
        return {TopicPartition(GPU_TOPIC, 0): [Record(b"", None, o) for o in self.held if o >= self.at][:max_records]}


@pytest.mark.parametrize(("end", "held", "offset", "reached"), [
    (5, [0, 1, 2, 3, 4], 4, True),  # below the end
    (5, [0, 1, 2, 3, 4], 5, False),  # the end is the next offset: nothing there yet
    (3, [0, 1, 2, 3, 4], 4, True),  # a stale, low end: the fetch finds it
    (3, [0, 1, 2], 4, False),
])
def test_the_queue_reaches_an_offset_only_when_its_log_holds_it(end, held, offset, reached):
    # a fetch that finds the offset answers at once; one that cannot fetches until the timeout
    queue = KafkaTaskQueue(admin=None, probe=Probe(end, held), probe_timeout_s=30.0 if reached else 0.05)
    assert queue.reaches(0, offset) is reached


def test_the_stale_sweep_looks_every_minute_however_long_a_job_may_take_to_be_stale():
    """The default staleness is ten minutes: the sweep still looks every minute (half the
    staleness only when that is shorter), so a stalled job waits at most a minute past it."""
    now, looked = [0.0], []

    def stale_jobs(stale_s: float, limit: int) -> list[UUID]:
        looked.append(now[0])
        return []

    for stale_s, every in ((600.0, 60.0), (20.0, 10.0)):
        now[0], looked = 0.0, []
        d = Dispatcher(FakeConsumer(), FakeProducer(), FakeApp(FakeRepository()), stale_s=stale_s,
                       clock=lambda: now[0], stale_jobs=stale_jobs)
        for tick in range(4):
            now[0] = tick * every - 0.5  # just before each due look: none
            d.step(timeout_ms=0)
            now[0] = tick * every
            d.step(timeout_ms=0)
        assert looked == [every, 2 * every, 3 * every], stale_s


def test_a_parked_records_error_header_is_whole_characters_within_its_bound() -> None:
    """A byte cut split the character across the bound, and a lone surrogate in the error made
    the send raise instead of parking."""
    d, producer, _consumer = dispatcher([])
    d._park(Record(b"v", b"k", 1), ValueError("\u00e9" * 2000))
    d._park(Record(b"v", b"k", 2), ValueError("bad \udc80"))
    [(_, cut), (_, surrogate)] = producer.parked()
    assert cut["error"].decode("utf-8") == "ValueError: " + "\u00e9" * ((2000 - len("ValueError: ")) // 2)
    assert surrogate["error"] == b"ValueError: bad \\udc80"


def test_every_task_of_a_job_goes_under_the_job_id_as_its_key_sent_again_too():
    """One key, so one partition: a job's placement (its last task's offset) speaks for all its tasks."""
    job = queued_job(3)
    queue = FakeQueue(consumed={0: 0})
    d, producer, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    d.step()
    queue.consumed[0] = 3
    assert d.sweep() == 3
    keys = [key for topic, key, _, _ in producer.sent if topic == GPU_TOPIC]
    assert keys == [str(job.id).encode()] * 6


class RefusingLarge(FakeProducer):
    """A producer that refuses a value over 64 KiB, as kafka-python's does past max_request_size."""

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: list[tuple[str, bytes]] | None = None) -> Sent:
        if len(value) > 64 * 1024:
            raise MessageSizeTooLargeError(f"{len(value)} bytes")
        return super().send(topic, key, value, headers)


def test_a_record_too_large_to_park_whole_is_parked_as_its_head_and_the_loop_goes_on():
    big = b"\xff" + b"x" * (100 * 1024)
    consumer = FakeConsumer([Record(big, b"k", 7)])
    producer = RefusingLarge()
    d = Dispatcher(consumer, producer, FakeApp(FakeRepository()), clock=lambda: 0.0)
    assert d.step() == 0
    [(value, headers)] = producer.parked()
    assert value == big[:65536] and headers["truncated"] == b"true" and headers["offset"] == b"7"
    assert consumer.commits == 1


class Losses:
    """The relay's record of broker losses as a consumer sees it: pending until handled."""

    def __init__(self) -> None:
        self.pending = True

    def new_loss(self) -> bool:
        return self.pending

    def handled(self) -> None:
        self.pending = False

    def close(self) -> None:
        pass


def test_a_broker_loss_sends_the_unfinished_tasks_again_once_and_again_after_a_failed_try():
    losses = Losses()
    d, _, _ = dispatcher(queue=FakeQueue())
    d.losses = losses  # type: ignore[assignment]
    tries: list[str] = []

    def queue_lost(why: str, page: int = 500) -> int:
        tries.append(why)
        if len(tries) == 1:
            raise KafkaConnectionError()  # the broker still coming back
        return 0

    d.queue_lost = queue_lost  # type: ignore[method-assign]
    d.step()
    assert len(tries) == 1 and losses.pending  # not handled: tried again
    d.step()
    assert len(tries) == 2 and not losses.pending
    d.step()
    d.step()
    assert len(tries) == 2


class AwayOnce(LogAdmin):
    """The broker away when the dispatcher first makes the GPU queue's topic."""

    def ensure(self, topic: str, partitions: int) -> None:
        if not self.ensured:
            self.ensured = -1
            raise KafkaConnectionError()
        super().ensure(topic, partitions)


def test_no_task_is_sent_before_the_gpu_queues_topic_is_known_to_be_made():
    """Else the broker makes it on the first send, with its own defaults."""
    job = queued_job(2)
    admin = AwayOnce({})
    d, producer, consumer = dispatcher([envelope(job.id)], jobs=[job], queue=FakeQueue(),
                                       rollover=rolling(admin, Clock()))
    assert d.step(timeout_ms=0) == 0
    assert producer.tasks() == [] and consumer.commits == 0 and len(consumer.polls) == 1  # not polled
    assert d.step(timeout_ms=0) == 2
    assert admin.ensured == 0 and consumer.commits == 1


def test_a_database_outage_during_the_sweep_raises():
    """A transient error is not one job's fault: the process restarts, not the sweep skipping every job."""
    d, producer, _ = dispatcher(jobs=[queued_job(1)], queue=FakeQueue(), failure=OperationalError("server closed"))
    with pytest.raises(OperationalError):
        d.sweep()
    assert producer.tasks() == []


def test_a_sweep_the_broker_does_not_answer_about_sends_nothing_and_goes_on():
    job = queued_job(2)
    queue = FakeQueue(consumed={0: 0})
    d, producer, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    d.step()

    def no_answer(partitions: Iterable[int]) -> dict[int, int]:
        raise KafkaTimeoutError("no answer")

    queue.committed = no_answer  # type: ignore[method-assign]
    assert d.sweep() == 0 and len(producer.tasks()) == 2


def test_the_gpu_queues_topic_id_is_asked_once_a_second_however_often_the_loop_steps():
    now, asked = [0.0], []

    class Counting(FakeQueue):
        def log_id(self) -> str:
            asked.append(now[0])
            return super().log_id()

    d = Dispatcher(FakeConsumer(), FakeProducer(), FakeApp(FakeRepository()), clock=lambda: now[0], queue=Counting())
    for t in (0.0, 0.5, 0.99, 1.0, 1.5, 2.25):
        now[0] = t
        d.step(timeout_ms=0)
    assert asked == [0.0, 1.0, 2.25]


class Described:
    def __init__(self, *topics: dict[str, Any]) -> None:
        self.topics = topics

    def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        return list(self.topics)


def test_a_gpu_queue_the_broker_does_not_hold_has_no_id():
    """A missing topic's metadata carries an error and an all-zero id: no id, so not a new queue."""
    zero, real = UUID(int=0), uuid.uuid4()
    missing = {"name": GPU_TOPIC, "error_code": 3, "topic_id": zero}
    assert KafkaTaskQueue(Described(missing), probe=None).log_id() is None
    held = Described({"name": "other", "error_code": 0, "topic_id": zero},
                     {"name": GPU_TOPIC, "error_code": 0, "topic_id": real})
    assert KafkaTaskQueue(held, probe=None).log_id() == real
