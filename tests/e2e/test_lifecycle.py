"""The whole client lifecycle through a real uvicorn server, S3 presigned URLs and signed callbacks."""

from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any

import httpx
import psycopg
from PIL import Image

from domain.contracts.callback import sign_callback
from domain.contracts.keys import output_key, preview_key
from infra.s3 import s3_client

from .conftest import Client

EDITS = {"wall": {"action": "recolor", "value": "#3366aa"}, "lamp": {"action": "remove"}}


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 180, 150)).save(buf, "JPEG")
    return buf.getvalue()


def callback(http: httpx.Client, secret: str, job_id: str, body: dict) -> httpx.Response:
    raw = json.dumps(body).encode()
    ts = int(time.time())
    return http.post(f"/jobs/{job_id}/callback", content=raw, headers={
        "content-type": "application/json", "X-Palette-Timestamp": str(ts),
        "X-Palette-Signature": sign_callback(secret, ts, job_id, raw)})


def create_uploaded_job(client: Client, items: int) -> str:
    created = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": items})
    for slot in created["upload"]:
        r = httpx.put(slot["url"], content=jpeg(), headers={"Content-Type": slot["content_type"]})
        assert r.status_code == 200, r.text
    client.data("POST", f"/jobs/{created['job_id']}/confirm-upload")
    return str(created["job_id"])


def test_health_reports_every_dependency(http):
    body = http.get("/health").json()
    assert body["data"] == {"status": "ok", "dependencies": {"postgres": "ok", "broker": "ok", "s3": "ok"}}
    assert body["meta"]["request_id"]


def test_anonymous_registration_is_idempotent_per_device(http):
    first = http.post("/auth/anon", json={"device_hash": "same-device-123"})
    again = http.post("/auth/anon", json={"device_hash": "same-device-123"})
    assert again.status_code == 200
    assert first.json()["data"]["user_id"] == again.json()["data"]["user_id"]


def test_whole_lifecycle_with_exact_credits_at_every_step(client, http, settings):
    assert client.data("GET", "/me")["credits"] == 50
    job_id = create_uploaded_job(client, 3)
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"], me["active_jobs"]) == (47, 3, 1)

    assert client.data("POST", f"/jobs/{job_id}/execute",
                       json={"concepts": EDITS, "protect": ["sofa"]})["status"] == "queued"
    for idx, status in enumerate(["done", "failed", "done"]):
        body = {"idx": idx, "status": status, "idempotency_key": f"{job_id}:{idx}"}
        if status == "done":
            key = output_key(uuid.UUID(client.user_id), uuid.UUID(job_id), idx)
            body |= {"output_key": key,
                     "preview_key": preview_key(uuid.UUID(client.user_id), uuid.UUID(job_id), idx)}
            s3_client(settings).put_object(Bucket=settings.s3_bucket, Key=key, Body=b"png-bytes")
        else:
            body["error"] = "decode failed"
        r = callback(http, settings.callback_secret, job_id, body)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["outcome"] == "recorded"

    job = client.data("GET", f"/jobs/{job_id}")
    assert job["status"] == "done"
    assert job["progress"] == {"done": 2, "failed": 1, "total": 3}
    assert job["items"][1] == {"idx": 1, "status": "failed", "output_url": None,
                               "preview_url": None, "error": "decode failed"}
    download = httpx.get(job["items"][0]["output_url"])
    assert download.status_code == 200 and download.content == b"png-bytes"
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"], me["active_jobs"]) == (48, 0, 0)

    again = callback(http, settings.callback_secret, job_id,
                     {"idx": 0, "status": "failed", "idempotency_key": f"{job_id}:0"})
    assert again.status_code == 200 and again.json()["data"]["outcome"] == "duplicate"
    assert client.data("GET", "/me")["credits"] == 48


def test_confirm_names_the_missing_inputs(client):
    created = client.data("POST", "/jobs", 201, json={"preset": "seller", "item_count": 2})
    r = client.call("POST", f"/jobs/{created['job_id']}/confirm-upload")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "INPUTS_MISSING"
    assert r.json()["error"]["details"] == {"missing": [0, 1]}


