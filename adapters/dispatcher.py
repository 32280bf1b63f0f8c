"""The dispatcher: on ``JobQueued``, one task per item to ``palette.gpu-jobs`` (key = job id).
At-least-once; the GPU worker's callback key makes duplicates harmless.

A record it cannot handle never stops it: an envelope that does not decode, a ``JobQueued`` whose
job cannot be loaded or whose preset is unknown, a task the broker refuses as too large, any other
error while building tasks. Such a record is logged in one line and parked as it came on
``palette.events.dispatcher-dlq`` (same key and value, or the value's first 64 KiB and a
``truncated`` header where the whole is more than the producer sends; the reason in its ``error``
header, the origin in ``topic``/``partition``/``offset`` headers); the loop goes on. Database
and broker errors are transient and raise: the supervisor restarts the process and the
uncommitted records come again.

A broker that loses an acknowledged message (seen with the embedded broker under SIGKILL) would
leave a job queued forever, so the dispatcher also sweeps: a queued or running job without
progress for ``stale_s`` gets the tasks of its unfinished items again, unless they are merely
waiting behind a backlog. The dispatcher remembers where each job's tasks went (partition and
offset of its last task, from the producer's acknowledgement; least recently used out first,
within a byte budget) and sends again only when the GPU consumer group has committed past that
offset (consumed, yet no progress) or the partition's log no longer reaches it (lost). A job it
holds no position for (dispatched before a restart, or forgotten) falls back to the time rule.

A loss is acted on at once, not after ``stale_s``: the relay records a loss of the events it
published (``LossSignal``), and the dispatcher asks the GPU queue's topic id every second, since a
broker restarted again after the relay published everything anew holds the events but none of
the tasks sent before (it recreated the topic under a new id). Either way the unfinished items of
every queued or running job go out again.

The GPU queue's log is started afresh as ``palette.events``' is (``adapters.rollover``: the
embedded broker's fetches cost more with every batch a partition holds), by the dispatcher, its
producer, on memory storage: between two steps, once a partition took
``PALETTE_BROKER_LOG_BATCHES`` batches, every partition holds as many tasks, and the GPU group
(which holds the queue even with no member and no offsets: it has no sweep) has committed
exactly up to the ends the broker acknowledged to this dispatcher. Only the one dispatcher
running does it (``ALONE_LOCK``: another's tasks would go with the old log), and not while the
broker says the log is longer than this dispatcher knows it (tasks of one gone since). Its
placements, which point into the old log, are forgotten, and the new topic id is taken as its
own doing, not as a lost queue. On s3 storage a lost tail keeps the topic and its id, and a
group's commit from before it could pass for progress, so the queue is not started afresh there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import psycopg
from eventsourcing.persistence import ConnectionPoolClosedError, PersistenceError
from kafka.errors import KafkaError, MessageSizeTooLargeError

from adapters import kafka_io
from adapters.positions import LossSignal, lock_holder
from adapters.rollover import LogRollover
from domain.contracts import topics
from domain.contracts import trace as tracing
from domain.contracts.envelope import decode
from domain.contracts.gpu_task import tasks_for as build_tasks
from domain.contracts.loop import ConsumerLoop
from domain.job import Job
from domain.presets import PRESETS
from domain.text import utf8_head

log = logging.getLogger("palette.dispatcher")
GROUP = topics.DISPATCHER_GROUP
GPU_GROUP = topics.GPU_GROUP
GPU_TOPIC = topics.GPU_TASKS
DLQ_TOPIC = topics.DISPATCHER_DLQ
# Errors of the database or the broker: the record is fine, the process restarts and reads it again.
TRANSIENT: tuple[type[BaseException], ...] = (PersistenceError, ConnectionPoolClosedError, psycopg.Error,
                                              KafkaError, OSError)
PLACEMENTS_BYTES = 16 * 1024 * 1024
# Every dispatcher holds it shared while it lives; the GPU queue is started afresh only by one
# that can take it exclusively too, so by the only dispatcher running (no other's tasks in flight).
ALONE_LOCK = "palette-dispatcher:alone"
QUEUE_CHECK_S = 1.0  # how often the GPU queue's topic id is asked (one metadata request)


def tasks_for(job: Job) -> list[dict[str, Any]]:
    """The GPU tasks of a queued job (a mask key for every concept of its preset)."""
    return build_tasks(job.user_id, UUID(str(job.id)), job.item_count, job.concepts, job.protect,
                       PRESETS[job.preset].concepts)


def unfinished_tasks(job: Job) -> list[dict[str, Any]]:
    """The GPU tasks of a job's items that have no result yet."""
    return [t for t in tasks_for(job) if t["idx"] not in job.items]


