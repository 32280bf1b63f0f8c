"""The webhook event types and their payloads, built from the job at the event's version.

A payload is ``{type, timestamp, data}``: ``data`` is the job's public view (what
``GET /jobs/{id}`` returns, without ``items`` and their presigned links, which expire long before
the last retry; the client asks for them when it needs them), plus ``item`` (idx, status, error)
on ``item.completed``. ``timestamp`` is the event's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from domain.job import Job

EventType = Literal["job.queued", "item.completed", "job.finished", "job.canceled"]
# Event class in the log -> webhook event type.
EVENT_TYPES: dict[str, EventType] = {"JobQueued": "job.queued", "ItemCompleted": "item.completed",
                                     "JobFinished": "job.finished", "JobCanceled": "job.canceled"}


def job_view(job: Job) -> dict[str, Any]:
    """The job's public view as of its current version."""
    return {
        "job_id": str(job.id), "status": job.status.value, "preset": job.preset,
        "progress": {"done": job.done_items, "failed": job.failed_items, "total": job.item_count},
        "concepts": job.concepts, "protect": job.protect,
        "rule_id": str(job.rule_id) if job.rule_id is not None else None,
    }


def payload(event_type: str, timestamp: datetime, job: Job, idx: int | None = None) -> bytes:
    """The body of one webhook: the job at the event's version (``job``), and the item ``idx``."""
    data = job_view(job)
    if idx is not None:
        result = job.items[idx]
        data["item"] = {"idx": idx, "status": result.status, "error": result.error or None}
    return json.dumps({"type": event_type, "timestamp": timestamp.isoformat(), "data": data},
                      separators=(",", ":")).encode()