def test_confirm_refuses_and_deletes_inputs_over_the_size_limit_and_a_smaller_one_is_taken(client, settings):
    from domain.contracts.keys import MAX_INPUT_BYTES
    from infra.s3 import s3_client

    s3 = s3_client(settings)
    created = client.data("POST", "/jobs", 201, json={"preset": "seller", "item_count": 3})
    sizes = [1000, MAX_INPUT_BYTES + 1, MAX_INPUT_BYTES]
    for slot, size in zip(created["upload"], sizes, strict=True):
        r = httpx.put(slot["url"], content=b"j" * size, headers={"Content-Type": slot["content_type"]}, timeout=60)
        assert r.status_code == 200, r.text
    r = client.call("POST", f"/jobs/{created['job_id']}/confirm-upload")
    assert r.status_code == 422 and r.json()["error"]["code"] == "INPUT_TOO_LARGE", r.text
    assert r.json()["error"]["details"] == {"too_large": [1]}
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=created["upload"][0]["key"].rsplit("/", 1)[0] + "/")
    assert sorted(o["Key"] for o in listed.get("Contents", [])) == [created["upload"][i]["key"] for i in (0, 2)]
    assert httpx.put(created["upload"][1]["url"], content=jpeg(),
                     headers={"Content-Type": created["upload"][1]["content_type"]}).status_code == 200
    assert client.data("POST", f"/jobs/{created['job_id']}/confirm-upload")["status"] == "uploaded"


def test_cancel_refunds_unprocessed_items(client, http, settings):
    job_id = create_uploaded_job(client, 4)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    callback(http, settings.callback_secret, job_id,
             {"idx": 2, "status": "done", "idempotency_key": f"{job_id}:2"})
    assert client.data("POST", f"/jobs/{job_id}/cancel")["status"] == "canceled"
    assert client.data("POST", f"/jobs/{job_id}/cancel")["status"] == "canceled"
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"]) == (49, 0)
    late = callback(http, settings.callback_secret, job_id,
                    {"idx": 3, "status": "done", "idempotency_key": f"{job_id}:3"})
    assert late.json()["data"]["outcome"] == "ignored_canceled"
    assert client.data("GET", "/me")["credits"] == 49


def test_rules_are_bounded_by_slots_and_deleting_frees_one(client):
    body = {"name": "warm walls", "preset_id": "interior", "concepts": {"wall": {"action": "tone", "value": "warm"}}}
    ids = [client.data("POST", "/rules", 201, json=body)["id"] for _ in range(2)]
    full = client.call("POST", "/rules", json=body)
    assert full.status_code == 403 and full.json()["error"]["code"] == "RULE_SLOTS_FULL"
    assert client.data("GET", "/me")["rule_slots"] == {"used": 2, "max": 2}
    updated = client.data("PUT", f"/rules/{ids[0]}", json={"name": "cool walls", "concepts": body["concepts"]})
    assert updated["name"] == "cool walls"
    assert sorted(r["id"] for r in client.data("GET", "/rules")["items"]) == sorted(ids)
    client.data("DELETE", f"/rules/{ids[0]}")
    assert client.data("GET", "/me")["rule_slots"]["used"] == 1
    assert client.data("POST", "/rules", 201, json=body)["id"]


