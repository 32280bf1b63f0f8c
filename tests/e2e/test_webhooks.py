"""Webhooks end to end: a real job through the API, the relay and ``palette serve webhooks`` (a
process of its own, on a short retry schedule) to a receiver on loopback; every delivery is
verified with the standardwebhooks package."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from adapters.api.app import create_app
from adapters.bootstrap import build, open_event_store
from adapters.settings import Settings
from adapters.webhooks import store
from adapters.webhooks.consumer import DeliveryRecorder
from domain.contracts.keys import output_key
from projections.log import LogReader
from tests.webhook_receiver import WAIT_S, Received, Receiver

from .conftest import Client
from .test_lifecycle import EDITS, callback, create_uploaded_job

ALL = ["job.queued", "item.completed", "job.finished", "job.canceled"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class WebhooksProcess:
    """``palette serve webhooks`` with retries 0.3 s apart and an endpoint disabled after 3
    failures in a row."""

    def __init__(self, settings: Settings, run: Path) -> None:
        self.env = {**os.environ, **settings.as_env(), "PALETTE_WEBHOOK_RETRY_SCHEDULE": "300ms,300ms,300ms",
                    "PALETTE_WEBHOOK_DISABLE_AFTER": "3", "PALETTE_WEBHOOK_DISABLE_AFTER_S": "0",
                    "PALETTE_METRICS_PORT": "0"}
        self.run = run
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ready = self.run / "ready"
        ready.unlink(missing_ok=True)
        with (self.run / "log").open("a") as log:
            process = subprocess.Popen([sys.executable, "-m", "adapters.cli", "serve", "webhooks", "--ready-file",
                                        str(ready)], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.process = process
        until(lambda: ready.exists() or process.poll() is not None)
        assert process.poll() is None, (self.run / "log").read_text()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture(scope="module")
def webhooks(apps: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhooksProcess]:
    process = WebhooksProcess(apps.settings, tmp_path_factory.mktemp("webhooks"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def register(client: Client, url: str, events: list[str] = ALL) -> dict[str, Any]:
    created: dict[str, Any] = client.data("POST", "/webhooks", 201, json={"url": url, "events": events})
    return created


def queued_job(client: Client, items: int = 1) -> str:
    job_id = create_uploaded_job(client, items)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    return job_id


def verified(secret: str, received: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


def test_a_receiver_gets_a_jobs_events_in_order_signed(client, http, settings, receiver, webhooks):
    endpoint = register(client, receiver.url("/ordered"))
    job_id = queued_job(client, 3)
    for idx, status in [(2, "done"), (0, "failed"), (1, "done")]:
        body = {"idx": idx, "status": status, "idempotency_key": f"{job_id}:{idx}"}
        if status == "done":
            body["output_key"] = output_key(uuid.UUID(client.user_id), uuid.UUID(job_id), idx)
        else:
            body["error"] = "decode failed"
        assert callback(http, settings.callback_secret, job_id, body).status_code == 200

    got = [verified(endpoint["secret"], r) for r in receiver.wait("/ordered", 5)]
    assert [p["type"] for p in got] == ["job.queued", "item.completed", "item.completed", "item.completed",
                                        "job.finished"]
    assert {p["data"]["job_id"] for p in got} == {job_id}
    assert [(p["data"]["item"]["idx"], p["data"]["item"]["status"]) for p in got[1:4]] == [
        (2, "done"), (0, "failed"), (1, "done")]
    assert got[2]["data"]["item"]["error"] == "decode failed"
    assert [p["data"]["progress"]["done"] + p["data"]["progress"]["failed"] for p in got] == [0, 1, 2, 3, 3]
    assert got[-1]["data"]["status"] == "done"
    assert got[-1]["data"]["progress"] == {"done": 2, "failed": 1, "total": 3}
    ids = [r.headers["webhook-id"] for r in receiver.on("/ordered")]
    assert len(set(ids)) == 5 and all(i.startswith(f"msg_{uuid.UUID(job_id).hex}_") for i in ids)

    def deliveries() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"]
        return items

    until(lambda: all(d["status"] != "pending" for d in deliveries()))  # the receipts are recorded after the answer
    assert sorted(d["message_id"] for d in deliveries()) == sorted(ids)
    assert {(d["status"], d["attempt_count"], d["last_status_code"]) for d in deliveries()} == {("succeeded", 1, 200)}


def test_a_receiver_answering_500_twice_gets_the_third_attempt(client, receiver, webhooks):
    receiver.fail["/flaky"] = 2
    endpoint = register(client, receiver.url("/flaky"), ["job.queued"])
    job_id = queued_job(client)
    attempts = receiver.wait("/flaky", 3)
    assert len({r.headers["webhook-id"] for r in attempts}) == 1
    assert all(verified(endpoint["secret"], r)["data"]["job_id"] == job_id for r in attempts)

    def delivered() -> dict[str, Any]:
        items = client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"]
        return items[0] if items else {}

    until(lambda: delivered().get("status") == "succeeded")
    delivery = delivered()
    assert delivery["attempt_count"] == 3
    assert [(a["status_code"], a["response"]) for a in delivery["attempts"]] == [(200, "ok"), (500, "no"), (500, "no")]
    assert delivery["next_attempt_at"] is None


def test_a_redelivery_is_a_new_attempt_with_the_same_webhook_id(client, receiver, webhooks):
    endpoint = register(client, receiver.url("/again"), ["job.queued"])
    queued_job(client)
    first = receiver.wait("/again", 1)[0]
    until(lambda: bool(client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"][0]["attempts"]))
    delivery = client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"][0]
    again = client.data("POST", f"/webhooks/{endpoint['id']}/deliveries/{delivery['id']}/redeliver", 202)
    assert again["status"] == "pending" and again["message_id"] == first.headers["webhook-id"]
    second = receiver.wait("/again", 2)[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.body == first.body
    verified(endpoint["secret"], second)
    until(lambda: client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"][0]["attempt_count"] == 2)


def test_an_endpoint_failing_in_a_row_is_disabled_until_enabled(client, receiver, webhooks):
    receiver.fail["/down"] = 3
    endpoint = register(client, receiver.url("/down"), ["job.queued"])
    queued_job(client)
    receiver.wait("/down", 3)
    until(lambda: client.data("GET", f"/webhooks/{endpoint['id']}")["enabled"] is False)
    assert client.data("GET", f"/webhooks/{endpoint['id']}")["disabled_at"] is not None
    assert client.data("POST", f"/webhooks/{endpoint['id']}/enable")["enabled"] is True
    fourth = receiver.wait("/down", 4)[3]
    assert fourth.headers["webhook-id"] == receiver.on("/down")[0].headers["webhook-id"]
    verified(endpoint["secret"], fourth)


def test_a_sender_killed_mid_post_sends_again_under_the_same_id_and_in_order(client, receiver, webhooks):
    receiver.hold["/held"] = release = threading.Event()
    endpoint = register(client, receiver.url("/held"), ["job.queued", "job.canceled"])
    job_id = queued_job(client)
    first = receiver.wait("/held", 1)[0]  # claimed and in flight: the receiver holds its answer
    webhooks.kill()
    client.data("POST", f"/jobs/{job_id}/cancel")  # while the process is away
    release.set()
    webhooks.start()
    got = receiver.wait("/held", 3)
    assert [verified(endpoint["secret"], r)["type"] for r in got] == ["job.queued", "job.queued", "job.canceled"]
    assert got[1].headers["webhook-id"] == first.headers["webhook-id"] != got[2].headers["webhook-id"]


def test_a_lost_event_is_recorded_with_the_next_one_of_its_job(client, http, settings, webhooks):
    """The recorder alone (the process stopped), handed only a job's item.completed: the
    job.queued before it, which the broker "lost", is recorded too; the same record again adds nothing."""
    webhooks.stop()
    try:
        endpoint = register(client, "http://127.0.0.1:9/nobody", ALL)
        job_id = queued_job(client, 2)
        body = {"idx": 1, "status": "failed", "error": "x", "idempotency_key": f"{job_id}:1"}
        assert callback(http, settings.callback_secret, job_id, body).status_code == 200
        app = open_event_store(settings, pool_size=1)
        reader = LogReader.of(app)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            recorder = DeliveryRecorder(conn, reader, app.repository.event_store)
            events = reader.stream_events({uuid.UUID(job_id): (0, 100)})
            item = [e for e in events if e.type == "ItemCompleted"]
            assert recorder.record(item) == 2
            assert recorder.record(item) == 0
            assert DeliveryRecorder(conn, reader, app.repository.event_store).record(events) == 0  # a fresh process
            rows = conn.execute("SELECT event_type, version FROM palette_webhooks.deliveries WHERE endpoint_id = %s "
                                "ORDER BY version", [endpoint["id"]]).fetchall()
        reader.close()
        queued = next(e for e in events if e.type == "JobQueued")
        assert rows == [("job.queued", queued.version), ("item.completed", item[0].version)]
        client.data("DELETE", f"/webhooks/{endpoint['id']}")
    finally:
        webhooks.start()


def test_a_job_whose_owner_a_new_jobs_pushes_out_of_the_cache_still_gets_its_deliveries(
        client, http, settings, webhooks):
    """The recorder alone, as above, remembering one job's owner: a batch with a job it knew and
    a job it did not read the new job's owner into its cache, which pushed the known one out, and
    the known job's events were skipped (their offset committed: lost until the sweep)."""
    webhooks.stop()
    try:
        endpoint = register(client, "http://127.0.0.1:9/cached", ALL)
        known = queued_job(client, 1)
        app = open_event_store(settings, pool_size=1)
        reader = LogReader.of(app)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            recorder = DeliveryRecorder(conn, reader, app.repository.event_store, remembered=1)
            assert recorder.record(reader.stream_events({uuid.UUID(known): (0, 100)})) == 1  # its job.queued
            body = {"idx": 0, "status": "failed", "error": "x", "idempotency_key": f"{known}:0"}
            assert callback(http, settings.callback_secret, known, body).status_code == 200
            new = queued_job(client, 1)
            events = reader.stream_events({uuid.UUID(known): (0, 100), uuid.UUID(new): (0, 100)})
            assert recorder.record(events) == 3  # the known job's item.completed and job.finished, the new one's queued
        reader.close()
        client.data("DELETE", f"/webhooks/{endpoint['id']}")
    finally:
        webhooks.start()


