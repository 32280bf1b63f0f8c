"""Data lifecycle through the API: deleting a finished job removes its objects and every view of it."""

from __future__ import annotations

import psycopg

from domain.contracts.keys import user_prefixes
from infra.s3 import s3_client
from tests.integration.test_stack import wait_until

from .test_lifecycle import EDITS, callback, create_uploaded_job


def _objects(settings, user_id: str) -> set[str]:  # type: ignore[no-untyped-def]
    s3 = s3_client(settings)
    pages = [s3.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket, Prefix=p)
             for p in user_prefixes(user_id)]  # type: ignore[arg-type]
    return {o["Key"] for paginator in pages for page in paginator for o in page.get("Contents", [])}


def test_deleting_a_finished_job_removes_its_objects_and_every_view_of_it(client, other, http, settings):
    job_id = create_uploaded_job(client, 2)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    assert client.call("DELETE", f"/jobs/{job_id}").json()["error"]["code"] == "INVALID_STATE"  # running: 409
    for idx in range(2):
        callback(http, settings.callback_secret, job_id, {"idx": idx, "status": "failed", "error": "x",
                                                          "idempotency_key": f"{job_id}:{idx}"})
    assert client.data("GET", f"/jobs/{job_id}")["status"] == "failed"
    kept = create_uploaded_job(client, 1)  # the free plan runs one job at a time
    assert other.call("DELETE", f"/jobs/{job_id}").status_code == 404  # another user's: as if absent
    before = _objects(settings, client.user_id)
    assert any(job_id in key for key in before) and any(kept in key for key in before)

    assert client.data("DELETE", f"/jobs/{job_id}") == {"deleted": True}
    assert client.data("DELETE", f"/jobs/{job_id}") == {"deleted": True}  # again: the same answer
    after = _objects(settings, client.user_id)
    assert not any(job_id in key for key in after) and after == {k for k in before if job_id not in k}
    assert client.call("GET", f"/jobs/{job_id}").status_code == 404
    assert job_id not in [j["job_id"] for j in client.data("GET", "/jobs")["items"]]  # at once, not when folded
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        def folded() -> bool:
            rows = conn.execute("SELECT (SELECT count(*) FROM palette_read.jobs_log WHERE id = %s) + "
                                "(SELECT count(*) FROM palette_read.job_items_log WHERE job_id = %s)",
                                [job_id, job_id]).fetchone()
            return rows == (0,)
        wait_until(folded, what="the read models to drop the job")
    assert client.data("GET", f"/jobs/{kept}")["status"] == "uploaded"  # the other job is untouched
