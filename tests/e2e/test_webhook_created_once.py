"""POST /webhooks with an Idempotency-Key, the process dying after the endpoint's insert and before
the key's answer was stored (its claim then goes stale, or is released, and the retry runs again):
the retry made a second endpoint, with a second secret. The first, whose secret the client never
saw, received every event too, signed with it. Its id now derives from the key, as a job's does."""

from __future__ import annotations

import contextlib
import uuid

import httpx

from .test_bounded_resources import served_client


def test_a_keyed_endpoint_creation_retried_after_its_answer_was_lost_makes_one_endpoint(settings, monkeypatch):
    from adapters.api.idempotency import IdempotencyKeys

    store = IdempotencyKeys._store
    lost = []

    async def lost_once(self, *args, **kwargs):
        if not lost:
            lost.append(True)
            raise RuntimeError("the process is killed here")  # the endpoint is committed, no answer kept
        return await store(self, *args, **kwargs)

    monkeypatch.setattr(IdempotencyKeys, "_store", lost_once)
    with served_client(settings) as (url, client):
        body = {"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]}
        key = {"Idempotency-Key": f"hook-{uuid.uuid4()}"}
        with contextlib.suppress(httpx.HTTPError):  # the answer never comes
            client.call("POST", "/webhooks", json=body, headers=key)
        retry = httpx.post(f"{url}/webhooks", json=body, headers={**client.headers, **key}, timeout=30)
        assert retry.status_code == 201, retry.text
        listed = httpx.get(f"{url}/webhooks", headers=client.headers, timeout=30).json()["data"]["items"]
        assert [e["id"] for e in listed] == [retry.json()["data"]["id"]]
        assert retry.json()["data"]["secret"].startswith("whsec_")


def test_a_keyed_rotation_retried_after_its_answer_was_lost_rotates_once(settings, monkeypatch):
    """The same crash during a keyed rotate-secret: the retry rotated again, so the secret the
    client still verified with (its grace of 24 h promised) stopped signing at once, replaced by
    one it never saw."""
    import psycopg

    from adapters.api.idempotency import IdempotencyKeys

    store = IdempotencyKeys._store
    lost: list[bool] = []

    async def lost_once(self, *args, **kwargs):
        if not lost:
            lost.append(True)
            raise RuntimeError("the process is killed here")
        return await store(self, *args, **kwargs)

    with served_client(settings) as (url, client):
        made = client.data("POST", "/webhooks", 201,
                           json={"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]})
        monkeypatch.setattr(IdempotencyKeys, "_store", lost_once)
        key = {"Idempotency-Key": f"rotate-{uuid.uuid4()}"}
        path = f"/webhooks/{made['id']}/rotate-secret"
        with contextlib.suppress(httpx.HTTPError):  # the answer never comes
            client.call("POST", path, headers=key)
        retry = httpx.post(f"{url}{path}", headers={**client.headers, **key}, timeout=30)
        assert retry.status_code == 200, retry.text
    with psycopg.connect(settings.effective_database_url) as conn:
        signing = conn.execute("SELECT secret, previous_secret FROM palette_webhooks.endpoints WHERE id = %s",
                               [made["id"]]).fetchone()
    assert signing == (retry.json()["data"]["secret"], made["secret"])


def test_a_keyed_creation_retried_after_a_rotation_shows_no_secret_it_did_not_make(settings, monkeypatch):
    """Its answer lost, the creation's retry finds its endpoint; rotated since, the endpoint's
    secret is not the one the creation made: a 409, not the current secret (shown once, to the
    rotation's caller)."""
    from adapters.api.idempotency import IdempotencyKeys

    store = IdempotencyKeys._store

    async def lost(self, *args, **kwargs):
        raise RuntimeError("the process is killed here")  # every keyed answer lost

    with served_client(settings) as (url, client):
        body = {"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]}
        key = {"Idempotency-Key": f"hook-{uuid.uuid4()}"}
        monkeypatch.setattr(IdempotencyKeys, "_store", lost)
        with contextlib.suppress(httpx.HTTPError):
            client.call("POST", "/webhooks", json=body, headers=key)
        monkeypatch.setattr(IdempotencyKeys, "_store", store)
        (made,) = httpx.get(f"{url}/webhooks", headers=client.headers, timeout=30).json()["data"]["items"]
        rotated = client.data("POST", f"/webhooks/{made['id']}/rotate-secret", 200)
        retry = httpx.post(f"{url}/webhooks", json=body, headers={**client.headers, **key}, timeout=30)
        assert retry.status_code == 409 and retry.json()["error"]["code"] == "INVALID_STATE", retry.text
        assert rotated["secret"] not in retry.text


def test_a_keyed_creation_or_rotation_retried_while_its_answer_is_kept_is_answered_that_answer_again(settings):
    """README: while the key's answer is kept (PALETTE_IDEMPOTENCY_TTL_S), a retry is answered it
    again, whatever happened since, as every keyed POST: a creation retried after a rotation or a
    deletion, a rotation retried after another rotation. The README said a 409, the endpoint made
    again, and another rotation: only so once the answer is gone (the tests above)."""
    with served_client(settings) as (url, client):
        body = {"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]}
        key = {**client.headers, "Idempotency-Key": f"hook-{uuid.uuid4()}"}
        made = httpx.post(f"{url}/webhooks", json=body, headers=key, timeout=30)
        assert made.status_code == 201, made.text
        path = f"{url}/webhooks/{made.json()['data']['id']}"
        rotation = {**client.headers, "Idempotency-Key": f"rotate-{uuid.uuid4()}"}
        rotated = httpx.post(f"{path}/rotate-secret", headers=rotation, timeout=30)
        assert rotated.status_code == 200, rotated.text
        assert client.data("POST", f"/webhooks/{made.json()['data']['id']}/rotate-secret", 200)  # another one

        for retry in (httpx.post(f"{url}/webhooks", json=body, headers=key, timeout=30),
                      httpx.post(f"{path}/rotate-secret", headers=rotation, timeout=30)):
            assert retry.headers["idempotent-replayed"] == "true"
        assert retry.json()["data"]["secret"] == rotated.json()["data"]["secret"]  # no third rotation

        assert httpx.delete(path, headers=client.headers, timeout=30).status_code == 200
        again = httpx.post(f"{url}/webhooks", json=body, headers=key, timeout=30)
        assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
        assert again.json()["data"]["secret"] == made.json()["data"]["secret"]
        assert httpx.get(f"{url}/webhooks", headers=client.headers, timeout=30).json()["data"]["items"] == []