def test_an_endpoint_gets_only_the_event_types_it_chose_and_none_from_before_it_was_registered(
        client, http, settings, webhooks):
    """The recorder alone, as above: a job queued before the endpoint existed gets none of its
    job.queued, and job.finished, not chosen, is never recorded."""
    webhooks.stop()
    try:
        early = queued_job(client, 1)
        endpoint = register(client, "http://127.0.0.1:9/chosen", ["job.queued", "item.completed"])
        body = {"idx": 0, "status": "failed", "error": "x", "idempotency_key": f"{early}:0"}
        assert callback(http, settings.callback_secret, early, body).status_code == 200  # its only item: finished
        late = queued_job(client, 1)
        app = open_event_store(settings, pool_size=1)
        reader = LogReader.of(app)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            events = reader.stream_events({uuid.UUID(early): (0, 100), uuid.UUID(late): (0, 100)})
            assert "JobFinished" in {e.type for e in events}
            DeliveryRecorder(conn, reader, app.repository.event_store).record(events)
            rows = conn.execute("SELECT job_id::text, event_type FROM palette_webhooks.deliveries "
                                "WHERE endpoint_id = %s", [endpoint["id"]]).fetchall()
        reader.close()
        assert sorted(rows) == sorted([(early, "item.completed"), (late, "job.queued")])
        client.data("DELETE", f"/webhooks/{endpoint['id']}")
    finally:
        webhooks.start()


