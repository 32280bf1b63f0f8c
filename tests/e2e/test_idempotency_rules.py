"""Idempotency-Key by Stripe's rules, through the running API: keys belong to an authenticated
principal (a request without a valid token neither claims nor reads one), answers that invite a
retry (409, 429, 5xx) are not stored, and keys expire."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from adapters.settings import Settings

from .conftest import Client

JOB = {"preset": "interior", "item_count": 1}


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        yield conn


def stored(db: psycopg.Connection, key: str) -> list[tuple[str, int | None]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT scope, status FROM palette_api.idempotency WHERE key = %s", [key]).fetchall()]


def test_requests_without_a_valid_token_neither_claim_nor_read_keys(http: httpx.Client, db: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4()}"
    tries = [
        ({"Authorization": "Bearer not-a-token"}, JOB),
        ({"Authorization": "Bearer another-forgery"}, {**JOB, "item_count": 2}),  # today: 422, the key is "taken"
        ({}, JOB),
        ({}, {**JOB, "item_count": 3}),
    ]
    for headers, body in tries:
        r = http.post("/jobs", json=body, headers={**headers, "Idempotency-Key": key})
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert "idempotent-replayed" not in r.headers
    assert stored(db, key) == []


def test_keys_are_scoped_to_the_user(client: Client, other: Client, db: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4()}"
    mine = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    theirs = other.call("POST", "/jobs", json={**JOB, "item_count": 2}, headers={"Idempotency-Key": key})
    assert mine.status_code == theirs.status_code == 201, (mine.text, theirs.text)
    assert mine.json()["data"]["job_id"] != theirs.json()["data"]["job_id"]
    assert sorted(stored(db, key)) == sorted([(f"user:{client.user_id}", 201), (f"user:{other.user_id}", 201)])


def test_anonymous_registration_ignores_idempotency_keys(http: httpx.Client, db: psycopg.Connection) -> None:
    """POST /auth/anon is idempotent by its device hash; one client's key can neither block nor
    replay another's registration."""
    key = f"k-{uuid.uuid4()}"
    first, second = (http.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"},
                               headers={"Idempotency-Key": key}) for _ in range(2))
    assert first.status_code == second.status_code == 201, (first.text, second.text)  # today: 422 for the second
    assert first.json()["data"]["user_id"] != second.json()["data"]["user_id"]
    assert "idempotent-replayed" not in second.headers
    assert stored(db, key) == []


def test_a_409_is_not_stored_and_the_retry_runs_again(client: Client, db: psycopg.Connection) -> None:
    """A free user runs one job at a time: the second creation is a 409 until the first ends."""
    running = client.data("POST", "/jobs", 201, json=JOB)["job_id"]
    key = f"k-{uuid.uuid4()}"
    refused = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "CONCURRENCY_LIMIT", refused.text
    assert stored(db, key) == []
    client.data("POST", f"/jobs/{running}/cancel")
    retried = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    assert retried.status_code == 201, retried.text  # today: the stored 409, replayed
    assert "idempotent-replayed" not in retried.headers
    again = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["data"]["job_id"] == retried.json()["data"]["job_id"]


def test_a_429_is_not_stored_and_a_retry_after_retry_after_runs_again(
    client: Client, settings: Settings, db: psycopg.Connection
) -> None:
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    container = build(settings.model_copy(update={"rate_jobs_burst": 1, "rate_jobs_per_s": 1.0}), pool_size=2)
    try:
        with TestClient(create_asgi(container), headers=client.headers) as api:
            first = api.post("/jobs", json=JOB)
            assert first.status_code == 201, first.text
            assert api.post(f"/jobs/{first.json()['data']['job_id']}/cancel").status_code == 200
            key = f"k-{uuid.uuid4()}"
            limited = api.post("/jobs", json=JOB, headers={"Idempotency-Key": key})
            assert limited.status_code == 429, limited.text
            assert stored(db, key) == []
            time.sleep(int(limited.headers["Retry-After"]))  # what the client is told to do
            retried = api.post("/jobs", json=JOB, headers={"Idempotency-Key": key})
            assert retried.status_code == 201, retried.text  # today: the stored 429, replayed
            assert "idempotent-replayed" not in retried.headers
            assert stored(db, key) == [(f"user:{client.user_id}", 201)]
    finally:
        container.close()


