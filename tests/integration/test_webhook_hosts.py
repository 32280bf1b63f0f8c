"""Webhook hosts on the real API, PostgreSQL and sockets: an international name is registered in
its ASCII form and a host with none is refused (422), as production refuses reserved and
site-local addresses; a stored URL that cannot be sent to fails attempt by attempt until the
delivery has failed and the endpoint is disabled (it does not stay pending, untried, forever);
and a stored international name is delivered to, with an ASCII Host header."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from adapters.api.app import create_app
from adapters.bootstrap import build
from adapters.settings import Settings
from adapters.webhooks import store, targets
from adapters.webhooks.sender import WebhookSender
from tests.webhook_receiver import Receiver

LONG_LABEL = "a" * 64
EVENTS = ["job.queued"]


def api_for(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)  # as ``palette serve webhooks`` makes it
    container = build(settings)
    try:
        with TestClient(create_app(container)) as api:
            r = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"})
            assert r.status_code == 201, r.text
            yield api, {"Authorization": f"Bearer {r.json()['data']['token']}"}
    finally:
        container.close()


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    yield from api_for(settings)


@pytest.fixture(scope="module")
def production_api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    yield from api_for(settings.model_copy(update={"env": "production"}))


def test_an_international_name_is_registered_in_its_ascii_form(api):
    client, headers = api
    r = client.post("/webhooks", json={"url": "http://BÜCHER.example:9/hook?q=ü", "events": EVENTS}, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["url"] == "http://xn--bcher-kva.example:9/hook?q=ü"
    listed = client.get("/webhooks", headers=headers).json()["data"]["items"]
    assert [e["url"] for e in listed if e["id"] == r.json()["data"]["id"]] == ["http://xn--bcher-kva.example:9/hook?q=ü"]


@pytest.mark.parametrize("url", [
    f"http://{LONG_LABEL}.example/hook", f"http://bü{LONG_LABEL}.de/hook", "http://a..b/hook",
    "http://" + ".".join(["abcdefghi"] * 26) + "/hook", "http://bü cher.de/hook", "http://1.2.3.999/hook",
])
def test_a_host_with_no_ascii_form_is_refused_with_422(api, url):
    client, headers = api
    r = client.post("/webhooks", json={"url": url, "events": EVENTS}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", r.text
    assert r.json()["error"]["message"].startswith("url: ")


@pytest.mark.parametrize("url", ["https://[::127.0.0.1]/in", "https://[fec0::1]/in", "https://[::8.8.8.8]/in",
                                 "https://[4000::1]/in", "https://[2002:a9fe:a9fe::1]/in"])
def test_production_refuses_reserved_site_local_and_ipv4_compatible_addresses_with_422(production_api, url):
    client, headers = production_api
    r = client.post("/webhooks", json={"url": url, "events": EVENTS}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", r.text
    assert r.json()["error"]["message"].startswith("url: ")


# -- the sender, on URLs stored before hosts were checked ----------------------------------------------
@pytest.fixture
def stored(settings: Settings) -> Iterator[tuple[psycopg.Connection[Any], Any]]:
    """An endpoint whose URL is written as given, past ``store.create_endpoint``'s normalising
    (as rows registered before it hold): ``stored[1](url)`` makes one, with one delivery due."""
    made: list[Any] = []
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)

        def endpoint(url: str) -> tuple[Any, Any]:
            endpoint_id = store.create_endpoint(conn, uuid.uuid4(), "http://127.0.0.1:9/hook", EVENTS,
                                                "whsec_dGVzdA==", 10)["id"]
            made.append(endpoint_id)
            conn.execute("UPDATE palette_webhooks.endpoints SET url = %s WHERE id = %s", [url, endpoint_id])
            job = uuid.uuid4()
            store.record(conn, [store.NewDelivery(endpoint_id, f"msg_{job.hex}_1", job, 1, "job.queued", b"{}")])
            delivery_id = conn.execute("SELECT id FROM palette_webhooks.deliveries WHERE endpoint_id = %s",
                                       [endpoint_id]).fetchone()
            assert delivery_id is not None
            return endpoint_id, delivery_id[0]

        try:
            yield conn, endpoint
        finally:
            for endpoint_id in made:
                conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint_id])


@pytest.fixture
def sender(settings: Settings) -> Iterator[WebhookSender]:
    pool: ConnectionPool[Any] = ConnectionPool(settings.effective_database_url, min_size=1, max_size=2,
                                               kwargs={"autocommit": True}, open=True)
    s = WebhookSender(pool, targets.client(production=False), (0.0, 0.0), production=False,
                      disable_after=3, disable_after_s=0.0)
    yield s
    s.close()


def attempt_once(conn: psycopg.Connection[Any], sender: WebhookSender, delivery_id: Any) -> None:
    """Claim the delivery (as the sender's loop does) and make its attempt, in this thread."""
    mine = [d for d in store.claim(conn, 100, 30.0) if d.id == delivery_id]
    assert len(mine) == 1, "the delivery is due"
    sender._deliver(mine[0])


def test_a_stored_url_that_cannot_be_sent_to_fails_its_way_to_a_disabled_endpoint(stored, sender):
    conn, endpoint = stored
    endpoint_id, delivery_id = endpoint(f"http://{LONG_LABEL}.example/hook")
    for _ in range(3):  # the first try and the schedule's two retries, each recorded
        attempt_once(conn, sender, delivery_id)
    delivery = conn.execute("SELECT status, attempts, last_error FROM palette_webhooks.deliveries WHERE id = %s",
                            [delivery_id]).fetchone()
    assert delivery is not None
    assert delivery[:2] == ("failed", 3) and delivery[2].startswith("refused: "), delivery
    attempts = conn.execute("SELECT n, status_code FROM palette_webhooks.attempts WHERE delivery_id = %s ORDER BY n",
                            [delivery_id]).fetchall()
    assert attempts == [(1, None), (2, None), (3, None)]
    enabled = conn.execute("SELECT enabled FROM palette_webhooks.endpoints WHERE id = %s", [endpoint_id]).fetchone()
    assert enabled == (False,)


def test_a_stored_international_name_is_delivered_with_an_ascii_host_header(stored, sender):
    conn, endpoint = stored
    receiver = Receiver()
    try:
        port = receiver.server.server_port
        _, delivery_id = endpoint(f"http://ｌｏｃａｌｈｏｓｔ:{port}/idn")  # noqa: RUF001 - fullwidth letters
        attempt_once(conn, sender, delivery_id)
        [received] = receiver.wait("/idn", 1)
        assert received.headers["host"] == f"localhost:{port}"
        row = conn.execute("SELECT status, attempts FROM palette_webhooks.deliveries WHERE id = %s",
                           [delivery_id]).fetchone()
        assert row == ("succeeded", 1)
    finally:
        receiver.close()