def test_an_endpoint_enabled_again_never_gets_the_events_from_while_it_was_disabled(client, http, settings, webhooks):
    """The recorder alone (the process stopped), as above: a job queued while an endpoint was
    disabled gets no job.queued there (its owner's other endpoint gets one), and its
    item.completed after the enable does. A fresh recorder (a restarted process, or the job gone
    from the recorder's cache) folding the job again recorded that job.queued as well, after the
    item.completed had gone out: out of order, and an event from while the endpoint was disabled."""
    webhooks.stop()
    try:
        endpoint = register(client, "http://127.0.0.1:9/paused", ALL)
        other = register(client, "http://127.0.0.1:9/other", ["job.queued"])
        app = open_event_store(settings, pool_size=1)
        reader = LogReader.of(app)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute("UPDATE palette_webhooks.endpoints SET enabled = false, disabled_at = now() "
                         "WHERE id = %s", [endpoint["id"]])  # as its failures disable it
            job_id = queued_job(client, 2)
            recorder = DeliveryRecorder(conn, reader, app.repository.event_store)
            assert recorder.record(reader.stream_events({uuid.UUID(job_id): (0, 100)})) == 1  # the other's
            assert client.data("POST", f"/webhooks/{endpoint['id']}/enable")["enabled"] is True
            body = {"idx": 0, "status": "failed", "error": "x", "idempotency_key": f"{job_id}:0"}
            assert callback(http, settings.callback_secret, job_id, body).status_code == 200
            events = reader.stream_events({uuid.UUID(job_id): (0, 100)})
            assert recorder.record(events) == 1
            conn.execute("UPDATE palette_webhooks.deliveries SET status = 'succeeded', next_attempt_at = NULL "
                         "WHERE endpoint_id = %s", [endpoint["id"]])  # it went out
            DeliveryRecorder(conn, reader, app.repository.event_store).record(events)  # a fresh process
            rows = conn.execute("SELECT event_type, status FROM palette_webhooks.deliveries WHERE endpoint_id = %s "
                                "ORDER BY version", [endpoint["id"]]).fetchall()
        reader.close()
        assert rows == [("item.completed", "succeeded")]
        client.data("DELETE", f"/webhooks/{endpoint['id']}")
        client.data("DELETE", f"/webhooks/{other['id']}")
    finally:
        webhooks.start()