def test_another_users_objects_are_404_and_unchanged(client, other):
    job = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    rule = client.data("POST", "/rules", 201, json={
        "name": "r", "preset_id": "interior", "concepts": {"lamp": {"action": "remove"}}})["id"]
    for method, path, body in [
        ("GET", f"/jobs/{job}", None), ("POST", f"/jobs/{job}/confirm-upload", None),
        ("POST", f"/jobs/{job}/execute", {"concepts": EDITS}), ("POST", f"/jobs/{job}/cancel", None),
        ("PUT", f"/rules/{rule}", {"name": "x", "concepts": {"lamp": {"action": "remove"}}}),
        ("DELETE", f"/rules/{rule}", None),
    ]:
        r = other.call(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "NOT_FOUND"
        assert r.json()["data"] is None and "concepts" not in r.text
    assert client.data("GET", f"/jobs/{job}")["status"] == "created"
    assert client.data("GET", "/me")["rule_slots"]["used"] == 1


def test_bad_input_is_a_4xx_with_a_stable_code(client, http):
    cases = [
        (client.call("POST", "/jobs", json={"preset": "interior", "item_count": 201}), 422, "VALIDATION_FAILED"),
        (client.call("POST", "/jobs", json={"preset": "garage", "item_count": 1}), 422, "VALIDATION_FAILED"),
        # A count of another JSON type is refused, not read as a number (it was: "3" made 3 items).
        *((client.call("POST", "/jobs", json={"preset": "interior", "item_count": count}), 422, "VALIDATION_FAILED")
          for count in ("3", True, 3.0)),
        (client.call("POST", "/jobs", content=b"{not json", headers={"content-type": "application/json"}),
         422, "VALIDATION_FAILED"),
        # Read two ways (Python's decoder took the last of a repeated name, and UTF-16): refused.
        *((client.call("POST", "/jobs", content=raw, headers={"content-type": "application/json"}), 422,
           "VALIDATION_FAILED")
          for raw in (b'{"preset": "interior", "item_count": 201, "item_count": 1}',
                      '{"preset": "interior", "item_count": 1}'.encode("utf-16"))),
        (client.call("GET", "/jobs/not-a-uuid"), 422, "VALIDATION_FAILED"),
        # A rule name that shows nothing (a zero-width space, a BOM, a combining mark alone).
        *((client.call("POST", "/rules", json={"name": name, "preset_id": "interior",
                                               "concepts": {"lamp": {"action": "remove"}}}), 422, "VALIDATION_FAILED")
          for name in ("\u200b", "\ufeff\u2060", "\u0301")),
        # A page is at most 100 jobs, however many a client asks for.
        *((client.call("GET", "/jobs", params={"limit": limit}), 422, "VALIDATION_FAILED")
          for limit in (0, 101, 10**30, "x")),
        (client.call("GET", f"/jobs/{uuid.uuid4()}"), 404, "NOT_FOUND"),
        (client.call("GET", "/presets/garage"), 404, "NOT_FOUND"),
        (http.get("/me"), 401, "AUTH_REQUIRED"),
        (http.get("/me", headers={"Authorization": "Bearer x.y.z"}), 401, "AUTH_INVALID"),
        (client.call("POST", "/rules", content=b"x" * 70_000, headers={"content-type": "application/json"}),
         413, "PAYLOAD_TOO_LARGE"),
        # Chunked, no length: the cap is met while FastAPI parses the body, which wraps any error.
        (client.call("POST", "/jobs", content=iter([b"x" * 40_000] * 2), headers={"content-type": "application/json"}),
         413, "PAYLOAD_TOO_LARGE"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code


def test_a_body_that_is_not_strict_json_is_refused_naming_why_and_echoing_none_of_it(client):
    """The envelope's message says what is wrong with the body (it said "0: JSON decode error",
    the reason left in the error's context), bounded, and no part of the body comes back."""
    secret = "s3cret" * 2000
    for raw, why in ((b'{"preset": "interior", "item_count": 2, "item_count": 1}', "'item_count' is given twice"),
                     ('{"preset": "interior", "item_count": 1}'.encode("utf-16"), "not UTF-8"),
                     (b'{"preset": "interior", "item_count": NaN}', "NaN is not JSON"),
                     (b'{"preset": "' + secret.encode() + b'", "item_count": 1', "Expecting")):
        r = client.call("POST", "/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", r.text
        assert why in r.json()["error"]["message"], r.text
        assert "s3cret" not in r.text and len(r.json()["error"]["message"]) < 200


def test_execute_before_confirm_is_invalid_state(client):
    job = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    r = client.call("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE"


def test_execute_takes_the_original_apis_output_template_and_ignores_it(client):
    """ARCHITECTURE §3 lists `output_template?` in execute's body (the original API's clients send
    it): it is taken, as text of bounded length, and changes nothing the job records."""
    job = create_uploaded_job(client, 1)
    for bad in (7, "x" * 201, "x" * 60_000, "a\x00b", "a\x1fb", "\ud800"):
        body = json.dumps({"concepts": EDITS, "output_template": bad})  # ASCII: a lone surrogate escaped
        r = client.call("POST", f"/jobs/{job}/execute", content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_FAILED"), r.text
    r = client.call("POST", f"/jobs/{job}/execute", json={"concepts": EDITS, "output_template": "x" * 65536})
    assert (r.status_code, r.json()["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE"), r.text  # the body cap
    queued = client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS, "output_template": "{name}_v1"})
    assert queued["status"] == "queued"
    again = client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS, "output_template": "other"})
    assert again["status"] == "queued"
    assert "output_template" not in client.data("GET", f"/jobs/{job}")


def test_execute_retried_after_the_first_result_answers_as_the_first_time(client, http, settings):
    """An execute whose answer was lost, sent again once the worker has begun (or finished) the job."""
    job = create_uploaded_job(client, 2)
    assert client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})["status"] == "queued"
    for idx, state in ((0, "running"), (1, "done")):
        r = callback(http, settings.callback_secret, job,
                     {"idx": idx, "status": "done", "idempotency_key": f"{job}:{idx}"})
        assert r.status_code == 200, r.text
        assert client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})["status"] == state
    r = client.call("POST", f"/jobs/{job}/execute", json={"concepts": {"lamp": {"action": "remove"}}})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "INVALID_STATE")  # other edits: refused
    assert client.data("GET", "/me")["credits"] == 48


