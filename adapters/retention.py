"""`palette serve sweeper`: the data lifecycle's clock.

Each pass (every ``PALETTE_SWEEP_INTERVAL_S``):

1. **Retention** — the objects (inputs, outputs, masks, previews) of jobs that finished more than
   ``PALETTE_RETENTION_DAYS`` ago are deleted, then ``ObjectsExpired`` is recorded on the job (it
   stays listed; GET /jobs/{id} gives no links). Jobs are taken from ``jobs_log`` in ``(finished_at,
   id)`` order after a cursor kept in ``palette_sweeps``, so a pass costs what finished since the
   last one, and a crash between the deletion and the event only repeats a harmless deletion.
   A job never executed nor canceled never finishes: once it was *created* that long ago it is
   canceled (refunded), its objects deleted and ``ObjectsExpired`` recorded (a ``(created_at,
   id)`` cursor). A job that finished having spent nothing (canceled or failed with no item
   done: every credit refunded) keeps its objects ``PALETTE_UNPAID_RETENTION_DAYS`` only, so a
   client canceling, or rerunning and canceling, holds no storage for a month for free.
2. **Erasures** — those a crash cut short (tombstone without ``completed_at``) are finished; one
   that fails is logged (its traceback the first time, a line after) and tried again after a
   wait that doubles with each failure, from ``PALETTE_ERASURE_SWEEP_S`` up to
   ``ERASURE_RETRY_MAX_S``; the others go on.
3. **Late uploads** — a GPU worker busy with an item when its job was canceled and deleted, or its
   user erased, may still upload the output afterwards, and so may a client through an upload link
   handed out before (links live ``URL_TTL_S``): the objects of jobs deleted and users erased are
   deleted once more when ``LATE_UPLOADS_S`` have passed, and an erased user's webhook endpoints
   and kept idempotent answers too (a request in flight during the erasure may write them after
   it), and a deleted job's webhook deliveries (an API process that died between recording the
   deletion and forgetting them left them); cursors in ``palette_sweeps``, every settled one in
   the pass, a page at a time.
4. **Oversized uploads** — an upload link cannot bound what is sent through it (a presigned PUT
   signs no size), and confirm-upload refuses only what is there when it runs: once a job's links
   have expired (``LINKS_EXPIRED_S`` after its creation: a retried creation hands them out again
   only within ``REISSUE_S`` of it), every object under its inputs and masks
   larger than ``MAX_INPUT_BYTES`` is deleted (what the GPU worker would refuse anyway), so what
   a link admits beyond it lasts at most that long plus one pass. A ``JobCreated`` position
   cursor; jobs older than the retention period are skipped (their objects expire anyway).
5. **Superseded snapshots** — a load reads only a stream's newest snapshot (the newest with an
   event of its version: ``adapters.pg_streams``), so every older one of the stream is deleted,
   ``SNAPSHOT_BATCH`` a statement (each its own transaction, after the last one's keys), until a
   statement deletes fewer. A row is deleted only where the same statement sees a newer snapshot
   of its stream with its event: the newest is never deleted, whatever is written meanwhile (a
   snapshot not yet committed is not seen, and leaves the one before it in place), and a load
   running meanwhile reads its own MVCC snapshot of the table.

Between passes, every ``PALETTE_ERASURE_SWEEP_S``, the served sweeper finishes erasures (step 2)
alone: a client whose ``DELETE /me`` died with its API process cannot retry (the tombstone refuses
its token), so waiting an hour for the next pass would leave its photos that long. It takes only
tombstones older than ``PALETTE_ERASURE_GRACE_S`` (by PostgreSQL's clock, which wrote them),
longer than an erasure takes, so it stays off one an API request is still performing; should the
two meet anyway (an erasure slower than the grace, two sweepers, ``palette admin sweep``), every
step of an erasure is idempotent — ``Erased`` is recorded once (the loser of the write conflict
decides again and finds it recorded), the deletions find nothing left, ``completed_at`` is set once
— so the cost is work done twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from eventsourcing.persistence import Notification, PersistenceError
from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg import sql

from adapters import keyring
from adapters.api.unavailable import store_away
from adapters.ddl import run_locked
from adapters.erasure import erase, forget_job_deliveries, forget_user_data
from adapters.objects import delete_larger, delete_prefixes
from adapters.settings import Settings
from application.executors import snapshot_recorder
from application.unit_of_work import ConflictError
from domain.contracts.envelope import EventEnvelope
from domain.contracts.keys import (
    LINKS_EXPIRED_S,
    MAX_INPUT_BYTES,
    URL_TTL_S,
    inputs_prefix,
    job_prefixes,
    masks_prefix,
    user_prefixes,
)
from domain.errors import DomainError
from domain.job import Job
from projections.log import events_table
from projections.stored_events import from_notification

if TYPE_CHECKING:
    from adapters.bootstrap import Container

log = logging.getLogger("palette.sweeper")
PAGE = 500  # jobs per query
# Upload links handed out before a deletion or an erasure work until they expire, and a worker
# busy with an item uploads its output once done (far sooner).
LATE_UPLOADS_S = URL_TTL_S + 300.0
ERASURE_RETRY_MAX_S = 3600.0  # the longest wait before an erasure that keeps failing is tried again
DDL = ("CREATE TABLE IF NOT EXISTS palette_sweeps (name text PRIMARY KEY, at timestamptz NOT NULL, "
       "id uuid NOT NULL, position bigint NOT NULL DEFAULT 0)",)
JOB_DELETED = "domain.job:Job.JobDeleted"
JOB_CREATED = "domain.job:Job.JobCreated"
TERMINAL = ("done", "failed", "canceled")
UNPAID = ("failed", "canceled")  # with no item done, such a job spent no credit
# How late the projector may fold a job's finish into jobs_log: a cursor that found nothing stays
# this far behind its cutoff.
PROJECTION_SLACK = timedelta(hours=1)
# What a pass meets when PostgreSQL, the event store (its group committer's WrittenTooLate too) or
# S3 fails, or a job's stream keeps conflicting past the retries: it is tried again by the next sweep.
PASS_ERRORS = (psycopg.Error, PersistenceError, OSError, BotoCoreError, ClientError, ConflictError)
UNSTARTED = ("created", "uploaded")  # never finish unless executed or canceled
SNAPSHOT_BATCH = 1000  # superseded snapshots deleted a statement
# Snapshots of a stream with a newer one that has its event (a snapshot past the stream's end,
# in a store restored behind its snapshots, is passed over by loads: it supersedes nothing),
# after a (stream, version) key, in the primary key's order.
PRUNE_SNAPSHOTS = sql.SQL(
    "DELETE FROM {snapshots} d USING (SELECT o.originator_id, o.originator_version FROM {snapshots} o "
    "WHERE (o.originator_id, o.originator_version) > (%s, %s) AND EXISTS (SELECT 1 FROM {snapshots} n "
    " WHERE n.originator_id = o.originator_id AND n.originator_version > o.originator_version"
    " AND (n.originator_id, n.originator_version) > (%s, %s)"  # so implied: bounds a merge's scan of n
    " AND EXISTS (SELECT 1 FROM {events} e WHERE e.originator_id = n.originator_id"
    "  AND e.originator_version = n.originator_version"
    "  AND (e.originator_id, e.originator_version) > (%s, %s))) "  # and of e (a merge join re-read its start)
    "ORDER BY o.originator_id, o.originator_version LIMIT %s) s "
    "WHERE d.originator_id = s.originator_id AND d.originator_version = s.originator_version "
    "RETURNING d.originator_id, d.originator_version")


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """``DDL``, once: every sweeper (and ``palette admin sweep``) runs it as it starts (``adapters.ddl``)."""
    run_locked(conn, "palette-sweeps-ddl", DDL)


@dataclass
class SweepReport:
    jobs_expired: int = 0
    objects_deleted: int = 0
    erasures_finished: int = 0
    snapshots_deleted: int = 0


EPOCH, NO_ID = datetime(1970, 1, 1, tzinfo=UTC), UUID(int=0)


@dataclass(frozen=True)
class Cursor:
    """Where a sweep left off: a (time, id) key, or a log position."""

    at: datetime = EPOCH
    id: UUID = NO_ID
    position: int = 0


def _cursor(conn: psycopg.Connection[Any], name: str) -> Cursor:
    row = conn.execute("SELECT at, id, position FROM palette_sweeps WHERE name = %s", [name]).fetchone()
    return Cursor(row[0], row[1], row[2]) if row else Cursor()


def _save(conn: psycopg.Connection[Any], name: str, cursor: Cursor) -> None:
    conn.execute("INSERT INTO palette_sweeps (name, at, id, position) VALUES (%s, %s, %s, %s) ON CONFLICT (name) "
                 "DO UPDATE SET at = EXCLUDED.at, id = EXCLUDED.id, position = EXCLUDED.position",
                 [name, cursor.at, cursor.id, cursor.position])


def unfinished_erasures(conn: psycopg.Connection[Any], grace_s: float, after: tuple[datetime, UUID],
                        limit: int = PAGE) -> list[tuple[UUID, datetime]]:
    """(user, requested_at) of erasures not completed, requested more than ``grace_s`` ago, after the
    cursor."""
    rows = conn.execute(
        "SELECT user_id, requested_at FROM palette_erasures WHERE completed_at IS NULL "
        "AND requested_at < now() - %s * interval '1 second' AND (requested_at, user_id) > (%s, %s) "
        "ORDER BY requested_at, user_id LIMIT %s", [grace_s, after[0], after[1], limit]).fetchall()
    return [(r[0], r[1]) for r in rows]


def expired_jobs(conn: psycopg.Connection[Any], cutoff: datetime, after: tuple[datetime, UUID],
                 limit: int = PAGE) -> list[tuple[UUID, UUID, datetime]]:
    """(job, user, finished_at) of terminal jobs finished after the cursor and before ``cutoff``."""
    rows = conn.execute(
        "SELECT id, user_id, finished_at FROM palette_read.jobs_log WHERE finished_at IS NOT NULL "
        "AND (finished_at, id) > (%s, %s) AND finished_at < %s AND status = ANY(%s) "
        "ORDER BY finished_at, id LIMIT %s", [after[0], after[1], cutoff, list(TERMINAL), limit]).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def unpaid_jobs(conn: psycopg.Connection[Any], cutoff: datetime, after: tuple[datetime, UUID],
                limit: int = PAGE) -> list[tuple[UUID, UUID, datetime]]:
    """(job, user, finished_at) of jobs failed or canceled with no item done (every credit
    refunded), finished after the cursor and before ``cutoff``."""
    rows = conn.execute(
        "SELECT id, user_id, finished_at FROM palette_read.jobs_log WHERE finished_at IS NOT NULL "
        "AND (finished_at, id) > (%s, %s) AND finished_at < %s AND status = ANY(%s) AND done_items = 0 "
        "ORDER BY finished_at, id LIMIT %s", [after[0], after[1], cutoff, list(UNPAID), limit]).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def prune_snapshots(conn: psycopg.Connection[Any], snapshots: sql.Identifier, events: sql.Identifier,
                    after: tuple[UUID, int] | None = None, limit: int = SNAPSHOT_BATCH) -> list[tuple[UUID, int]]:
    """Delete at most ``limit`` snapshots (table ``snapshots``) each with a newer snapshot of its
    stream that has its event (table ``events``), after the (stream, version) key ``after``, in
    one statement; the (stream, version) of those deleted."""
    start = after or (NO_ID, 0)
    rows = conn.execute(PRUNE_SNAPSHOTS.format(snapshots=snapshots, events=events),
                        [*start, *start, *start, limit]).fetchall()
    return sorted((r[0], r[1]) for r in rows)


def latest_finish(conn: psycopg.Connection[Any], before: datetime) -> datetime | None:
    """The last time a job finished before ``before``, as jobs_log has it."""
    row = conn.execute("SELECT max(finished_at) FROM palette_read.jobs_log WHERE finished_at < %s", [before]).fetchone()
    # In UTC: psycopg hands it back in the session's time zone, where taking an hour off is
    # wall-clock arithmetic (no hour at all across a change of clocks).
    return row[0].astimezone(UTC) if row and row[0] is not None else None


def abandoned_jobs(conn: psycopg.Connection[Any], cutoff: datetime, after: tuple[datetime, UUID],
                   limit: int = PAGE) -> list[tuple[UUID, UUID, datetime]]:
    """(job, user, created_at) of jobs created after the cursor and before ``cutoff``, never
    executed nor canceled."""
    rows = conn.execute(
        "SELECT id, user_id, created_at FROM palette_read.jobs_log WHERE finished_at IS NULL "
        "AND (created_at, id) > (%s, %s) AND created_at < %s AND status = ANY(%s) "
        "ORDER BY created_at, id LIMIT %s", [after[0], after[1], cutoff, list(UNSTARTED), limit]).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


class Sweeper:
    """`palette serve sweeper` (built by ``bootstrap.build_sweeper``): a pass every
    PALETTE_SWEEP_INTERVAL_S over the container's stores, and the unfinished erasures alone every
    PALETTE_ERASURE_SWEEP_S in between; it closes the container."""

    def __init__(self, settings: Settings, container: Container) -> None:
        self.settings = settings
        self.container = container
        self.clock = time.monotonic
        # Erasures that failed, by user: failures so far and when to try again (this process's
        # clock); only users still waiting for theirs are kept.
        self._failing: dict[UUID, tuple[int, float]] = {}
        with self.container.read_pool.connection() as conn:
            ensure_schema(conn)

    def step(self, now: datetime | None = None, erasure_grace_s: float = 0.0,
             on_pass: Callable[[str], None] | None = None) -> SweepReport:
        """One pass (``now``: the clock, for tests that look days ahead; ``erasure_grace_s``: how old
        an unfinished erasure must be to be finished, 0 for every one, as ``palette admin sweep``;
        ``on_pass`` is told the name of each of its passes as it begins)."""
        now = now or self.container.service.clock.now()
        report = SweepReport()
        cutoff = now - timedelta(days=self.settings.retention_days)
        unpaid_cutoff = now - timedelta(days=self.settings.unpaid_retention_days)

        def erasures() -> None:
            report.erasures_finished += self.finish_erasures(erasure_grace_s)

        def uploads() -> None:
            report.objects_deleted += self._late_uploads(now - timedelta(seconds=LATE_UPLOADS_S))

        def oversized() -> None:
            report.objects_deleted += self._oversized_uploads(now - timedelta(seconds=LINKS_EXPIRED_S), cutoff)

        def snapshots() -> None:
            report.snapshots_deleted += self.superseded_snapshots()

        # Each pass on its own: one that fails (say a job whose objects S3 keeps refusing to
        # delete, which holds the retention pass at it, its cursor unmoved) is logged, and the
        # others still run.
        passes: tuple[tuple[str, Callable[[], None]], ...] = (
            ("retention", lambda: self._retention(cutoff, report)),
            ("abandoned", lambda: self._abandoned(cutoff, report)),
            ("unpaid", lambda: self._unpaid(unpaid_cutoff, report)),
            ("erasures", erasures), ("late uploads", uploads), ("oversized uploads", oversized),
            ("snapshots", snapshots))
        for name, work in passes:
            if on_pass is not None:
                on_pass(name)
            try:
                work()
            except PASS_ERRORS:
                log.warning("the %s pass failed; the next sweep goes on from where it stopped", name,
                            exc_info=True)
        if report.jobs_expired or report.erasures_finished or report.objects_deleted or report.snapshots_deleted:
            log.info("sweep: %d job(s) expired, %d erasure(s) finished, %d object(s) deleted, "
                     "%d superseded snapshot(s) deleted", report.jobs_expired, report.erasures_finished,
                     report.objects_deleted, report.snapshots_deleted)
        return report

    def finish_erasures(self, grace_s: float) -> int:
        """Finish the erasures requested more than ``grace_s`` ago and not completed (a crash cut
        them short); how many were. One that fails is logged and tried again once its wait is
        over, the others go on (a cursor: failing ones first in line cannot hide the rest)."""
        c = self.container
        finished, after, waiting, recovered = 0, (EPOCH, NO_ID), set(), False
        while True:
            with c.read_pool.connection() as conn:
                pending = unfinished_erasures(conn, grace_s, after, PAGE)
            for user_id, requested_at in pending:
                after = (requested_at, user_id)
                failures, retry_at = self._failing.get(user_id, (0, 0.0))
                if self.clock() < retry_at:
                    waiting.add(user_id)
                    continue
                try:
                    erase(c.service, c.read_pool, c.s3, c.settings.s3_bucket, user_id, must_exist=False)
                except Exception:  # noqa: BLE001 - logged by _failed; one failing must not stop the others
                    self._failed(user_id, failures + 1)
                    waiting.add(user_id)
                    continue
                recovered |= self._failing.pop(user_id, None) is not None
                finished += 1
            if len(pending) < PAGE:
                # Users finished by someone else (an API request, `palette admin sweep`) are
                # forgotten. An erasure that had failed and now finished says the cause may be
                # gone (they all failed while S3 was away, say): the others wait no longer, their
                # failures still counted.
                self._failing = {u: (n, 0.0 if recovered else retry_at)
                                 for u, (n, retry_at) in self._failing.items() if u in waiting}
                return finished

    def _failed(self, user_id: UUID, failures: int) -> None:
        wait_s = min(ERASURE_RETRY_MAX_S, self.settings.erasure_sweep_s * 2 ** min(failures - 1, 32))
        self._failing[user_id] = (failures, self.clock() + wait_s)
        if failures == 1:
            log.warning("could not finish the erasure of %s; retrying in %.0f s", user_id, wait_s, exc_info=True)
        else:
            log.warning("could not finish the erasure of %s (%d tries); retrying in %.0f s", user_id, failures,
                        wait_s)

    def _walk(self, name: str, page: Callable[[Any, tuple[datetime, UUID]], list[tuple[UUID, UUID, datetime]]]
              ) -> Iterator[tuple[UUID, UUID]]:
        """(job, user) of the rows ``page`` returns after the pass ``name``'s cursor, page by page;
        a row is done once the next is asked for, and the cursor is saved after each page."""
        c = self.container
        with c.read_pool.connection() as conn:
            after = _cursor(conn, name)
        while True:
            with c.read_pool.connection() as conn:
                rows = page(conn, (after.at, after.id))
            if not rows:
                return
            for job_id, user_id, at in rows:
                yield job_id, user_id
                after = Cursor(at, job_id)
            with c.read_pool.connection() as conn:
                _save(conn, name, after)

    def _retention(self, cutoff: datetime, report: SweepReport) -> None:
        for job_id, user_id in self._walk("retention", lambda conn, key: expired_jobs(conn, cutoff, key, PAGE)):
            self._expire(user_id, job_id, self.settings.retention_days, report)

    def _unpaid(self, cutoff: datetime, report: SweepReport) -> None:
        """Expire the objects of the jobs that finished before ``cutoff`` having spent nothing, as
        the job itself says (the read model only points at them). One whose objects cannot be
        deleted (S3 refused) is logged and left to the retention pass, so it holds back no other;
        a store that does not answer (unreachable, a 5xx) stops the pass before the job, for the
        next one (it would else pass over every job, leaving each its objects a month)."""
        c, days = self.container, self.settings.unpaid_retention_days
        with c.read_pool.connection() as conn:
            after = _cursor(conn, "unpaid")
        while True:
            with c.read_pool.connection() as conn:
                jobs = unpaid_jobs(conn, cutoff, (after.at, after.id), PAGE)
                latest = latest_finish(conn, cutoff) if len(jobs) < PAGE else None
            for job_id, user_id, finished_at in jobs:
                after = Cursor(finished_at, job_id)
                job = c.service.executor.read(job_id)
                if not (isinstance(job, Job) and job.status in UNPAID and job.done_items == 0):
                    continue
                try:
                    self._expire(user_id, job_id, days, report)
                except (OSError, BotoCoreError, ClientError) as e:
                    if store_away(e):  # no answer about this job: the pass stops, its cursor before it
                        raise
                    log.warning("could not delete the objects of unpaid job %s; the retention pass will",
                                job_id, exc_info=True)
            if latest is not None:
                # None left before the cutoff: the cursor moves up to the last finish before it,
                # less what the projector may still fold (else each pass read again everything
                # that finished since the last unpaid one).
                after = max(after, Cursor(latest - PROJECTION_SLACK), key=lambda k: (k.at, k.id))
            with c.read_pool.connection() as conn:
                _save(conn, "unpaid", after)
            if len(jobs) < PAGE:
                return

    def _expire(self, user_id: UUID, job_id: UUID, days: int, report: SweepReport) -> None:
        """Delete a job's objects, then record ``ObjectsExpired`` (after ``days``) on it."""
        c = self.container
        report.objects_deleted += delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(user_id, job_id))
        if c.service.executor.execute(c.service.expire_job_command(job_id, days)).value:
            report.jobs_expired += 1

    def _abandoned(self, cutoff: datetime, report: SweepReport) -> None:
        """Cancel (refunding) the jobs created before ``cutoff`` and never executed nor canceled,
        delete their objects and record ``ObjectsExpired``."""
        c, days = self.container, self.settings.retention_days
        for job_id, user_id in self._walk("abandoned", lambda conn, key: abandoned_jobs(conn, cutoff, key, PAGE)):
            job = c.service.executor.read(job_id)
            if not isinstance(job, Job) or job.status not in UNSTARTED:
                continue  # executed or canceled since the read model's row
            try:  # only if still unstarted when the command runs: it may be executed since the read
                canceled = c.service.executor.execute(c.service.cancel_job_command(
                    user_id, job_id, "retention", unless_started=True)).value
            except ConflictError:
                raise  # not an answer: the pass stops here, its cursor before this job, till the next sweep
            except DomainError as e:  # executed since, or its user erased meanwhile (the erasure deletes it)
                log.info("job %s not canceled for retention: %s", job_id, e)
                continue
            if not canceled:  # canceled since the read, by its user: a paid one keeps its objects
                continue
            try:
                self._expire(user_id, job_id, days, report)
            except (OSError, BotoCoreError, ClientError):  # the pass goes on to the other jobs
                log.warning("could not delete the objects of abandoned job %s; the unpaid pass will",
                            job_id, exc_info=True)

    def _late_uploads(self, settled: datetime) -> int:
        """Delete once more the objects of users erased and jobs deleted before ``settled`` (and
        what an erased user, or a deleted job's webhook deliveries, left in PostgreSQL)."""
        return self._late_erasures(settled) + self._late_deletions(settled)

    def _late_erasures(self, settled: datetime) -> int:
        c = self.container
        deleted, swept = 0, False
        with c.read_pool.connection() as conn:
            after = _cursor(conn, "late-erasures")
        while True:
            with c.read_pool.connection() as conn:
                erased = conn.execute(
                    "SELECT user_id, completed_at FROM palette_erasures WHERE completed_at IS NOT NULL "
                    "AND (completed_at, user_id) > (%s, %s) AND completed_at < %s ORDER BY completed_at, user_id "
                    "LIMIT %s", [after.at, after.id, settled, PAGE]).fetchall()
            for user_id, completed_at in erased:
                deleted += delete_prefixes(c.s3, c.settings.s3_bucket, user_prefixes(user_id))
                with c.read_pool.connection() as conn:
                    forget_user_data(conn, user_id)
                after, swept = Cursor(completed_at, user_id), True
            with c.read_pool.connection() as conn:
                _save(conn, "late-erasures", after)
                if swept and len(erased) < PAGE:  # destroyed keys' dead rows off the table's pages
                    keyring.vacuum_keys(conn)
            if len(erased) < PAGE:
                return deleted

    def _late_deletions(self, settled: datetime) -> int:
        c = self.container

        def again(job_id: UUID, _: EventEnvelope) -> int:
            job = c.service.executor.read(job_id)
            if not isinstance(job, Job):
                return 0
            deleted = delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(job.user_id, job_id))
            with c.read_pool.connection() as conn:  # deliveries too: an API dead mid-DELETE left them
                forget_job_deliveries(conn, job_id)
            return deleted

        return self._each_settled("late-deletions", JOB_DELETED, settled, again)

    def _oversized_uploads(self, settled: datetime, oldest: datetime) -> int:
        """Delete what jobs created before ``settled`` (their links expired) hold under their
        inputs and masks beyond MAX_INPUT_BYTES an object; jobs created before ``oldest`` are
        skipped (their objects expire anyway)."""
        c = self.container

        def oversized(job_id: UUID, created: EventEnvelope) -> int:
            if created.timestamp < oldest:
                return 0
            user_id = UUID(str(created.data["user_id"]))
            return delete_larger(c.s3, c.settings.s3_bucket,
                                 (inputs_prefix(user_id, job_id), masks_prefix(user_id, job_id)), MAX_INPUT_BYTES)

        return self._each_settled("oversized-uploads", JOB_CREATED, settled, oversized)

    def _each_settled(self, name: str, topic: str, settled: datetime,
                      act: Callable[[UUID, EventEnvelope], int]) -> int:
        """``act`` on each event of ``topic`` recorded before ``settled`` and after the position
        cursor ``name`` (saved a page at a time), in log order; the sum of what it returns."""
        c = self.container
        done = 0
        recorder: Any = c.app.recorder  # eventsourcing's PostgreSQL recorder
        table = events_table(recorder)
        with c.read_pool.connection() as conn:
            after = _cursor(conn, name)
        # The log's head now: a scan that reaches it without an event still too new moves the
        # cursor there, so the next pass reads only what came since (the recorder commits in
        # notification order: nothing lower can appear later).
        head = recorder.max_notification_id() or 0
        while True:
            with c.read_pool.connection() as conn:
                rows = conn.execute(sql.SQL("SELECT notification_id, originator_id, state FROM {} "
                                            "WHERE topic = %s AND notification_id > %s AND notification_id <= %s "
                                            "ORDER BY notification_id LIMIT %s").format(table),
                                    [topic, after.position, head, PAGE]).fetchall()
            newer = False
            for position, stream_id, state in rows:
                event = from_notification(Notification(originator_id=stream_id, originator_version=0, topic=topic,
                                                       state=bytes(state), id=position),
                                          c.app.mapper.transcoder)
                if event.timestamp >= settled:
                    newer = True  # the rest are newer still: next pass
                    break
                done += act(stream_id, event)
                after = Cursor(position=position)
            if not newer and len(rows) < PAGE:
                after = Cursor(position=max(after.position, head))  # none left before the head
            with c.read_pool.connection() as conn:
                _save(conn, name, after)
            if newer or len(rows) < PAGE:
                return done

    def superseded_snapshots(self) -> int:
        """Delete every snapshot superseded by a newer one a load can use, ``SNAPSHOT_BATCH`` a
        statement (``prune_snapshots``); how many were (0 where the store keeps no snapshots in
        PostgreSQL)."""
        c = self.container
        snapshots = snapshot_recorder(c.app)
        if not isinstance(snapshots, PostgresAggregateRecorder):
            return 0
        table, events = events_table(snapshots), events_table(c.app.recorder)
        deleted, after = 0, None
        while True:
            with c.read_pool.connection() as conn:
                keys = prune_snapshots(conn, table, events, after, SNAPSHOT_BATCH)
            deleted += len(keys)
            if len(keys) < SNAPSHOT_BATCH:
                return deleted
            after = keys[-1]

    def warm_up(self, stop: threading.Event) -> None:
        """Ready at once: the container was built when this was constructed."""

    def run(self, stop: threading.Event) -> None:
        """A pass at once and every ``sweep_interval_s``; in between, every ``erasure_sweep_s``,
        the erasures a crash cut short (both past ``erasure_grace_s``)."""
        s = self.settings
        next_pass = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_pass:
                try:
                    self.step(erasure_grace_s=s.erasure_grace_s)  # each failing pass logged there
                except PASS_ERRORS:  # before any pass (the clock's read)
                    log.warning("sweep failed; retrying next pass", exc_info=True)
                next_pass = time.monotonic() + s.sweep_interval_s
            else:
                try:
                    if finished := self.finish_erasures(s.erasure_grace_s):
                        log.info("sweep: %d erasure(s) finished", finished)
                except PASS_ERRORS:
                    log.warning("finishing erasures failed; retrying in %.0f s", s.erasure_sweep_s, exc_info=True)
            stop.wait(max(0.0, min(s.erasure_sweep_s, next_pass - time.monotonic())))

    def close(self) -> None:
        self.container.close()
