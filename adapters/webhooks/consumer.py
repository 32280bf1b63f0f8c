"""The webhook consumer: consumer group ``palette-webhooks`` on ``palette.events`` records one
delivery per (subscribed endpoint, job event) and commits its offset after the database commit;
the sender, a thread of the same process, posts what is due.

Recording is idempotent (a delivery is keyed by endpoint and message id, and a job is folded only
past its last fold), so redelivered records and the sweep cost a lookup. An endpoint receives the
events that happened after it was registered, while it is enabled. Against a broker that
loses messages, as the projector: ``after_loss`` reads the topic again from its start, and a
sweep walks the event log behind the relay every ``sweep_every_s`` to record what never arrived.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from adapters.positions import LossSignal, PgPositions
from adapters.webhooks import store
from adapters.webhooks.events import EVENT_TYPES, payload
from adapters.webhooks.sender import WebhookSender
from adapters.webhooks.signing import message_id
from domain.contracts import topics
from domain.contracts.envelope import EventEnvelope, decode
from domain.contracts.loop import ConsumerLoop
from domain.job import Job
from projections.log import LogReader, events_table

log = logging.getLogger("palette.webhooks")
GROUP = topics.WEBHOOKS_GROUP
SWEEP = "sweep"
SWEEP_PAGE = 2000
REMEMBERED_JOBS = 2000  # owners and last folds kept (least recently used out first)


class _Lru(OrderedDict[UUID, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: UUID, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class DeliveryRecorder:
    """Turns job events into deliveries for their owner's endpoints.

    The broker's records only say which jobs moved, and up to which version: the events come
    from the event store, folded from the job's last fold (kept per job) up to that version. So
    an event the broker lost is recorded with the next one of its job, in its place (a job's
    deliveries go out in version order), and a redelivered record finds nothing new."""

    def __init__(self, conn: psycopg.Connection[Any], log_reader: LogReader, event_store: Any,
                 remembered: int = REMEMBERED_JOBS) -> None:
        self.conn = conn
        self.log = log_reader
        self.event_store = event_store
        self.owners = _Lru(remembered)  # job id -> user id
        self.folds = _Lru(remembered)  # job id -> the job at the last version recorded

    def record(self, envelopes: Iterable[EventEnvelope]) -> int:
        """Record the deliveries of these events (and of their jobs' earlier ones) that are not
        recorded yet; returns how many."""
        heads: dict[UUID, int] = {}
        for e in envelopes:
            if e.stream_type == "Job" and e.type in EVENT_TYPES:
                heads[e.stream_id] = max(heads.get(e.stream_id, 0), e.version)
        if not heads:
            return 0
        for job_id in self._deleted(set(heads)):  # its owner deleted it: nothing of it goes out again
            del heads[job_id]
        owners = self._owners(set(heads))
        by_user: dict[UUID, list[store.Subscriber]] = defaultdict(list)
        for sub in store.subscribers(self.conn, list(set(owners.values()))):
            by_user[sub.user_id].append(sub)
        wanted: list[store.NewDelivery] = []
        folded: list[Job] = []
        for job_id, head in heads.items():
            subs = by_user.get(owners[job_id]) if job_id in owners else None
            if not subs:
                continue
            job, events = self._fold(job_id, head)
            folded += [job] if job is not None else []
            wanted += [store.NewDelivery(sub.endpoint_id, message_id(job_id, version), job_id, version, kind, body)
                       for version, kind, at, body in events for sub in subs
                       if kind in sub.events and at >= sub.since]
        done = store.recorded(self.conn, [(d.endpoint_id, d.message_id) for d in wanted])
        recorded = store.record(self.conn, [d for d in wanted if (d.endpoint_id, d.message_id) not in done])
        for job in folded:  # only once recorded: a failure leaves the next try to fold them again
            self.folds.keep(job.id, job)
        return recorded

    def _deleted(self, job_ids: set[UUID]) -> set[UUID]:
        """The jobs among these whose log holds a JobDeleted (their deliveries were forgotten on
        purpose: a redelivered or swept record must not bring them back)."""
        if not job_ids:
            return set()
        table = events_table(self.log.recorder)
        rows = self.conn.execute(sql.SQL("SELECT DISTINCT originator_id FROM {} WHERE originator_id = ANY(%s) "
                                         "AND topic = %s").format(table),
                                 [list(job_ids), f"{Job.__module__}:{Job.JobDeleted.__qualname__}"]).fetchall()
        return {row[0] for row in rows}

    def _owners(self, job_ids: set[UUID]) -> dict[UUID, UUID]:
        """The owners of these jobs, from the cache or the log. Answered from what was found, not
        read back from the cache: the owners read into it pushed out the oldest it held, which
        could be jobs of this very batch, and their events were skipped."""
        found = {j: self.owners[j] for j in job_ids if j in self.owners}
        for j in found:
            self.owners.move_to_end(j)  # least recently used out first, as its name says
        unknown = {j: (0, 1) for j in job_ids if j not in found}
        for created in self.log.stream_events(unknown):
            found[created.stream_id] = UUID(str(created.data["user_id"]))
            self.owners.keep(created.stream_id, found[created.stream_id])
        return found

    def _fold(self, job_id: UUID, head: int) -> tuple[Job | None, list[tuple[int, str, datetime, bytes]]]:
        """The job at ``head`` and its webhook events since its last fold (version, type, time,
        payload); nothing when the last fold is at ``head`` already."""
        job: Job | None = self.folds.get(job_id)
        if job is not None and job.version >= head:
            return None, []
        job = copy.deepcopy(job)
        events: list[tuple[int, str, datetime, bytes]] = []
        for event in self.event_store.get(job_id, gt=job.version if job else None, lte=head):
            job = event.mutate(job)
            assert job is not None
            kind = EVENT_TYPES.get(type(event).__name__)
            if kind is not None:
                idx = event.idx if kind == "item.completed" else None
                events.append((job.version, kind, event.timestamp, payload(kind, event.timestamp, job, idx)))
        return job, events


class WebhookConsumer(ConsumerLoop):
    def __init__(self, consumer: Any, recorder: DeliveryRecorder, sender: WebhookSender, log_reader: LogReader,
                 positions: PgPositions, published: Callable[[], int], sweep_every_s: float = 30.0,
                 losses: LossSignal | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.recorder = recorder
        self.sender = sender
        self.log = log_reader
        self.positions = positions
        self.published = published  # how far the relay has published (the sweep stays behind it)
        self.sweep_every_s = sweep_every_s
        self.losses = losses
        self.clock = clock
        if positions.find(SWEEP) is None:
            # A new group reads the topic from its start, but the broker's log may begin past the
            # event log's: the relay starts it afresh without waiting for a group that never
            # started (adapters.rollover), and a broker that restarted empty holds only what was
            # published again. With an endpoint registered already, the sweep starts at the log's
            # start; with none, at the relay (read first: an endpoint registered after this look
            # receives only events published after it).
            relay = published()
            positions.save(SWEEP, 0 if store.any_endpoint(recorder.conn) else relay)
        self.sweep_bound = published()
        self._next_sweep = clock() + sweep_every_s
        self.recorded = 0

    def step(self, timeout_ms: int = 100) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        envelopes = []
        for records in polled.values():
            for record in records:
                try:
                    envelopes.append(decode(record.value))
                except ValueError:  # only the relay writes this topic: a bug, not data
                    log.error("undecodable message at %s:%s offset %s skipped",
                              record.topic, record.partition, record.offset)
        recorded = self.recorder.record(envelopes) if envelopes else 0
        if polled:
            self.consumer.commit()
        if self.losses is not None and self.losses.new_loss():
            self.after_loss()
            self.losses.handled()
        if self.clock() >= self._next_sweep:
            recorded += self.sweep()
        if recorded:
            self.recorded += recorded
            self.sender.wake()
        return len(envelopes)

    def after_loss(self) -> None:
        """The broker lost messages: read its (new) log from the start, and sweep the event log up
        to the relay now rather than at the next interval. Duplicates change nothing."""
        with contextlib.suppress(Exception):  # no partitions assigned yet: the group starts at the start
            self.consumer.seek_to_beginning()
        self.sweep_bound = self.published()
        self._next_sweep = self.clock()
        log.warning("the broker lost messages: reading its log again from the start")

    def sweep(self, limit: int = SWEEP_PAGE) -> int:
        """Record one page of the log behind the relay (what the broker never delivered)."""
        page = self.log.read(self.positions.get(SWEEP), self.sweep_bound, limit)
        recorded = self.recorder.record(page) if page else 0
        if page:
            self.positions.save(SWEEP, page[-1].id)
        if recorded:
            log.warning("sweep recorded %d delivery(ies) of events the broker had not delivered", recorded)
        if len(page) < limit:
            self.sweep_bound = self.published()
            self._next_sweep = self.clock() + self.sweep_every_s
        return recorded

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop``, the sender posting in a thread of its own meanwhile."""
        sending = threading.Thread(target=self.sender.run, args=(stop,), name="webhook-sender", daemon=True)
        sending.start()
        try:
            super().run(stop)
        finally:
            stop.set()
            self.sender.wake()
            sending.join()

    def close(self) -> None:
        self.consumer.close()
        if self.losses is not None:
            self.losses.close()
        self.sender.close()
        self.positions.close()
        self.recorder.conn.close()
        self.log.close()
