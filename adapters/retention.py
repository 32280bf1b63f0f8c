"""`palette serve sweeper`: the data lifecycle's clock.

Each pass (every ``PALETTE_SWEEP_INTERVAL_S``):

1. **Retention** — the objects (inputs, outputs, masks, previews) of jobs that finished more than
   ``PALETTE_RETENTION_DAYS`` ago are deleted, then ``ObjectsExpired`` is recorded on the job (it
   stays listed; its links stop working). Jobs are taken from ``jobs_log`` in ``(finished_at,
   id)`` order after a cursor kept in ``palette_sweeps``, so a pass costs what finished since the
   last one, and a crash between the deletion and the event only repeats a harmless deletion.
2. **Erasures** — one a crash cut short (tombstone without ``completed_at``) is finished.
3. **Late uploads** — a GPU worker busy with an item when its job was canceled and deleted, or its
   user erased, may still upload the output afterwards: the objects of jobs deleted and users
   erased are deleted once more when ``LATE_UPLOADS_S`` have passed (cursors in ``palette_sweeps``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import Notification
from psycopg import sql

from adapters import keyring
from adapters.erasure import erase
from adapters.objects import delete_prefixes
from adapters.settings import Settings
from domain.contracts.envelope import from_notification
from domain.contracts.keys import job_prefixes, user_prefixes
from domain.job import Job

log = logging.getLogger("palette.sweeper")
PAGE = 500  # jobs per query
LATE_UPLOADS_S = 300.0  # far longer than a worker spends on an item
DDL = ("CREATE TABLE IF NOT EXISTS palette_sweeps (name text PRIMARY KEY, at timestamptz NOT NULL, "
       "id uuid NOT NULL, position bigint NOT NULL DEFAULT 0)",)
JOB_DELETED = "domain.job:Job.JobDeleted"
TERMINAL = ("done", "failed", "canceled")


@dataclass
class SweepReport:
    jobs_expired: int = 0
    objects_deleted: int = 0
    erasures_finished: int = 0


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


def expired_jobs(conn: psycopg.Connection[Any], cutoff: datetime, after: tuple[datetime, UUID],
                 limit: int = PAGE) -> list[tuple[UUID, UUID, datetime]]:
    """(job, user, finished_at) of terminal jobs finished after the cursor and before ``cutoff``."""
    rows = conn.execute(
        "SELECT id, user_id, finished_at FROM palette_read.jobs_log WHERE finished_at IS NOT NULL "
        "AND (finished_at, id) > (%s, %s) AND finished_at < %s AND status = ANY(%s) "
        "ORDER BY finished_at, id LIMIT %s", [after[0], after[1], cutoff, list(TERMINAL), limit]).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


class Sweeper:
    def __init__(self, settings: Settings) -> None:
        from adapters import bootstrap

        self.settings = settings
        self.container = bootstrap.build(settings, pool_size=2)
        with self.container.read_pool.connection() as conn:
            for statement in DDL:
                conn.execute(statement)

    def step(self, now: datetime | None = None) -> SweepReport:
        """One pass (``now``: the clock, for tests that look days ahead)."""
        c = self.container
        now = now or c.service.clock.now()
        report = SweepReport()
        self._retention(now - timedelta(days=self.settings.retention_days), report)
        with c.read_pool.connection() as conn:
            pending = keyring.pending_erasures(conn)
        for user_id in pending:
            erase(c.service, c.read_pool, c.s3, c.settings.s3_bucket, user_id, must_exist=False)
        report.erasures_finished = len(pending)
        report.objects_deleted += self._late_uploads(now - timedelta(seconds=LATE_UPLOADS_S))
        if report.jobs_expired or report.erasures_finished or report.objects_deleted:
            log.info("sweep: %d job(s) expired, %d erasure(s) finished, %d object(s) deleted",
                     report.jobs_expired, report.erasures_finished, report.objects_deleted)
        return report

    def _retention(self, cutoff: datetime, report: SweepReport) -> None:
        c = self.container
        with c.read_pool.connection() as conn:
            after = _cursor(conn, "retention")
        while jobs := self._expired(cutoff, (after.at, after.id)):
            for job_id, user_id, finished_at in jobs:
                report.objects_deleted += delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(user_id, job_id))
                if c.service.executor.execute(c.service.expire_job_command(job_id, self.settings.retention_days)).value:
                    report.jobs_expired += 1
                after = Cursor(finished_at, job_id)
            with c.read_pool.connection() as conn:
                _save(conn, "retention", after)

    def _expired(self, cutoff: datetime, after: tuple[datetime, UUID]) -> list[tuple[UUID, UUID, datetime]]:
        with self.container.read_pool.connection() as conn:
            return expired_jobs(conn, cutoff, after)

    def _late_uploads(self, settled: datetime) -> int:
        """Delete once more the objects of users erased and jobs deleted before ``settled``."""
        c = self.container
        deleted = 0
        with c.read_pool.connection() as conn:
            users, jobs = _cursor(conn, "late-erasures"), _cursor(conn, "late-deletions")
            erased = conn.execute("SELECT user_id, completed_at FROM palette_erasures WHERE completed_at IS NOT NULL "
                                  "AND (completed_at, user_id) > (%s, %s) AND completed_at < %s "
                                  "ORDER BY completed_at, user_id LIMIT %s",
                                  [users.at, users.id, settled, PAGE]).fetchall()
            recorder: Any = c.app.recorder  # eventsourcing's PostgreSQL recorder
            table = sql.Identifier(*(p for p in (recorder.datastore.schema, recorder.events_table_name) if p))
            dropped = conn.execute(sql.SQL("SELECT notification_id, originator_id, state FROM {} WHERE topic = %s "
                                           "AND notification_id > %s ORDER BY notification_id LIMIT %s").format(table),
                                   [JOB_DELETED, jobs.position, PAGE]).fetchall()
        for user_id, completed_at in erased:
            deleted += delete_prefixes(c.s3, c.settings.s3_bucket, user_prefixes(user_id))
            users = Cursor(completed_at, user_id)
        for position, job_id, state in dropped:
            at = from_notification(Notification(originator_id=job_id, originator_version=0, topic=JOB_DELETED,
                                                state=bytes(state), id=position), c.app.mapper.transcoder).timestamp
            if at >= settled:
                break  # the rest are newer still: next pass
            job = c.service.executor.read(job_id)
            if isinstance(job, Job):
                deleted += delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(job.user_id, job_id))
            jobs = Cursor(position=position)
        with c.read_pool.connection() as conn:
            _save(conn, "late-erasures", users)
            _save(conn, "late-deletions", jobs)
            if erased:  # destroyed keys' dead rows off the table's pages
                keyring.vacuum_keys(conn)
        return deleted

    def warm_up(self, stop: threading.Event) -> None:
        """Ready at once: the container was built when this was constructed."""

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except (psycopg.Error, OSError):
                log.warning("sweep failed; retrying next pass", exc_info=True)
            stop.wait(self.settings.sweep_interval_s)

    def close(self) -> None:
        self.container.close()