def test_finished_deliveries_are_forgotten_after_the_keep_time(client, receiver, settings, webhooks):
    endpoint = register(client, receiver.url("/kept"), ["job.queued"])
    queued_job(client)
    receiver.wait("/kept", 1)

    def listed() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = client.data("GET", f"/webhooks/{endpoint['id']}/deliveries")["items"]
        return items

    until(lambda: [d["status"] for d in listed()] == ["succeeded"])
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.prune(conn, keep_s=3600, limit=1000)
        assert len(listed()) == 1
        while store.prune(conn, keep_s=0, limit=1000):
            pass
    assert listed() == []


def test_a_rotated_secret_signs_and_the_old_one_still_verifies(client, receiver, webhooks):
    endpoint = register(client, receiver.url("/rotated"), ["job.queued"])
    rotated = client.data("POST", f"/webhooks/{endpoint['id']}/rotate-secret")
    assert rotated["secret"] != endpoint["secret"] and rotated["secret"].startswith("whsec_")
    queued_job(client)
    got = receiver.wait("/rotated", 1)[0]
    assert verified(rotated["secret"], got) == verified(endpoint["secret"], got)


def test_the_secret_is_shown_only_when_made(client, receiver):
    endpoint = register(client, receiver.url("/shown"))
    listed = client.data("GET", "/webhooks")["items"]
    assert [e["id"] for e in listed] == [endpoint["id"]]
    for shown in (listed[0], client.data("GET", f"/webhooks/{endpoint['id']}")):
        assert "secret" not in shown and endpoint["secret"] not in json.dumps(shown)