def test_a_key_expires_after_its_ttl(client: Client, db: psycopg.Connection, settings: Settings) -> None:
    key = f"k-{uuid.uuid4()}"
    first = client.call("POST", "/rules", json=_rule("first"), headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    replayed = client.call("POST", "/rules", json=_rule("first"), headers={"Idempotency-Key": key})
    assert replayed.headers.get("idempotent-replayed") == "true"
    # Older than any other expired key: the claim's own sweep takes the oldest first, and must
    # leave the key it claims to be taken over (deleting it in the same statement made a 422).
    db.execute("UPDATE palette_api.idempotency SET created_at = now() - %s * interval '1 second' "
               "- interval '50 years' WHERE key = %s", [settings.idempotency_ttl_s + 60, key])
    fresh = client.call("POST", "/rules", json=_rule("first"), headers={"Idempotency-Key": key})
    assert fresh.status_code == 201, fresh.text  # today: 422, "reused with a different request"
    assert "idempotent-replayed" not in fresh.headers  # run again: the creation's id finds the rule
    assert fresh.json()["data"]["id"] == first.json()["data"]["id"]


def test_a_job_deleted_since_its_key_expired_is_not_handed_back_with_upload_links(
    client: Client, db: psycopg.Connection, settings: Settings
) -> None:
    key = f"k-{uuid.uuid4()}"
    first = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    job_id = first.json()["data"]["job_id"]
    assert client.call("POST", f"/jobs/{job_id}/cancel").status_code == 200
    assert client.call("DELETE", f"/jobs/{job_id}").status_code == 200
    db.execute("UPDATE palette_api.idempotency SET created_at = now() - %s * interval '1 second' WHERE key = %s",
               [settings.idempotency_ttl_s + 60, key])
    again = client.call("POST", "/jobs", json=JOB, headers={"Idempotency-Key": key})
    assert again.status_code == 409, again.text  # before: 201, the deleted job's id and upload links
    assert again.json()["error"]["code"] == "INVALID_STATE" and "upload" not in again.text
    assert client.call("GET", f"/jobs/{job_id}").status_code == 404


def test_claiming_a_key_sweeps_expired_ones_a_bounded_batch_at_a_time(
    client: Client, db: psycopg.Connection, settings: Settings
) -> None:
    from adapters.api.idempotency import SWEEP_BATCH

    scope = f"test-sweep:{uuid.uuid4()}"
    expired = SWEEP_BATCH + 3
    db.execute("INSERT INTO palette_api.idempotency (scope, key, request_hash, created_at) "
               "SELECT %s, 'old-' || i, 'h', now() - %s * interval '1 second' - i * interval '1 millisecond' "
               "FROM generate_series(1, %s) i", [scope, settings.idempotency_ttl_s + 60, expired])
    db.execute("INSERT INTO palette_api.idempotency (scope, key, request_hash) VALUES (%s, 'young', 'h')", [scope])

    def left() -> int:
        row = db.execute("SELECT count(*) FROM palette_api.idempotency WHERE scope = %s AND key LIKE 'old-%%'",
                         [scope]).fetchone()
        return int(row[0]) if row else 0

    deadline = time.monotonic() + 30
    claims = 0
    while left() and time.monotonic() < deadline:
        r = client.call("POST", "/rules", json=_rule(f"r{claims}"), headers={"Idempotency-Key": f"k-{uuid.uuid4()}"})
        assert r.status_code in (201, 403), r.text  # 403 once the slots are full: the claim swept all the same
        claims += 1
    assert left() == 0, "expired keys were never swept"
    assert claims >= 2  # one claim sweeps a bounded batch, not everything
    assert db.execute("SELECT 1 FROM palette_api.idempotency WHERE scope = %s AND key = 'young'", [scope]).fetchone()
    db.execute("DELETE FROM palette_api.idempotency WHERE scope = %s", [scope])


def _rule(name: str) -> dict[str, object]:
    return {"name": name, "preset_id": "interior", "concepts": {"wall": {"action": "tone", "value": "warm"}}}


def test_a_creation_under_a_forgotten_key_with_another_body_is_refused(client: Client, db: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4()}"
    first = client.data("POST", "/jobs", 201, json=JOB, headers={"Idempotency-Key": key})
    db.execute("DELETE FROM palette_api.idempotency WHERE key = %s", [key])  # expired: only the job id remembers
    other = client.call("POST", "/jobs", json={**JOB, "item_count": 5}, headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "VALIDATION_FAILED", other.text
    again = client.data("POST", "/jobs", 201, json=JOB, headers={"Idempotency-Key": key})
    assert again["job_id"] == first["job_id"] and len(again["upload"]) == JOB["item_count"]
    assert client.data("GET", "/me", 200)["reserved"] == JOB["item_count"]  # reserved once


def test_a_rule_created_under_a_forgotten_key_is_handed_back_only_to_the_same_request_while_unchanged(
        client: Client, db: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4()}"
    first = client.data("POST", "/rules", 201, json=_rule("first"), headers={"Idempotency-Key": key})

    def forgotten(body: dict[str, object]) -> httpx.Response:
        db.execute("DELETE FROM palette_api.idempotency WHERE key = %s", [key])  # expired: only the rule id remembers
        return client.call("POST", "/rules", json=body, headers={"Idempotency-Key": key})

    others = [_rule("second"), {**_rule("first"), "concepts": {"wall": {"action": "tone", "value": "cool"}}},
              {**_rule("first"), "protect": ["floor"]}]
    for other in others:  # before: 201 and the first rule, as if this had been asked
        r = forgotten(other)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", (other, r.text)
    again = forgotten(_rule("first"))
    assert again.status_code == 201 and again.json()["data"] == first, again.text
    assert client.data("GET", "/me", 200)["rule_slots"]["used"] == 1  # one slot taken, by the first
    changed = {**_rule("first"), "name": "renamed"}
    client.data("PUT", f"/rules/{first['id']}", 200, json={k: v for k, v in changed.items() if k != "preset_id"})
    for body in (_rule("first"), changed):  # the creation's answer would not be what it made
        r = forgotten(body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE", (body, r.text)
        assert "changed since" in r.json()["error"]["message"]
    # The contract names that answer, and the 409 CONFLICT every rule write answers when it keeps
    # losing to contention (the group committer's), as the job routes' do: before, none of the
    # three rule writes listed a 409.
    paths = client.http.get("/openapi.json").json()["paths"]
    for path, method in (("/rules", "post"), ("/rules/{rule_id}", "put"), ("/rules/{rule_id}", "delete")):
        assert "409" in paths[path][method]["responses"], (method, path)


def test_the_key_given_twice_is_refused(client: Client) -> None:
    twice = [*client.headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    r = client.http.post("/jobs", json=JOB, headers=twice)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", r.text
    assert client.data("GET", "/me", 200)["reserved"] == 0


def test_a_keyed_request_with_two_tokens_is_refused(client: Client, other: Client, db: psycopg.Connection) -> None:
    """Which token is meant would be a guess: the route acts as the first token's user, and the
    middleware read the last (the answer kept under another user's keys, or no claim at all
    behind a forged one)."""
    for second in (other.headers["Authorization"], "Bearer forged", "Basic dXNlcjpwYXNz"):
        key = f"k-{uuid.uuid4()}"
        both = [("Authorization", client.headers["Authorization"]), ("Authorization", second),
                ("Idempotency-Key", key)]
        r = client.http.post("/jobs", json=JOB, headers=both)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", (second, r.text)
        assert "Authorization" in r.json()["error"]["message"]
        assert stored(db, key) == []
    assert client.data("GET", "/me", 200)["reserved"] == other.data("GET", "/me", 200)["reserved"] == 0
    forged_first = [("Authorization", "Bearer forged"), ("Authorization", client.headers["Authorization"]),
                    ("Idempotency-Key", f"k-{uuid.uuid4()}")]
    r = client.http.post("/jobs", json=JOB, headers=forged_first)
    assert r.status_code == 401, r.text  # the route reads the first: no valid token, the key ignored


def test_rule_writes_are_limited_per_user_in_a_budget_of_their_own(client: Client, settings: Settings) -> None:
    # Each rule write is an event on the rule's stream, loaded whole when not cached: unlimited,
    # one client appended 150 a second to one rule.
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    container = build(settings.model_copy(update={"rate_jobs_burst": 3, "rate_jobs_per_s": 0.01}), pool_size=2)
    try:
        with TestClient(create_asgi(container), headers=client.headers) as api:
            rule_id = api.post("/rules", json=_rule("limited")).json()["data"]["id"]
            edits = {k: v for k, v in _rule("").items() if k != "preset_id"}
            assert [api.put(f"/rules/{rule_id}", json={**edits, "name": f"limited {n}"}).status_code
                    for n in range(2)] == [200] * 2
            for limited in (api.put(f"/rules/{rule_id}", json={**edits, "name": "one more"}),
                            api.delete(f"/rules/{rule_id}")):
                assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED"
                assert int(limited.headers["Retry-After"]) >= 1
            job = api.post("/jobs", json=JOB)  # job creations have their own budget
            assert job.status_code == 201, job.text
            assert api.post(f"/jobs/{job.json()['data']['job_id']}/cancel").status_code == 200
    finally:
        container.close()


def test_a_retry_spelling_the_job_id_another_way_is_the_same_request(client: Client) -> None:
    """The routes read an id in any spelling as the same one; a retry that spells it otherwise
    (upper case, no hyphens, braces, a urn) is the same request, replayed, not a key reused for
    another; a spelling the routes refuse is not the same request."""
    job_id = client.data("POST", "/jobs", 201, json=JOB)["job_id"]
    key = f"k-{uuid.uuid4()}"
    first = client.call("POST", f"/jobs/{job_id}/cancel", headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    for spelling in (job_id.upper(), job_id.replace("-", ""), f"{{{job_id}}}", f"urn:uuid:{job_id}"):
        again = client.call("POST", f"/jobs/{spelling}/cancel", headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true", again.text
        assert again.json()["data"] == first.json()["data"]
    for other_path in (f"/jobs/{uuid.uuid4()}/cancel", f"/jobs/uuid:{job_id}/cancel"):
        other = client.call("POST", other_path, headers={"Idempotency-Key": key})
        assert other.status_code == 422, other.text  # another job, or no job, is another request


def test_the_contract_lists_the_key_on_every_post_a_token_signs(client: Client) -> None:
    """The middleware takes an Idempotency-Key on every POST made with a bearer token; the contract
    listed it on the five routes that read it themselves, so a client generated from it had no
    way to send it to the others (cancel, execute, confirm-upload, a webhook's rotation...)."""
    paths = client.http.get("/openapi.json").json()["paths"]
    signed = [(path, operation) for path, operations in paths.items() for method, operation in operations.items()
              if method == "post" and operation.get("security")]
    assert len(signed) > 5
    for path, operation in signed:
        keys = [p for p in operation.get("parameters", [])
                if p["in"] == "header" and p["name"].lower() == "idempotency-key"]
        assert len(keys) == 1 and not keys[0].get("required"), path
        assert keys[0]["schema"].get("maxLength") == 255 or any(
            s.get("maxLength") == 255 for s in keys[0]["schema"].get("anyOf", [])), (path, keys[0])
    unsigned = [path for path, operations in paths.items() for method, operation in operations.items()
                if method == "post" and not operation.get("security")]
    assert "/auth/anon" in unsigned  # its own idempotency (the device hash): no key to list
    for path in unsigned:
        assert not any(p["name"].lower() == "idempotency-key" for p in paths[path]["post"].get("parameters", [])), path
