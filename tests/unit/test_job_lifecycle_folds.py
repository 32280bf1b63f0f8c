"""A deleted job leaves every read model; an expired one stays listed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from domain.contracts.envelope import EventEnvelope
from projections.memory import MemoryReadStore

AT = datetime(2026, 11, 1, tzinfo=UTC)


def _job_events(job_id: uuid.UUID, user_id: uuid.UUID, items: int, last: list[tuple[str, dict[str, Any]]],
                first_position: int) -> list[EventEnvelope]:
    steps: list[tuple[str, dict[str, Any]]] = [
        ("JobCreated", {"user_id": str(user_id), "preset": "interior", "item_count": items}),
        ("UploadConfirmed", {}), ("JobQueued", {"concepts": {}, "protect": [], "rule_id": None}),
        ("JobCanceled", {"reason": "test"}), *last]
    return [EventEnvelope(id=first_position + n, stream_id=job_id, stream_type="Job", version=n + 1, type=kind,
                          timestamp=AT, data=data) for n, (kind, data) in enumerate(steps)]


def test_a_deleted_job_leaves_jobs_log_and_job_items_log_and_an_expired_one_stays():
    user = uuid.uuid4()
    deleted, expired, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store = MemoryReadStore()
    store.apply([*_job_events(deleted, user, 3, [("JobDeleted", {"item_count": 3})], 1),
                 *_job_events(expired, user, 2, [("ObjectsExpired", {"retention_days": 30})], 100),
                 *_job_events(kept, user, 1, [], 200)])
    jobs, items = store.table("jobs_log"), store.table("job_items_log")
    assert set(jobs) == {(expired,), (kept,)}
    assert sorted(k for k in items) == sorted([(expired, 0), (expired, 1), (kept, 0)])
    assert jobs[(expired,)]["status"] == "canceled"
