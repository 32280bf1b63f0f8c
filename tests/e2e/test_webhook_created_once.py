"""POST /webhooks with an Idempotency-Key, the process dying after the endpoint's insert and before
the key's answer was stored (its claim then goes stale, or is released, and the retry runs again):
the retry made a second endpoint, with a second secret. The first, whose secret the client never
saw, received every event too, signed with it. Its id now derives from the key, as a job's does."""

from __future__ import annotations

import contextlib
import uuid

import httpx


def test_a_keyed_endpoint_creation_retried_after_its_answer_was_lost_makes_one_endpoint(settings, monkeypatch):
    from adapters.api.idempotency import IdempotencyKeys
    from adapters.bootstrap import build
    from adapters.webhooks import store as webhooks

    from .conftest import Client
    from .test_bounded_resources import served

    store = IdempotencyKeys._store
    lost = []

    async def lost_once(self, *args, **kwargs):
        if not lost:
            lost.append(True)
            raise RuntimeError("the process is killed here")  # the endpoint is committed, no answer kept
        return await store(self, *args, **kwargs)

    monkeypatch.setattr(IdempotencyKeys, "_store", lost_once)
    container = build(settings, pool_size=2)
    with container.read_pool.connection() as conn:
        webhooks.ensure_schema(conn)  # the webhooks process makes it
    try:
        with served(container) as url:
            client = Client(httpx.Client(base_url=url, timeout=30))
            body = {"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]}
            key = {"Idempotency-Key": f"hook-{uuid.uuid4()}"}
            with contextlib.suppress(httpx.HTTPError):  # the answer never comes
                client.call("POST", "/webhooks", json=body, headers=key)
            retry = httpx.post(f"{url}/webhooks", json=body, headers={**client.headers, **key}, timeout=30)
            assert retry.status_code == 201, retry.text
            listed = httpx.get(f"{url}/webhooks", headers=client.headers, timeout=30).json()["data"]["items"]
            assert [e["id"] for e in listed] == [retry.json()["data"]["id"]]
            assert retry.json()["data"]["secret"].startswith("whsec_")
    finally:
        container.close()
