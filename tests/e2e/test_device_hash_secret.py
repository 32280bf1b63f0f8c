"""The device hash is a credential and never leaves the write side: analysts replaying a user's
stream see nothing /auth/anon would accept as that client's, PostgreSQL holds it nowhere (event
store or read models), devices registered before keep their user, and registration is limited
per client address."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from adapters.bootstrap import build, open_event_store
from adapters.tokens import TokenIssuer
from domain.contracts.personal import SEALED_PREFIX
from domain.user import DEVICE_KEY_SCHEME, REDACTED_DEVICE_KEY, legacy_user_id_for_device
from tests.e2e.test_staff_roles import staff_headers
from tests.integration.test_stack import wait_until

ACCEPTED = re.compile(r"^[A-Za-z0-9._:-]{8,200}$")  # what AnonCreate takes as a device_hash


def register(http: Any, device_hash: str, status: int | None = None) -> dict[str, Any]:
    r = http.post("/auth/anon", json={"device_hash": device_hash})
    assert r.status_code == (status or r.status_code) and r.status_code in (200, 201), r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def users_row(settings: Any, user_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        return conn.execute("SELECT id, device_hash FROM palette_read.users WHERE id = %s", [user_id]).fetchone()


def test_an_analyst_reading_a_users_stream_finds_no_credential_for_that_client(http, settings):
    device = f"device-{uuid.uuid4().hex}"
    user_id = register(http, device, 201)["user_id"]
    analyst = staff_headers(settings, "analyst")

    events = http.get(f"/streams/{user_id}/events", headers=analyst)
    state = http.get(f"/streams/{user_id}/state", params={"version": 1}, headers=analyst)
    assert events.status_code == 200 and state.status_code == 200
    assert device not in events.text and device not in state.text
    [registered, *_] = [json.loads(line) for line in events.text.splitlines()]
    assert registered["data"]["device_key"].startswith(f"{SEALED_PREFIX}{user_id}:")  # sealed, not even the key

    # Whatever the analyst saw, presented as a device hash, is not this client.
    shown = {s for line in events.text.splitlines() for s in strings(json.loads(line))} | set(strings(state.json()))
    tried = [s for s in shown if ACCEPTED.match(s)]
    assert registered["data"]["device_key"] in tried
    for value in tried:
        assert register(http, value)["user_id"] != user_id, value


def test_the_raw_device_hash_is_stored_nowhere_in_postgresql(http, settings):
    device = f"device-{uuid.uuid4().hex}"
    user_id = register(http, device, 201)["user_id"]
    row = wait_until(lambda: users_row(settings, user_id), timeout_s=30, what="the users row")
    assert row[1].startswith(f"{SEALED_PREFIX}{user_id}:") and DEVICE_KEY_SCHEME not in row[1]

    app = open_event_store(settings, pool_size=1)
    try:
        recorder: Any = app.recorder
        events = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            [stored] = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE originator_id = %s").format(events),
                                    [user_id]).fetchone() or [0]
            assert stored >= 2
            [hits] = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE position(%s::bytea in state) > 0")
                                  .format(events), [device.encode()]).fetchone() or [None]
            assert hits == 0
            tables = [r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables "
                                                  "WHERE table_schema = 'palette_read'").fetchall()]
            assert "users" in tables
            for name in tables:
                [found] = conn.execute(sql.SQL("SELECT count(*) FROM {} t WHERE position(%s in t::text) > 0")
                                       .format(sql.Identifier("palette_read", name)), [device]).fetchone() or [None]
                assert found == 0, name
    finally:
        app.close()


def test_registering_again_returns_the_same_user_and_token_subject(http, settings):
    device = f"device-{uuid.uuid4().hex}"
    first = register(http, device, 201)
    again = register(http, device, 200)
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600)
    assert again["user_id"] == first["user_id"] and again["created"] is False
    assert str(issuer.verify(first["token"])[0]) == str(issuer.verify(again["token"])[0]) == first["user_id"]


def test_a_device_registered_before_device_keys_keeps_its_user_and_its_hash_is_not_shown(http, settings):
    from tests.unit.test_device_key import store_v1_user

    device = f"legacy-{uuid.uuid4().hex}"
    legacy_id = legacy_user_id_for_device(device)
    app = open_event_store(settings, pool_size=1)
    try:  # stored as the code before device keys stored it: v1, the raw hash, the unkeyed id
        assert store_v1_user(app, device, at=datetime.now(UTC)) == legacy_id
        position = int(app.recorder.max_notification_id() or 1)
    finally:
        app.close()

    data = register(http, device, 200)
    assert (data["user_id"], data["created"]) == (str(legacy_id), False)
    me = http.get("/me", headers={"Authorization": f"Bearer {data['token']}"}).json()["data"]
    assert me["credits"] == 50

    analyst = staff_headers(settings, "analyst")
    events = http.get(f"/streams/{legacy_id}/events", headers=analyst).text
    log = http.get("/streams", params={"from": max(1, position - 1)}, headers=analyst).text
    assert device not in events and device not in log
    assert json.loads(events.splitlines()[0])["data"]["device_key"] == REDACTED_DEVICE_KEY
    row = wait_until(lambda: users_row(settings, str(legacy_id)), timeout_s=30, what="the legacy users row")
    assert row[1] is None


@pytest.fixture
def limited_api(settings) -> Iterator[Any]:
    """An API in this process on the session's PostgreSQL, with a small registration budget."""
    from adapters.api.app import create_app

    def start(**limits: Any) -> TestClient:
        container = build(settings.model_copy(update=limits), pool_size=2)
        containers.append(container)
        return TestClient(create_app(container), client=("198.51.100.7", 40000))

    containers: list[Any] = []
    yield start
    for c in containers:
        c.close()


