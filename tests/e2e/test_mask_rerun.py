"""Running a finished job's photos again (POST /jobs/{id}/rerun) through the real API and S3, the
tests standing in for the GPU worker: what a rerun copies and reserves, and its refusals (another
user's job, a job not finished, deleted or never uploaded). With the real dispatcher and worker:
test_mask_rerun_worker.py, a module of its own, so that no worker runs beside these tests (one
that finished an item before a test's stand-in callback had it charged)."""

from __future__ import annotations

import uuid

import httpx

from domain.contracts.keys import input_key
from infra.s3 import s3_client

from .conftest import Client
from .test_lifecycle import callback, create_uploaded_job

EDITS = {"concepts": {"wall": {"action": "recolor", "value": "#2255cc"}}, "protect": ["sofa"]}


def _done_by_hand(client: Client, http: httpx.Client, secret: str, items: int) -> str:
    """A job finished by callbacks standing in for the worker (it writes no masks)."""
    job_id = create_uploaded_job(client, items)
    client.data("POST", f"/jobs/{job_id}/execute", json=EDITS)
    for idx in range(items):
        r = callback(http, secret, job_id, {"idx": idx, "status": "failed", "error": "x",
                                            "idempotency_key": f"{job_id}:{idx}"})
        assert r.status_code == 200, r.text
    return job_id


def test_a_rerun_copies_the_photos_reserves_credits_and_is_created_once_per_key(client, http, settings):
    job_id = _done_by_hand(client, http, settings.callback_secret, 2)
    key = {"Idempotency-Key": f"rerun-{uuid.uuid4()}"}
    first = client.data("POST", f"/jobs/{job_id}/rerun", 201, headers=key)
    assert client.data("POST", f"/jobs/{job_id}/rerun", 201, headers=key)["job_id"] == first["job_id"]
    assert first["inputs_copied"] == 2
    # No mask was used (both items failed): a slot per item and concept, to upload one to.
    assert sorted((s["idx"], s["concept"], s["copied"]) for s in first["masks"]) == [
        (0, "sofa", False), (0, "wall", False), (1, "sofa", False), (1, "wall", False)]
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"], me["active_jobs"]) == (48, 2, 1)
    assert client.data("POST", f"/jobs/{first['job_id']}/confirm-upload")["status"] == "uploaded"


def _refused(client: Client, job_id: str, status: int, code: str) -> None:
    credits = client.data("GET", "/me")["credits"]
    r = client.call("POST", f"/jobs/{job_id}/rerun")
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["data"] is None
    assert client.data("GET", "/me")["credits"] == credits  # nothing reserved


def test_a_rerun_is_refused_for_a_job_that_is_not_the_callers_or_not_finished(client, other, http, settings):
    done = _done_by_hand(client, http, settings.callback_secret, 1)
    _refused(other, done, 404, "NOT_FOUND")  # another user's job: as if it were not there
    assert "concepts" not in other.call("POST", f"/jobs/{done}/rerun").text
    _refused(client, str(uuid.uuid4()), 404, "NOT_FOUND")
    _refused(client, "not-a-uuid", 422, "VALIDATION_FAILED")

    never_uploaded = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    _refused(client, never_uploaded, 409, "INVALID_STATE")  # not finished
    client.data("POST", f"/jobs/{never_uploaded}/cancel")
    _refused(client, never_uploaded, 409, "INVALID_STATE")  # finished, but no photo to run again

    running = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{running}/execute", json=EDITS)
    _refused(client, running, 409, "INVALID_STATE")
    client.data("POST", f"/jobs/{running}/cancel")

    client.data("DELETE", f"/jobs/{done}")
    _refused(client, done, 404, "NOT_FOUND")  # deleted: as if it never was


def test_reruns_spend_the_budget_job_creations_do_and_429s_say_when(client, http, settings):
    from concurrent.futures import ThreadPoolExecutor

    done = _done_by_hand(client, http, settings.callback_secret, 1)
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: client.call("POST", f"/jobs/{done}/rerun"), range(100)))
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 1 and set(codes) <= {201, 409, 429} and 429 in codes, codes
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)


