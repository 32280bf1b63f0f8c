"""The Job aggregate: one batch of photos and its state machine.

    created -confirm-> uploaded -execute-> queued -first result-> running -last result-> done|failed
    any non-terminal state -cancel-> canceled          (done, failed, canceled are terminal)
    a terminal job -delete-> deleted (its objects gone, the job gone from every view)
    a terminal job -expire-> its objects gone after the retention period (the job stays listed)

Storage contract: event classes are stored as ``domain.job:Job.<Name>``; never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import InvalidState, ValidationFailed
from domain.stream import Stream

MAX_ITEMS = 200
MAX_ERROR_LEN = 500


class JobStatus(StrEnum):
    CREATED = "created"
    UPLOADED = "uploaded"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED)


# A job executed and not canceled: the same edits again are a retry, answered with its status.
EXECUTED = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED})


class ResultOutcome(StrEnum):
    RECORDED = "recorded"  # this call recorded the item's result
    DUPLICATE = "duplicate"  # the key was seen before: the original outcome stands
    ALREADY_RECORDED = "already_recorded"  # the item has a result under another key
    IGNORED_CANCELED = "ignored_canceled"  # the job was canceled; late results change nothing


@dataclass(frozen=True)
class ItemResult:
    status: str  # "done" | "failed"
    output_key: str
    preview_key: str
    error: str
    idempotency_key: str


@dataclass(frozen=True)
class RecordedResult:
    """What a result call did; ``finished`` is the terminal status it caused, if any."""

    outcome: ResultOutcome
    idx: int
    item_status: str
    finished: JobStatus | None = None


class Job(Stream):
    class JobCreated(Aggregate.Created):
        user_id: UUID
        preset: str
        item_count: int

    class UploadConfirmed(Aggregate.Event):
        def apply(self, job: Job) -> None:
            job.status = JobStatus.UPLOADED

    class JobQueued(Aggregate.Event):
        """v2: v1 also stored an ``output_template`` that nothing ever used; dropped on read."""

        class_version = 2
        concepts: dict[str, dict[str, str]]
        protect: list[str]
        rule_id: UUID | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state.pop("output_template", None)

        def apply(self, job: Job) -> None:
            job.status = JobStatus.QUEUED
            job.concepts = self.concepts
            job.protect = self.protect
            job.rule_id = self.rule_id

    class JobStarted(Aggregate.Event):
        def apply(self, job: Job) -> None:
            job.status = JobStatus.RUNNING

    class ItemCompleted(Aggregate.Event):
        idx: int
        status: str
        output_key: str
        preview_key: str
        error: str
        idempotency_key: str

        def apply(self, job: Job) -> None:
            job.items[self.idx] = ItemResult(
                self.status, self.output_key, self.preview_key, self.error, self.idempotency_key
            )
            job.keys[self.idempotency_key] = self.idx
            if self.status == "done":
                job.done_items += 1
            else:
                job.failed_items += 1

    class JobFinished(Aggregate.Event):
        status: str

        def apply(self, job: Job) -> None:
            job.status = JobStatus(self.status)

    class JobCanceled(Aggregate.Event):
        reason: str

        def apply(self, job: Job) -> None:
            job.status = JobStatus.CANCELED

    class JobDeleted(Aggregate.Event):
        """The owner deleted a terminal job: its objects are removed, and so is every row of it."""

        item_count: int

        def apply(self, job: Job) -> None:
            job.deleted = True
            job.objects_deleted = True

    class ObjectsExpired(Aggregate.Event):
        """The retention period of a terminal job passed: its objects are removed (it stays listed)."""

        retention_days: int

        def apply(self, job: Job) -> None:
            job.objects_deleted = True

    def __init__(self, user_id: UUID, preset: str, item_count: int) -> None:
        self.user_id = user_id
        self.preset = preset
        self.item_count = item_count
        self.status = JobStatus.CREATED
        self.concepts: dict[str, dict[str, str]] = {}
        self.protect: list[str] = []
        self.rule_id: UUID | None = None
        self.items: dict[int, ItemResult] = {}
        self.keys: dict[str, int] = {}
        self.done_items = 0
        self.failed_items = 0
        self.deleted = False  # the owner deleted it: as if it never was, to everyone but the log
        self.objects_deleted = False  # its inputs, outputs, masks and previews are gone

    # -- queries ----------------------------------------------------------------------
    @property
    def pending_items(self) -> int:
        return self.item_count - len(self.items)

    # -- commands -----------------------------------------------------------------------
    @classmethod
    def create(cls, job_id: UUID, user_id: UUID, preset: str, item_count: int, at: datetime) -> Job:
        if not 1 <= item_count <= MAX_ITEMS:
            raise ValidationFailed(f"item_count must be between 1 and {MAX_ITEMS}")
        return cls._create(
            cls.JobCreated, id=job_id, user_id=user_id, preset=preset, item_count=item_count,
            timestamp=at,
        )

    def confirm_upload(self, at: datetime) -> None:
        """created -> uploaded (the caller checked its inputs). A job confirmed already, and since
        executed, queued or begun or finished by the worker, records nothing (the retry of a
        confirm whose answer was lost, after the client or another device executed it); a canceled
        job is refused."""
        if self.status == JobStatus.UPLOADED or self.status in EXECUTED:
            return
        if self.status != JobStatus.CREATED:
            raise InvalidState(f"cannot confirm the upload of a {self.status} job")
        self.trigger_event(self.UploadConfirmed, timestamp=at)

    def execute(
        self, concepts: dict[str, dict[str, str]], protect: list[str], rule_id: UUID | None, at: datetime,
    ) -> None:
        """Queue the job for the GPU; ``concepts``/``protect`` are normalised by the caller. The
        same edits again, once the job was queued with them and while it is not canceled, record
        nothing (the retry of an execute whose answer was lost, whether or not the worker has
        begun or finished it since)."""
        if self.status in EXECUTED and (concepts, protect, rule_id) == (self.concepts, self.protect, self.rule_id):
            return
        if self.status != JobStatus.UPLOADED:
            advice = {JobStatus.CREATED: " (confirm the upload first)"}.get(self.status, "")
            if self.status.terminal:
                advice = " (a rerun edits its photos again, as a new job)"
            raise InvalidState(f"cannot execute a {self.status} job{advice}")
        self.trigger_event(
            self.JobQueued, concepts=concepts, protect=protect, rule_id=rule_id, timestamp=at,
        )

    def record_result(
        self, idx: int, status: str, output_key: str, preview_key: str, error: str,
        idempotency_key: str, at: datetime,
    ) -> RecordedResult:
        """Record one item's result; duplicates and late results change nothing."""
        if not idempotency_key:
            raise ValidationFailed("idempotency_key is required")
        seen = self.keys.get(idempotency_key)
        if seen is not None:
            return RecordedResult(ResultOutcome.DUPLICATE, seen, self.items[seen].status)
        if not 0 <= idx < self.item_count:
            raise ValidationFailed(f"idx must be between 0 and {self.item_count - 1}")
        if status not in ("done", "failed"):
            raise ValidationFailed("status must be 'done' or 'failed'")
        if self.status == JobStatus.CANCELED:
            return RecordedResult(ResultOutcome.IGNORED_CANCELED, idx, "canceled")
        existing = self.items.get(idx)
        if existing is not None:
            return RecordedResult(ResultOutcome.ALREADY_RECORDED, idx, existing.status)
        if self.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise InvalidState(f"a {self.status} job takes no item results")
        if self.status == JobStatus.QUEUED:
            self.trigger_event(self.JobStarted, timestamp=at)
        self.trigger_event(
            self.ItemCompleted, idx=idx, status=status,
            output_key=output_key if status == "done" else "",
            preview_key=preview_key if status == "done" else "",
            error=error[:MAX_ERROR_LEN] if status == "failed" else "",
            idempotency_key=idempotency_key, timestamp=at,
        )
        finished = None
        if self.pending_items == 0:
            finished = JobStatus.DONE if self.done_items > 0 else JobStatus.FAILED
            self.trigger_event(self.JobFinished, status=finished.value, timestamp=at)
        return RecordedResult(ResultOutcome.RECORDED, idx, status, finished)

    def cancel(self, reason: str, at: datetime) -> bool:
        """Cancel; True when this call canceled it (False: it already was)."""
        if self.status == JobStatus.CANCELED:
            return False
        if self.status.terminal:
            raise InvalidState(f"cannot cancel a {self.status} job")
        self.trigger_event(self.JobCanceled, reason=reason[:200], timestamp=at)
        return True

    def cancel_unstarted(self, reason: str, at: datetime) -> bool:
        """Cancel a job never executed (the retention sweep's cancel); True when this call
        canceled it, False when it already was canceled; InvalidState when it is queued, running
        or finished."""
        if self.status not in (JobStatus.CREATED, JobStatus.UPLOADED, JobStatus.CANCELED):
            raise InvalidState(f"the job is {self.status} now: not canceled")
        return self.cancel(reason, at)

    def delete(self, at: datetime) -> bool:
        """Delete a terminal job; True when this call deleted it (False: it already was)."""
        if self.deleted:
            return False
        if not self.status.terminal:
            raise InvalidState(f"cannot delete a {self.status} job (cancel it first)")
        self.trigger_event(self.JobDeleted, item_count=self.item_count, timestamp=at)
        return True

    def expire(self, retention_days: int, at: datetime) -> bool:
        """Record that a terminal job's objects were removed after ``retention_days``; True when
        this call recorded it."""
        if self.objects_deleted or not self.status.terminal:
            return False
        self.trigger_event(self.ObjectsExpired, retention_days=retention_days, timestamp=at)
        return True