@dataclass(frozen=True)
class Placement:
    """Where a job's last task was written (all its tasks share the key, so the partition)."""

    partition: int
    offset: int


class Placements:
    """Placements by job id, least recently used out first, within ``budget_bytes``. Entries are
    of one size: a job id string, a small object and a dictionary slot (``ENTRY_BYTES``)."""

    ENTRY_BYTES = 250

    def __init__(self, budget_bytes: int = PLACEMENTS_BYTES) -> None:
        self.capacity = max(0, budget_bytes // self.ENTRY_BYTES)
        self._entries: OrderedDict[str, Placement] = OrderedDict()

    def put(self, job_id: str, placement: Placement) -> None:
        self._entries[job_id] = placement
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, job_id: str) -> Placement | None:
        placement = self._entries.get(job_id)
        if placement is not None:
            self._entries.move_to_end(job_id)
        return placement

    def discard(self, job_id: str) -> None:
        self._entries.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class TaskQueue(Protocol):
    """What the broker says about the GPU queue."""

    def committed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The GPU group's committed offset by partition (absent: nothing committed)."""

    def reaches(self, partition: int, offset: int) -> bool:
        """Whether the partition's log still holds ``offset`` (False: the broker lost it)."""

    def log_id(self) -> Any:
        """The queue's topic id: a broker that restarted empty recreates the topic under a new
        one (None when the broker does not say)."""

    def ends(self) -> dict[int, int]:
        """The next offset of each partition, as the broker answers (it may answer low)."""


class KafkaTaskQueue:
    """The GPU queue as the broker reports it. The group's committed offsets are exact. End offsets
    are not always (the embedded broker answers stale, low ones), so an end offset at or below the
    offset asked about is checked by fetching from that offset before the log counts as short."""

    def __init__(self, admin: Any, probe: Any, topic: str = GPU_TOPIC, group: str = GPU_GROUP,
                 probe_timeout_s: float = 2.0) -> None:
        self.admin = admin
        self.probe = probe  # a consumer outside any group: assigned and moved by hand, never subscribed
        self.topic = topic
        self.group = group
        self.probe_timeout_s = probe_timeout_s

    @classmethod
    def connect(cls, bootstrap: str, topic: str = GPU_TOPIC, group: str = GPU_GROUP) -> KafkaTaskQueue:
        from kafka import KafkaAdminClient, KafkaConsumer

        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                              auto_offset_reset="latest", fetch_max_wait_ms=100, request_timeout_ms=10000)
        return cls(admin, probe, topic, group)

    def committed(self, partitions: Iterable[int]) -> dict[int, int]:
        from kafka import TopicPartition

        wanted = [TopicPartition(self.topic, p) for p in sorted(set(partitions))]
        if not wanted:
            return {}
        offsets = self.admin.list_group_offsets({self.group: wanted}).get(self.group, {})
        return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    def reaches(self, partition: int, offset: int) -> bool:
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, partition)
        end = self.probe.end_offsets([tp]).get(tp)
        if end is not None and end > offset:
            return True
        self.probe.assign([tp])
        self.probe.seek(tp, offset)
        deadline = time.monotonic() + self.probe_timeout_s
        while time.monotonic() < deadline:
            for records in self.probe.poll(timeout_ms=200, max_records=1).values():
                if any(r.offset >= offset for r in records):
                    return True
        return False

    def log_id(self) -> Any:
        for topic in self.admin.describe_topics([self.topic]):
            if topic.get("name") == self.topic and topic.get("error_code", 0) == 0:
                return topic.get("topic_id")
        return None

    def ends(self) -> dict[int, int]:
        return kafka_io.end_offsets(self.probe, self.topic)

    def close(self) -> None:
        self.probe.close()
        self.admin.close()