def test_confirm_retried_after_the_job_was_executed_answers_its_status(client, http, settings):
    """A confirm-upload whose answer was lost, sent again once the job was executed (by the client
    or another device) and begun or finished; a canceled job's confirm stays refused."""
    job = create_uploaded_job(client, 2)
    assert client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})["status"] == "queued"
    assert client.data("POST", f"/jobs/{job}/confirm-upload")["status"] == "queued"
    for idx, state in ((0, "running"), (1, "done")):
        r = callback(http, settings.callback_secret, job,
                     {"idx": idx, "status": "done", "idempotency_key": f"{job}:{idx}"})
        assert r.status_code == 200, r.text
        assert client.data("POST", f"/jobs/{job}/confirm-upload")["status"] == state
    assert client.data("GET", f"/jobs/{job}")["status"] == "done"
    canceled = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{canceled}/cancel")
    r = client.call("POST", f"/jobs/{canceled}/confirm-upload")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "INVALID_STATE")
    assert client.data("GET", "/me")["credits"] == 48


def test_callback_without_valid_auth_is_refused(client, http, settings):
    job = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    body = {"idx": 0, "status": "done", "idempotency_key": f"{job}:0"}
    assert http.post(f"/jobs/{job}/callback", json=body).status_code == 401
    assert http.post(f"/jobs/{job}/callback", json=body, headers={"X-Callback-Secret": "wrong"}).status_code == 401
    stale = int(time.time()) - 1000
    raw = json.dumps(body).encode()
    r = http.post(f"/jobs/{job}/callback", content=raw, headers={
        "content-type": "application/json", "X-Palette-Timestamp": str(stale),
        "X-Palette-Signature": sign_callback(settings.callback_secret, stale, str(job), raw)})
    assert r.status_code == 401