def test_another_users_endpoint_is_not_found(client, other, receiver):
    endpoint = register(client, receiver.url("/mine"))
    base = f"/webhooks/{endpoint['id']}"
    for method, path in [("GET", base), ("DELETE", base), ("POST", f"{base}/rotate-secret"),
                         ("POST", f"{base}/enable"), ("GET", f"{base}/deliveries"),
                         ("POST", f"{base}/deliveries/{uuid.uuid4()}/redeliver")]:
        r = other.call(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", (method, path)
    assert other.data("GET", "/webhooks")["items"] == []
    assert client.data("DELETE", base) == {"deleted": True}
    assert client.call("GET", base).status_code == 404


@pytest.mark.parametrize(("body", "says"), [
    ({"url": "ftp://127.0.0.1/x", "events": ["job.queued"]}, "must be http or https"),
    ({"url": "http://127.0.0.1/" + "a" * 2048, "events": ["job.queued"]}, "url"),
    ({"url": "http://127.0.0.1/x", "events": []}, "events"),
    ({"url": "http://127.0.0.1/x", "events": ["job.deleted"]}, "events"),
    ({"url": "http://127.0.0.1/x"}, "events"),
])
def test_a_bad_endpoint_is_refused_with_422(client, body, says):
    r = client.call("POST", "/webhooks", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED"
    assert says in r.json()["error"]["message"]


def test_endpoints_per_user_are_bounded(client, receiver, settings):
    for n in range(settings.webhook_endpoints_per_user):
        register(client, receiver.url(f"/bounded/{n}"))
    r = client.call("POST", "/webhooks", json={"url": receiver.url("/bounded/more"), "events": ALL})
    assert r.status_code == 409 and "at most" in r.json()["error"]["message"]


def test_redeliveries_are_limited_per_user_with_retry_after(settings, client, other, receiver):
    """An API whose users may redeliver twice (a token every 100 s): the third try is 429 with
    Retry-After, tries at unknown deliveries counted; another user has a budget of their own."""
    container = build(settings.model_copy(update={"rate_redeliver_burst": 2, "rate_redeliver_per_s": 0.01}))
    try:
        with TestClient(create_app(container)) as api:
            mine = register(client, receiver.url("/limited"))["id"]
            theirs = register(other, receiver.url("/limited"))["id"]

            def redeliver(who: Client, endpoint_id: str) -> Any:
                return api.post(f"/webhooks/{endpoint_id}/deliveries/{uuid.uuid4()}/redeliver", headers=who.headers)

            assert [redeliver(client, mine).status_code for _ in range(2)] == [404, 404]
            limited = redeliver(client, mine)
            assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED", limited.text
            assert 1 <= int(limited.headers["Retry-After"]) <= 100
            assert redeliver(other, theirs).status_code == 404
    finally:
        container.close()


def test_endpoint_creations_are_limited_per_user_as_rule_writes_are(settings, client, other, receiver):
    """Endpoints made and deleted in a loop kept no rows, but each creation checked a URL the
    client chose (a DNS lookup of its host in production), as fast as the client asked: creations
    now spend from a budget of their own, the size of the rule writes'; deleting spends nothing."""
    container = build(settings.model_copy(update={"rate_jobs_burst": 3, "rate_jobs_per_s": 0.01}))
    try:
        with TestClient(create_app(container)) as api:
            def create(who: Client) -> Any:
                return api.post("/webhooks", json={"url": receiver.url("/paced"), "events": ALL}, headers=who.headers)

            for _ in range(3):
                made = create(client)
                assert made.status_code == 201, made.text
                assert api.delete(f"/webhooks/{made.json()['data']['id']}", headers=client.headers).status_code == 200
            limited = create(client)
            assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED", limited.text
            assert int(limited.headers["Retry-After"]) >= 1
            assert create(other).status_code == 201  # another user's budget
            job = api.post("/jobs", json={"preset": "interior", "item_count": 1}, headers=client.headers)
            assert job.status_code == 201, job.text  # job creations have their own
    finally:
        container.close()


@pytest.fixture(scope="module")
def production_api(settings: Settings) -> Iterator[TestClient]:
    """The same API with PALETTE_ENV=production, in this process (the stack's runs development)."""
    container = build(settings.model_copy(update={"env": "production"}))
    try:
        with TestClient(create_app(container)) as test_client:
            yield test_client
    finally:
        container.close()


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/in", "https://localhost/in", "https://[::1]/in", "https://10.0.0.8/in",
    "https://192.168.0.1/in", "https://169.254.169.254/latest/meta-data/", "https://[::ffff:127.0.0.1]/in",
    "http://127.0.0.1/in",
])
def test_production_refuses_targets_that_are_not_public(production_api, client, url):
    r = production_api.post("/webhooks", json={"url": url, "events": ALL}, headers=client.headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("url: ")


def test_webhook_payloads_carry_no_presigned_links(client, receiver, webhooks):
    endpoint = register(client, receiver.url("/links"), ["job.queued"])
    queued_job(client)
    payload = verified(endpoint["secret"], receiver.wait("/links", 1)[0])
    assert "X-Amz-Signature" not in json.dumps(payload) and "items" not in payload["data"]


def test_the_log_of_the_webhooks_process_names_no_secret(client, receiver, webhooks, tmp_path_factory):
    endpoint = register(client, receiver.url("/quiet"), ["job.queued"])
    queued_job(client)
    receiver.wait("/quiet", 1)
    logs = [p.read_text() for p in Path(tmp_path_factory.getbasetemp()).glob("webhooks*/log")]
    assert logs and not any(endpoint["secret"] in text for text in logs)
