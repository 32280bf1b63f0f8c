"""The chaos run's webhook oracle (tests/chaos.py ``webhook_problems``) on hand-made logs and
receipts: it passes what the spec allows (duplicates under one webhook-id) and names each kind
of fault (an event missing, out of order, under two ids, not in the log, at another user's
endpoint, two events under one id)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from tests.chaos import Acked, Report, webhook_problems
from tests.webhook_receiver import Received

JOB, USER = uuid.uuid4(), str(uuid.uuid4())
LOG = [SimpleNamespace(stream_id=JOB, type=t, data=d) for t, d in [
    ("JobCreated", {"user_id": USER}), ("CreditsReserved", {"job_id": str(JOB)}), ("JobQueued", {}),
    ("ItemCompleted", {"idx": 1}), ("ItemCompleted", {"idx": 0}), ("JobFinished", {}),
]]


def receipt(kind: str, webhook_id: str, idx: int | None = None, user: str = USER) -> Received:
    data: dict[str, Any] = {"job_id": str(JOB)}
    if idx is not None:
        data["item"] = {"idx": idx, "status": "done", "error": None}
    body = json.dumps({"type": kind, "timestamp": "2026-12-01T00:00:00+00:00", "data": data}).encode()
    return Received(f"/chaos/{user}", {"webhook-id": webhook_id}, body, 0.0)


QUEUED, ITEM1, ITEM0, FINISHED = (receipt("job.queued", "q"), receipt("item.completed", "i1", 1),
                                  receipt("item.completed", "i0", 0), receipt("job.finished", "f"))


def check(receipts: list[Received], hooked: bool = True) -> tuple[list[str], Report]:
    report = Report()
    return webhook_problems(LOG, {str(JOB): Acked(USER, 2, hooked=hooked)}, receipts, report), report


def test_every_event_in_the_logs_order_with_a_duplicate_under_its_id_passes_and_is_counted():
    problems, report = check([QUEUED, ITEM1, ITEM1, ITEM0, QUEUED, FINISHED])
    assert problems == []
    assert (report.hooked_jobs, report.webhooks_expected, report.webhook_receipts,
            report.webhook_duplicates) == (1, 4, 6, 2)


@pytest.mark.parametrize(("receipts", "says"), [
    ([QUEUED, ITEM1, FINISHED], "never received"),
    ([QUEUED, ITEM0, ITEM1, FINISHED], "first received in the order"),
    ([QUEUED, ITEM1, ITEM0, FINISHED, receipt("job.finished", "f2")], "under 2 webhook-ids"),
    ([QUEUED, ITEM1, ITEM0, FINISHED, receipt("item.completed", "i2", 2)], "which its log does not have"),
    ([QUEUED, ITEM1, ITEM0, receipt("job.finished", "f", user="someone-else")], "delivered to /chaos/someone-else"),
    ([QUEUED, ITEM1, receipt("item.completed", "i1", 0), FINISHED], "sent for 2 events"),
])
def test_each_kind_of_fault_is_named(receipts, says):
    problems, _ = check(receipts)
    assert any(says in p for p in problems), problems


def test_a_user_without_an_endpoint_expects_nothing():
    problems, report = check([], hooked=False)
    assert problems == [] and report.webhooks_expected == 0