def test_registration_past_the_limit_is_429_with_retry_after_repeats_included(limited_api):
    api = limited_api(rate_register_per_s=0.01, rate_register_burst=3)
    device = f"device-{uuid.uuid4().hex}"
    assert [api.post("/auth/anon", json={"device_hash": device}).status_code for _ in range(3)] == [201, 200, 200]
    # Another device from the same address, with a forged X-Forwarded-For (not trusted by default).
    r = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"},
                 headers={"X-Forwarded-For": "203.0.113.50"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
    assert int(r.headers["Retry-After"]) >= 1


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(limited_api):
    api = limited_api(rate_register_per_s=0.01, rate_register_burst=1, trusted_proxies=1)

    def anon(forwarded: str) -> int:
        return api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"},
                        headers={"X-Forwarded-For": forwarded}).status_code

    assert anon("6.6.6.6, 203.0.113.1") == 201
    assert anon("7.7.7.7, 203.0.113.1") == 429  # the client's own entries are not trusted
    assert anon("203.0.113.2") == 201


@pytest.mark.parametrize(("hops", "proto", "scheme"), [
    (1, "https", "https"), (0, "https", "http"),  # untrusted: as this server was reached
    (1, "gopher", "http"), (2, "https", "http"),  # not a scheme; fewer entries than proxies
    (2, "http, https", "http"),  # the entry two proxies back, as X-Forwarded-For is read
])
def test_confirm_url_takes_the_scheme_a_trusted_proxy_forwards(limited_api, hops, proto, scheme):
    api = limited_api(trusted_proxies=hops)
    token = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"},
                     headers={"X-Forwarded-For": "203.0.113.9, 203.0.113.8"}).json()["data"]["token"]
    job = api.post("/jobs", json={"preset": "interior", "item_count": 1},
                   headers={"Authorization": f"Bearer {token}", "X-Forwarded-Proto": proto})
    assert job.status_code == 201, job.text
    assert job.json()["data"]["confirm_url"].startswith(f"{scheme}://testserver/jobs/")


def test_the_users_migration_clears_raw_device_hashes_and_keeps_device_keys(settings):
    from projections.schema import drop_raw_device_hashes, ensure_schema

    raw_id, keyed_id, key = uuid.uuid4(), uuid.uuid4(), DEVICE_KEY_SCHEME + "ab" * 32
    sealed_id, erased_id = uuid.uuid4(), uuid.uuid4()
    sealed = f"{SEALED_PREFIX}{sealed_id}:c2VhbGVk"
    with psycopg.connect(settings.effective_database_url) as conn:
        ensure_schema(conn)
        try:  # rows as the code before device keys left them; rolled back, other tests never see them
            conn.execute("INSERT INTO palette_read.users (id, plan, credits, reserved, spent, granted, device_hash, "
                         "created_at, updated_at) VALUES (%s, 'free', 0, 0, 0, 0, 'raw-device-hash', now(), now()), "
                         "(%s, 'free', 0, 0, 0, 0, %s, now(), now()), (%s, 'free', 0, 0, 0, 0, %s, now(), now()), "
                         "(%s, 'free', 0, 0, 0, 0, 'erased', now(), now())",
                         [raw_id, keyed_id, key, sealed_id, sealed, erased_id])
            assert drop_raw_device_hashes(conn) >= 1
            rows = dict(conn.execute("SELECT id, device_hash FROM palette_read.users WHERE id = ANY(%s)",
                                     [[raw_id, keyed_id, sealed_id, erased_id]]).fetchall())
            assert rows == {raw_id: None, keyed_id: key, sealed_id: sealed, erased_id: "erased"}
            assert drop_raw_device_hashes(conn) == 0
        finally:
            conn.rollback()
