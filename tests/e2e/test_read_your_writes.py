"""GET /jobs never waits for the projector: a caller's own job the read model has not folded yet
is listed from the write side, and the answer says how many such jobs there were."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from adapters.api.routes_jobs import _merged
from projections.queries import encode_cursor
from tests.integration.test_stack import wait_until


def test_a_new_job_is_listed_at_once_with_the_projector_stopped(apps: Any, client: Any) -> None:
    apps.stop_app("projector")
    try:
        older = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})
        body = client.call("GET", "/jobs").json()
        assert [j["job_id"] for j in body["data"]["items"]] == [older["job_id"]]
        assert body["meta"]["projection_behind"] == 1
        # A cursor's time without its offset compares with no row's: refused, not a 500 in the merge.
        naive = base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00", str(uuid4())]).encode()).decode()
        refused = client.call("GET", "/jobs", params={"cursor": naive})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "VALIDATION_FAILED"
        client.data("POST", f"/jobs/{older['job_id']}/cancel")  # a free plan runs one job at a time
        created = client.data("POST", "/jobs", 201, json={"preset": "seller", "item_count": 3})
        body = client.call("GET", "/jobs").json()
        listed = body["data"]["items"]
        assert [j["job_id"] for j in listed] == [created["job_id"], older["job_id"]]
        assert listed[0] | {"created_at": None} == {
            "job_id": created["job_id"], "status": "created", "preset": "seller", "rule_id": None,
            "total_items": 3, "done_items": 0, "failed_items": 0, "created_at": None, "finished_at": None}
        assert listed[1]["status"] == "canceled" and listed[1]["finished_at"] is not None
        assert body["meta"]["projection_behind"] == 2
    finally:
        apps.start_app("projector")

    def folded() -> bool:
        return bool(client.call("GET", "/jobs").json()["meta"]["projection_behind"] == 0)

    wait_until(folded, timeout_s=60, what="the projector to fold the new jobs")
    again = client.data("GET", "/jobs")["items"]
    assert again == listed  # the write side said what the model says


def test_a_job_deleted_with_the_projector_stopped_leaves_the_list_at_once(apps: Any, client: Any) -> None:
    job = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    client.data("POST", f"/jobs/{job}/cancel")

    def listed() -> list[str]:
        body = client.data("GET", "/jobs")
        return [j["job_id"] for j in body["items"]]

    wait_until(lambda: job in listed() and client.call("GET", "/jobs").json()["meta"]["projection_behind"] == 0,
               timeout_s=60, what="the projector to fold the canceled job")
    apps.stop_app("projector")
    try:
        client.data("DELETE", f"/jobs/{job}")
        body = client.call("GET", "/jobs").json()  # the model still holds the job's row
        assert body["success"] is True and body["data"]["items"] == [], body
        assert body["meta"]["projection_behind"] == 1
    finally:
        apps.start_app("projector")
    wait_until(lambda: client.call("GET", "/jobs").json()["meta"]["projection_behind"] == 0,
               timeout_s=60, what="the projector to fold the deletion")
    assert listed() == []


def _row(minutes: int) -> dict[str, Any]:
    return {"id": uuid4(), "created_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)}


def test_the_write_sides_jobs_join_the_first_page_in_order_and_move_the_cursor() -> None:
    folded = [_row(5), _row(4), _row(3)]
    newer, replaced = _row(9), {**folded[1], "status": "canceled"}
    old = encode_cursor(folded[2]["created_at"], folded[2]["id"])  # the model has more
    rows, cursor = _merged(folded, [newer, replaced], limit=3, next_cursor=old, after=None)
    assert [r["id"] for r in rows] == [newer["id"], folded[0]["id"], folded[1]["id"]]
    assert rows[2]["status"] == "canceled"
    assert cursor == encode_cursor(folded[1]["created_at"], folded[1]["id"])  # the last row shown
    after = (folded[0]["created_at"] + timedelta(seconds=30), uuid4())  # a page before ended just above these
    later, cursor_later = _merged(folded, [newer], limit=3, next_cursor=old, after=after)
    assert later == folded and cursor_later == old  # a later page never gains the newest jobs


def test_a_job_the_model_has_not_seen_joins_the_later_page_it_sorts_into() -> None:
    # Nothing folded: page one showed the newest (from the write side) and a cursor at it.
    newest, older, oldest = _row(9), _row(5), _row(1)
    first, cursor = _merged([], [newest, older, oldest], limit=1, next_cursor=None, after=None)
    assert [r["id"] for r in first] == [newest["id"]] and cursor == encode_cursor(newest["created_at"], newest["id"])
    second, cursor = _merged([], [newest, older, oldest], limit=1, next_cursor=None,
                             after=(newest["created_at"], newest["id"]))
    assert [r["id"] for r in second] == [older["id"]] and cursor == encode_cursor(older["created_at"], older["id"])
    third, cursor = _merged([], [newest, older, oldest], limit=1, next_cursor=None,
                            after=(older["created_at"], older["id"]))
    assert [r["id"] for r in third] == [oldest["id"]]