def test_openapi_describes_every_endpoint(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ["/health", "/auth/anon", "/me", "/presets", "/presets/{preset_id}", "/rules",
                 "/rules/{rule_id}", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/confirm-upload",
                 "/jobs/{job_id}/execute", "/jobs/{job_id}/callback", "/jobs/{job_id}/cancel"]:
        assert path in paths, path


def test_job_list_shows_the_job_just_created_and_paginates(client):
    created = [client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]]
    client.data("POST", f"/jobs/{created[0]}/cancel")
    created.append(client.data("POST", "/jobs", 201, json={"preset": "seller", "item_count": 2})["job_id"])
    first = client.data("GET", "/jobs", params={"limit": 1})
    assert [j["job_id"] for j in first["items"]] == [created[1]]
    assert first["items"][0]["status"] == "created" and first["items"][0]["total_items"] == 2
    second = client.data("GET", "/jobs", params={"limit": 1, "cursor": first["next_cursor"]})
    assert [j["job_id"] for j in second["items"]] == [created[0]]
    assert second["items"][0]["status"] == "canceled" and second["next_cursor"] is None
    bad = client.call("GET", "/jobs", params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "VALIDATION_FAILED"


def test_idempotency_key_replays_the_same_response_and_refuses_another_body(client):
    headers = {"Idempotency-Key": f"create-{uuid.uuid4()}"}
    body = {"preset": "interior", "item_count": 2}
    first = client.call("POST", "/jobs", json=body, headers=headers)
    again = client.call("POST", "/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["data"]["job_id"] == first.json()["data"]["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert client.data("GET", "/me")["credits"] == 48  # reserved once
    other = client.call("POST", "/jobs", json={**body, "item_count": 3}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "VALIDATION_FAILED"


def test_a_creation_retried_after_the_api_died_is_made_once(client, settings):
    """The API commits the job, then dies before it stores (or sends) its answer: the key's claim
    stays in flight. A retry after STALE_S takes the claim over and finds the same job."""
    from adapters.api.idempotency import STALE_S

    key = f"create-{uuid.uuid4()}"
    body = {"preset": "interior", "item_count": 2}
    first = client.call("POST", "/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute("UPDATE palette_api.idempotency SET status = NULL, body = NULL, created_at = now() "
                     "WHERE key = %s", [key])  # what a process killed after the commit leaves
        in_flight = client.call("POST", "/jobs", json=body, headers={"Idempotency-Key": key})
        assert in_flight.status_code == 409
        conn.execute("UPDATE palette_api.idempotency SET created_at = now() - %s * interval '1 second' "
                     "WHERE key = %s", [STALE_S + 1, key])
    retried = client.call("POST", "/jobs", json=body, headers={"Idempotency-Key": key})
    assert retried.status_code == 201, retried.text
    assert retried.json()["data"]["job_id"] == first.json()["data"]["job_id"]
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"], me["active_jobs"]) == (48, 2, 1)


def test_job_events_stream_as_sse_and_resume_from_last_event_id(client, http, settings):
    job_id = create_uploaded_job(client, 1)
    traced = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}  # stamped into JobQueued's stored state
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS}, headers=traced)
    callback(http, settings.callback_secret, job_id,
             {"idx": 0, "status": "failed", "error": "x", "idempotency_key": f"{job_id}:0"})
    shown: dict[str, dict[str, Any]] = {}

    def events(last: str | None = None) -> list[tuple[str, str]]:
        headers = {"Last-Event-ID": last} if last else {}
        with client.http.stream("GET", f"/jobs/{job_id}/events", headers={**client.headers, **headers}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
        out = []
        for block in text.strip().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields["id"], fields["event"]))
            shown[fields["event"]] = json.loads(fields["data"])
        return out

    everything = events()
    assert [name for _, name in everything] == ["JobCreated", "UploadConfirmed", "JobQueued", "JobStarted",
                                                 "ItemCompleted", "JobFinished"]
    assert events(everything[2][0]) == everything[3:]
    # The events' own fields, not what storage keeps beside them: no trace, no worker's result key.
    queued = shown["JobQueued"]
    assert {c: e["action"] for c, e in queued["concepts"].items()} == {c: e["action"] for c, e in EDITS.items()}
    assert {k: shown["ItemCompleted"][k] for k in ("idx", "status", "error")} == {"idx": 0, "status": "failed",
                                                                                   "error": "x"}
    assert all(not ({"_trace", "idempotency_key", "originator_id", "originator_topic"} & set(data))
               for data in shown.values()), shown


def test_100_concurrent_creations_from_one_user_never_overdraw_and_429s_say_when(client):
    from concurrent.futures import ThreadPoolExecutor

    def create(_: int) -> httpx.Response:
        return client.call("POST", "/jobs", json={"preset": "interior", "item_count": 1})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(create, range(100)))
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 1  # the free plan runs one job at a time
    assert set(codes) <= {201, 409, 429} and 429 in codes
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)
    me = client.data("GET", "/me")
    assert (me["credits"], me["reserved"], me["active_jobs"]) == (49, 1, 1)