class Dispatcher(ConsumerLoop):
    def __init__(self, consumer: Any, producer: Any, app: Any, database_url: str | None = None,
                 stale_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 queue: TaskQueue | None = None,
                 stale_jobs: Callable[[float, int], Sequence[Any]] | None = None,
                 placements_bytes: int = PLACEMENTS_BYTES, losses: LossSignal | None = None,
                 rollover: LogRollover | None = None, topic: str = GPU_TOPIC) -> None:
        self.consumer = consumer
        self.topic = topic  # the GPU queue
        self.producer = producer
        self.app = app
        self.repository = app.repository
        self.dispatched = 0
        self.parked = 0
        self.stale_s = stale_s
        self.sweep_every_s = min(60.0, stale_s / 2)
        self.clock = clock
        self.queue = queue
        self.placements_bytes = placements_bytes
        self.placements = Placements(placements_bytes)
        self.losses = losses  # says when the relay saw the broker lose messages
        self.conn = lock_holder(database_url) if database_url else None  # ALONE_LOCK's session
        self.stale_jobs = stale_jobs or (self._stale_jobs_in_read_model if self.conn is not None else None)
        self._next_sweep = clock() + self.sweep_every_s
        self._swept_to: tuple[Any, Any] | None = None  # (updated_at, id) the last sweep's page ended at
        self.queue_check_s = QUEUE_CHECK_S
        self._next_queue_check = clock()
        self._queue_id: Any = None  # the GPU queue's topic id when last checked
        self._resent_for: Any = None  # the topic id the unfinished tasks were last sent again into
        self.rollover = rollover  # starts the GPU queue's log afresh (see the module's docstring)
        self.ends: dict[int, int] = {}  # the queue's next offset by partition, as acknowledged to this one
        if rollover is not None:
            # The GPU group has no sweep of its own: with no member and no offsets it still holds
            # the queue (the relay's readers, which sweep the event log, do not).
            rollover.hold(rollover.groups)
            if self.conn is not None:
                self.conn.execute("SELECT pg_advisory_lock_shared(hashtext(%s))", [ALONE_LOCK])

    # -- the stale sweep ------------------------------------------------------------------------
    def _stale_jobs_in_read_model(self, stale_s: float, limit: int) -> Sequence[Any]:
        """A page of the stale jobs, stalest first, each pass on from where the last one stopped
        (from the start again after the last page): rows that stay stale whatever the sweep does
        (a finished job's row held behind a dead letter, jobs waiting behind a backlog) never
        hide the jobs after them."""
        assert self.conn is not None
        while True:
            at, job = self._swept_to or (None, None)
            rows = self.conn.execute(
                "SELECT id, updated_at FROM palette_read.jobs_log WHERE status IN ('queued', 'running') "
                "AND updated_at < now() - %s * interval '1 second' "
                "AND (%s::timestamptz IS NULL OR (updated_at, id) > (%s::timestamptz, %s::uuid)) "
                "ORDER BY updated_at, id LIMIT %s", [stale_s, at, at, job, limit]).fetchall()
            self._swept_to = (rows[-1][1], rows[-1][0]) if rows and len(rows) == limit else None
            if rows or at is None:
                break
            # Nothing came after the last page, which was a full one: from the start again.
        return [job_id for (job_id, _) in rows]

    def sweep(self, limit: int = 100) -> int:
        """Dispatch again the unfinished items of jobs that made no progress for ``stale_s`` and
        whose tasks are not waiting in the queue."""
        assert self.stale_jobs is not None
        return self._send_again(self.stale_jobs(self.stale_s, limit), "stalled")

    def after_loss(self, page: int = 500) -> int:
        """The broker lost messages (the relay recorded it): the events are read again from the
        start of the (new) log, and the GPU tasks are sent again (``queue_lost``), unless the
        queue check already did for the queue as it is now (one restart, seen both ways). A loss
        that kept the queue's id (a lost tail, on s3 storage) sends them again all the same."""
        with contextlib.suppress(Exception):  # no partitions assigned yet: the group starts at the start
            self.consumer.seek_to_beginning()
        now = self.queue.log_id() if self.queue is not None else None
        if now is not None and now == self._resent_for:  # the queue check saw this restart first
            self._queue_id = now
            return 0
        sent = self.queue_lost("unfinished after a broker loss", page)
        if now is not None:  # this loss is the one a queue check would find
            self._queue_id = now
        return sent

    def check_queue(self) -> int:
        """Every ``queue_check_s``: whether the broker recreated the GPU queue since the last check
        (it restarted empty). The relay sees a loss of the events it published, not always of
        the queue: a broker that restarts again after the relay published everything again holds
        the events, and none of the tasks sent before."""
        if self.queue is None or self.clock() < self._next_queue_check:
            return 0
        self._next_queue_check = self.clock() + self.queue_check_s
        try:
            now = self.queue.log_id()
        except TRANSIENT as e:
            log.debug("GPU queue not checked (%s)", type(e).__name__)
            return 0
        sent = 0
        if now is not None and self._queue_id not in (None, now):
            log.warning("the broker recreated %s: the tasks sent before are gone", self.topic)
            sent = self.queue_lost("unfinished after the GPU queue was lost")  # raises: checked again
            self._resent_for = now
        if now is not None:
            self._queue_id = now
        return sent

    def queue_lost(self, why: str, page: int = 500) -> int:
        """GPU tasks in the broker's log may be gone: the unfinished items of every queued or
        running job are sent again now, not after ``stale_s`` (the worker's callback key makes a
        duplicate harmless), and the placements, which point into the lost log, are forgotten."""
        self.placements = Placements(self.placements_bytes)
        self.ends = {}
        if self.rollover is not None:
            self.rollover.batches.clear()
        if self.conn is None:
            return 0
        # A job whose jobs_log row is held behind a dead letter may read as anything there: its
        # aggregate says whether it is unfinished.
        held = self.conn.execute("SELECT DISTINCT stream_id FROM palette_read.dead_letters "
                                 "WHERE model = 'jobs_log' AND status IN ('parked', 'held')").fetchall()
        sent, after = self._send_again([job_id for (job_id,) in held], why), None
        while True:
            rows = self.conn.execute(
                "SELECT id FROM palette_read.jobs_log WHERE status IN ('queued', 'running') "
                "AND (%s::uuid IS NULL OR id > %s::uuid) AND id NOT IN (SELECT stream_id FROM "
                "palette_read.dead_letters WHERE model = 'jobs_log' AND status IN ('parked', 'held')) "
                "ORDER BY id LIMIT %s", [after, after, page]).fetchall()
            sent += self._send_again([job_id for (job_id,) in rows], why)
            if len(rows) < page:
                return sent
            after = rows[-1][0]

    def _send_again(self, job_ids: Sequence[Any], why: str) -> int:
        jobs: list[tuple[Job, list[dict[str, Any]]]] = []
        for job_id in job_ids:
            try:
                job = self.repository.get(job_id)
                if job.status.value not in ("queued", "running"):
                    continue  # the read model lags the store: it finished meanwhile
                jobs.append((job, unfinished_tasks(job)))
            except TRANSIENT:
                raise
            except Exception as e:  # noqa: BLE001 - one job that cannot be built never stops the sweep
                log.error("%s job %s cannot be dispatched: %s: %s", why, job_id, type(e).__name__, str(e)[:200],
                          extra={"job_id": str(job_id)})
        try:
            waiting = self._waiting([job for job, _ in jobs])
        except TRANSIENT as e:
            log.warning("%d %s job(s) not dispatched again yet: the broker did not answer (%s)", len(jobs), why,
                        type(e).__name__)
            return 0
        sent: list[tuple[str, Any]] = []
        for job, tasks in jobs:
            if str(job.id) not in waiting:
                sent.extend((task["job_id"], self._send(task)) for task in tasks)
        self._flush(sent)
        if sent:
            log.warning("dispatched %d task(s) of %d %s job(s) again", len(sent), len(jobs) - len(waiting), why)
        if waiting:
            log.info("%d %s job(s) still waiting in the GPU queue", len(waiting), why)
        return len(sent)

    def _waiting(self, jobs: Sequence[Job]) -> set[str]:
        """The jobs whose last task is still in the queue: not consumed by the GPU group, and the
        log still holds it. Jobs without a known placement are not waiting (the time rule)."""
        if self.queue is None:
            return set()
        known = {str(job.id): p for job in jobs if (p := self.placements.get(str(job.id))) is not None}
        if not known:
            return set()
        committed = self.queue.committed(p.partition for p in known.values())
        reached: dict[int, int] = {}  # by partition, an offset the log holds (so every one below it)
        waiting = set()
        for job_id, p in sorted(known.items(), key=lambda kv: -kv[1].offset):  # highest first: one probe
            if committed.get(p.partition, -1) > p.offset:
                continue  # consumed, yet no progress: send again
            if reached.get(p.partition, -1) >= p.offset or self.queue.reaches(p.partition, p.offset):
                reached[p.partition] = max(reached.get(p.partition, -1), p.offset)
                waiting.add(job_id)
        return waiting

    # -- sending ----------------------------------------------------------------------------------
    def _send(self, task: dict[str, Any]) -> Any:
        trace = task.get(tracing.HEADER, "")
        return self.producer.send(self.topic, key=task["job_id"].encode(), value=json.dumps(task).encode(),
                                  headers=[(tracing.HEADER, trace.encode())] if trace else None)

    def _flush(self, sent: list[tuple[str, Any]]) -> None:
        """Wait for the broker's acknowledgements, remember where each job's tasks went, and count
        them (``dispatched``: the step's, the stale sweep's and a lost queue's alike)."""
        if not sent:
            return
        self.producer.flush()
        partitions = set()
        for job_id, future in sent:
            meta = future.get(timeout=30)
            self.dispatched += 1
            partitions.add(meta.partition)
            self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)
            last = self.placements.get(job_id)
            if last is None or last.partition != meta.partition or meta.offset > last.offset:
                self.placements.put(job_id, Placement(meta.partition, meta.offset))
        if self.rollover is not None:
            self.rollover.count(partitions)

    def dispatch(self, tasks: Sequence[dict[str, Any]]) -> int:
        """Send tasks and wait for the broker; returns how many went out."""
        sent = [(task["job_id"], self._send(task)) for task in tasks]
        self._flush(sent)
        return len(sent)

    def _tasks_of(self, record: Any) -> list[dict[str, Any]]:
        env = decode(record.value)
        if env.type in ("JobFinished", "JobCanceled"):
            self.placements.discard(str(env.stream_id))
        if env.type != "JobQueued":
            return []
        # The job as it is now: a JobQueued delivered again (a redelivery, or the relay publishing
        # again after a broker loss) sends only what is still unfinished, and nothing for a job
        # that ended meanwhile.
        job = self.repository.get(env.stream_id)
        if job.status.value not in ("queued", "running"):
            return []
        tasks = unfinished_tasks(job)
        if env.trace:  # the request's trace goes on with the tasks, to the worker and its callbacks
            for task in tasks:
                task[tracing.HEADER] = env.trace
        log.info("dispatching %d task(s) of job %s", len(tasks), env.stream_id,
                 extra={"job_id": str(env.stream_id), "trace_id": tracing.trace_id(env.trace)})
        return tasks

    def _park(self, record: Any, error: BaseException) -> Any:
        """Send ``record`` to the DLQ with why; the send's future."""
        reason = f"{type(error).__name__}: {error}"
        log.error("record %s/%s/%s parked on %s: %s", record.topic, record.partition, record.offset, DLQ_TOPIC,
                  " ".join(reason.split())[:300])
        headers = [("error", utf8_head(reason, 2000)), ("topic", str(record.topic).encode()),
                   ("partition", str(record.partition).encode()), ("offset", str(record.offset).encode())]
        value = record.value if record.value is not None else b""
        try:
            sent = self.producer.send(DLQ_TOPIC, key=record.key, value=value, headers=headers)
        except MessageSizeTooLargeError:  # larger than this producer sends: its head is enough to look into it
            sent = self.producer.send(DLQ_TOPIC, key=record.key, value=value[:64 * 1024],
                                      headers=[*headers, ("truncated", b"true")])
        self.parked += 1
        return sent

    def start_queue_afresh(self) -> bool:
        """Between two steps, with every task sent acknowledged: make the GPU queue's topic if it
        is missing (a dispatcher that died between deleting and creating it), then start its
        log afresh if it is due and the GPU group has read it all. True when it did."""
        r = self.rollover
        if r is None:
            return False
        try:
            if r.missing:
                r.ensure_topic()
            if not r.due(self.ends):
                return False
            with self._alone() as alone:
                if not alone:
                    r.postpone("another dispatcher is running")
                    return False
                if self.queue is not None and any(end > self.ends.get(p, 0) for p, end in self.queue.ends().items()):
                    r.postpone("tasks this dispatcher did not send are in it")  # a dispatcher gone since
                    return False
                if not r.read_by_all(self.ends):
                    return False
                r.start_afresh()
        except (KafkaError, OSError) as e:  # the broker away: tried again later
            r.postpone(f"the broker did not answer ({type(e).__name__})")
            return False
        self.ends = {}
        self.placements = Placements(self.placements_bytes)  # offsets in the old log
        try:  # the new id is this dispatcher's doing, not a lost queue; a loss after it is one
            self._queue_id = self.queue.log_id() if self.queue is not None else None
        except TRANSIENT:
            self._queue_id = None
        return True

    @contextlib.contextmanager
    def _alone(self) -> Iterator[bool]:
        """``ALONE_LOCK`` taken exclusively for the block: True when no other dispatcher holds it
        (without a database, as in tests on fakes, this one is taken to be alone)."""
        if self.conn is None:
            yield True
            return
        row = self.conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [ALONE_LOCK]).fetchone()
        if not (row and row[0]):
            yield False
            return
        try:
            yield True
        finally:
            self.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [ALONE_LOCK])

    def step(self, timeout_ms: int = 100) -> int:
        self.start_queue_afresh()
        if self.rollover is not None and self.rollover.missing:  # the broker away mid fresh start
            time.sleep(timeout_ms / 1000)
            return 0  # no task is sent into a topic the broker would make with its own defaults
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        sent: list[tuple[str, Any]] = []
        parked: list[Any] = []
        for records in polled.values():
            for record in records:
                try:
                    tasks = self._tasks_of(record)
                    sent.extend((task["job_id"], self._send(task)) for task in tasks)
                except MessageSizeTooLargeError as e:  # a KafkaError, yet the record's fault, not the broker's
                    parked.append(self._park(record, e))
                except TRANSIENT:
                    raise
                except Exception as e:  # noqa: BLE001 - a record it cannot handle is parked, never a stop
                    parked.append(self._park(record, e))
        self._flush(sent)
        if polled:
            self.producer.flush()  # the parked records too, acknowledged before their offsets are committed
            for copy in parked:
                copy.get(timeout=30)  # flush does not raise for a send the broker refused: this does
            self.consumer.commit()
        try:
            if self.losses is not None and self.losses.new_loss():
                self.after_loss()
                self.losses.handled()
            self.check_queue()
        except KafkaError as e:  # the broker is still coming back: the loss stays pending, the queue's id unseen
            log.warning("tasks of unfinished jobs not sent again yet (%s); trying again", type(e).__name__)
        if self.stale_jobs is not None and self.clock() >= self._next_sweep:
            self._next_sweep = self.clock() + self.sweep_every_s
            self.sweep()
        return len(sent)

    def close(self) -> None:
        self.consumer.close()
        if self.losses is not None:
            self.losses.close()
        self.producer.close()
        if self.rollover is not None:
            self.rollover.close()
        if self.queue is not None and hasattr(self.queue, "close"):
            self.queue.close()
        if self.conn is not None:
            self.conn.close()
        self.app.close()