def test_a_rerun_is_refused_when_a_photo_was_replaced_by_one_over_20_mb(client, http, settings):
    """An upload link lives on after confirm-upload: the photo in the store may be a larger one now."""
    done = _done_by_hand(client, http, settings.callback_secret, 2)
    s3_client(settings).put_object(Bucket=settings.s3_bucket, Key=input_key(uuid.UUID(client.user_id),
                                   uuid.UUID(done), 1), Body=b"\0" * ((20 << 20) + 1))
    _refused(client, done, 409, "INVALID_STATE")
    assert "over 20 MB (idx 1)" in client.call("POST", f"/jobs/{done}/rerun").json()["error"]["message"]


# Last in the module: the worker it starts would otherwise race the callbacks standing in for it above.
def test_a_rerun_whose_source_is_deleted_meanwhile_is_a_409_and_leaves_nothing_reserved(settings, monkeypatch):
    """DELETE /jobs/{id} lands between the rerun's listing of the source's photos and its copies
    (made deterministic by deleting right after the listing): the new job cannot run, so it is
    canceled and refunded, never left holding the credits and the plan's job slot."""
    from adapters.api import routes_jobs
    from adapters.bootstrap import build
    from adapters.objects import delete_prefixes
    from domain.contracts.keys import job_prefixes

    from .test_bounded_resources import served

    listing = routes_jobs._source_objects

    def listed_then_deleted(c, user_id, job_id):
        present = listing(c, user_id, job_id)
        delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(user_id, job_id))  # what a DELETE does first
        return present

    container = build(settings, pool_size=2)
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http:
            client = Client(http)
            job_id = _done_by_hand(client, http, settings.callback_secret, 2)
            monkeypatch.setattr(routes_jobs, "_source_objects", listed_then_deleted)
            r = client.call("POST", f"/jobs/{job_id}/rerun", headers={"Idempotency-Key": f"rerun-{uuid.uuid4()}"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE", r.text
            me = client.data("GET", "/me")
            assert (me["credits"], me["reserved"], me["active_jobs"]) == (50, 0, 0)  # 2 reserved, 2 refunded
            monkeypatch.setattr(routes_jobs, "_source_objects", listing)
            client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})  # the slot is free
    finally:
        container.close()


def test_a_rerun_without_a_key_whose_copy_the_store_fails_midway_leaves_nothing_reserved(settings, monkeypatch):
    """The store fails the second of a rerun's copies (a 500): the answer is a 503, and without an
    Idempotency-Key no retry can find the half-copied job to finish it (it has no upload links and
    a retry makes another), so it is canceled and refunded, not left holding the credits and the
    plan's one job slot (a retry would be a 409 CONCURRENCY_LIMIT) until the retention sweep."""
    from botocore.exceptions import ClientError

    from adapters.bootstrap import build

    from .test_bounded_resources import served

    container = build(settings, pool_size=2)
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http:
            client = Client(http)
            job_id = _done_by_hand(client, http, settings.callback_secret, 3)
            copy, copies = container.s3.copy_object, []

            def second_fails(**kwargs: object) -> object:
                copies.append(kwargs)
                if len(copies) == 2:
                    raise ClientError({"Error": {"Code": "InternalError", "Message": "store failed"},
                                       "ResponseMetadata": {"HTTPStatusCode": 500}}, "CopyObject")
                return copy(**kwargs)

            monkeypatch.setattr(container.s3, "copy_object", second_fails)
            r = client.call("POST", f"/jobs/{job_id}/rerun")
            assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text
            me = client.data("GET", "/me")
            assert (me["credits"], me["reserved"], me["active_jobs"]) == (50, 0, 0)  # 3 reserved, 3 refunded
            assert [j["status"] for j in client.data("GET", "/jobs")["items"]] == ["canceled", "failed"]
            monkeypatch.setattr(container.s3, "copy_object", copy)
            assert client.data("POST", f"/jobs/{job_id}/rerun", 201)["inputs_copied"] == 3  # the slot is free
    finally:
        container.close()
