"""Bounded resources in the API: event streams per user, pool connections while waiting,
/health's cost, and the cost of a 200-item job's status."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from adapters.bootstrap import Container
from adapters.settings import Settings
from domain.contracts.callback import sign_callback
from domain.contracts.keys import output_key, preview_key
from infra.s3 import s3_client

from .conftest import Client

EDITS = {"wall": {"action": "tone", "value": "warm"}}


# -- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def served(container: Container) -> Iterator[str]:
    """The API of ``container`` under uvicorn in this process, on a free loopback port."""
    import uvicorn

    from adapters.api.app import create_asgi

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_asgi(container), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process API did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextlib.contextmanager
def served_client(settings: Settings) -> Iterator[tuple[str, Client]]:
    """An API of its own (its Idempotency-Key store patchable), the webhooks schema made, and a
    registered client of it."""
    from adapters.bootstrap import build
    from adapters.webhooks import store as webhooks

    container = build(settings, pool_size=2)
    with container.read_pool.connection() as conn:
        webhooks.ensure_schema(conn)  # the webhooks process makes it
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield url, Client(http)
    finally:
        container.close()


class CountingPool:
    """A connection pool that counts checkouts and the connections held at this moment."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.checkouts = 0
        self.held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with self.pool.connection(*args, **kwargs) as conn:
            with self._lock:
                self.checkouts += 1
                self.held += 1
            try:
                yield conn
            finally:
                with self._lock:
                    self.held -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def token_for(settings: Settings, user_id: UUID) -> dict[str, str]:
    from datetime import UTC, datetime

    from adapters.tokens import TokenIssuer

    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 600)
    return {"Authorization": f"Bearer {issuer.issue(user_id, datetime.now(UTC))}"}


@contextlib.contextmanager
def event_stream(http: httpx.Client, job_id: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
    with http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
        yield r


# -- event streams per user ---------------------------------------------------------------------
def test_a_user_holds_at_most_four_event_streams_and_a_closed_stream_frees_its_slot(
    client: Client, other: Client, api_url: str, settings: Settings
) -> None:
    cap = settings.sse_streams_per_user
    assert cap == 4
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    their_job = other.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    with httpx.Client(base_url=api_url, timeout=30) as http, contextlib.ExitStack() as streams:
        opened = [streams.enter_context(event_stream(http, job_id, client.headers)) for _ in range(cap)]
        assert [r.status_code for r in opened] == [200] * cap
        with event_stream(http, job_id, client.headers) as fifth:
            assert fifth.status_code == 429  # today: a fifth, sixth... stream, each polling every 200 ms
            fifth.read()
            assert fifth.json()["error"]["code"] == "RATE_LIMITED" and int(fifth.headers["Retry-After"]) >= 1
        with event_stream(http, their_job, other.headers) as theirs:
            assert theirs.status_code == 200  # the cap is per user
        opened[0].close()
        deadline = time.monotonic() + 10
        while True:
            with event_stream(http, job_id, client.headers) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "a closed stream never gave its slot back"
            time.sleep(0.05)


def test_a_stream_of_a_finished_job_ends_after_its_events_whatever_the_last_event_id(
    client: Client, api_url: str
) -> None:
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    client.data("POST", f"/jobs/{job_id}/cancel")
    with httpx.Client(base_url=api_url, timeout=10) as http:  # before: held open for SSE_MAX_S
        for last in ("0", "1"):
            with event_stream(http, job_id, {**client.headers, "Last-Event-ID": last}) as r:
                body = r.read().decode()
            assert r.status_code == 200 and "event: JobCanceled" in body, (last, body)
        # Nothing after it: a 204, which stops a browser's EventSource from reconnecting.
        with event_stream(http, job_id, {**client.headers, "Last-Event-ID": "999999"}) as r:
            assert r.status_code == 204 and r.read() == b""


def test_a_stream_told_of_a_version_past_its_job_still_ends_when_the_job_does(
    client: Client, api_url: str
) -> None:
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    with httpx.Client(base_url=api_url, timeout=10) as http, \
            event_stream(http, job_id, {**client.headers, "Last-Event-ID": str(10**18)}) as r:
        assert r.status_code == 200
        client.data("POST", f"/jobs/{job_id}/cancel")
        body = r.read().decode()  # before: nothing until SSE_MAX_S (a read timeout here)
    assert "event: JobCanceled" in body and "event: JobCreated" not in body, body


def test_idle_event_streams_hold_no_event_store_connection(client: Client, settings: Settings) -> None:
    """Eight idle streams on an event store pool of at most six connections: commands still run."""
    from adapters.bootstrap import build

    container = build(settings, pool_size=2)  # eventsourcing: 2 + 4 overflow connections
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=10) as http, \
                contextlib.ExitStack() as streams:
            users = [Client(http) for _ in range(2)]
            for user in users:
                job_id = user.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
                for _ in range(4):
                    assert streams.enter_context(event_stream(http, job_id, user.headers)).status_code == 200
            third = Client(http)
            assert third.data("GET", "/me")["credits"] == 50
            third.data("POST", "/rules", 201, json={"name": "r", "preset_id": "interior", "concepts": EDITS})
            assert len(third.data("GET", "/rules")["items"]) == 1
            third.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})
    finally:
        container.close()


# -- read-your-writes waits ---------------------------------------------------------------------
def test_read_your_writes_waits_hold_no_pool_connection(settings: Settings) -> None:
    """Four readers of GET /rules wait (5 s) for a write the read model never folds, on a pool of
    two: the pool serves everyone else meanwhile. GET /jobs does not wait at all: it answers at
    once and says how many of the caller's writes the model has not folded."""
    from adapters.bootstrap import build

    container = build(settings, pool_size=2)
    pool = CountingPool(container.read_pool)
    container.read_pool = pool
    slow = [uuid.uuid4() for _ in range(4)]
    for user_id in slow:
        container.last_writes.record(user_id, "rules", uuid.uuid4(), 10**9)  # never reached
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http, \
                ThreadPoolExecutor(len(slow)) as executor:
            checkouts_before = pool.checkouts
            waiting: list[Future[httpx.Response]] = [
                executor.submit(http.get, "/rules", headers=token_for(settings, u)) for u in slow]
            deadline = time.monotonic() + 15
            while pool.checkouts < checkouts_before + 2 * len(slow) and not any(f.done() for f in waiting):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert not any(f.done() for f in waiting), "the waiting readers were served one pool slot at a time"
            held = []
            for _ in range(50):
                held.append(pool.held)
                time.sleep(0.002)
            fast = http.get("/jobs", headers=token_for(settings, uuid.uuid4()))
            assert fast.status_code == 200, fast.text
            behind = uuid.uuid4()
            container.last_writes.record(behind, "jobs_log", uuid.uuid4(), 10**9)  # never folded
            unwaited = http.get("/jobs", headers=token_for(settings, behind))
            assert unwaited.status_code == 200 and unwaited.json()["meta"]["projection_behind"] == 1
            assert not any(f.done() for f in waiting)
            assert statistics.mean(held) < 1.5, held  # a connection only for each check (today: 2, always)
            assert [f.result().status_code for f in waiting] == [200] * len(slow)  # served after the wait
    finally:
        container.close()


def test_every_rule_write_is_one_the_callers_next_list_waits_for(apps: Any, settings: Settings) -> None:
    """GET /rules waits for the caller's recent rule writes: a rename or a deletion it did not
    remember would be listed as it was before, the projector not having folded it yet. Once a
    list has seen them folded (the projector running) they are forgotten."""
    from adapters.bootstrap import build

    container = build(settings, pool_size=2)
    try:
        with served(container) as url, httpx.Client(base_url=url, timeout=30) as http:
            user = Client(http)
            body = {"name": "r", "preset_id": "interior", "concepts": EDITS}
            rule = user.data("POST", "/rules", 201, json=body)["id"]

            def remembered() -> int | None:
                return container.last_writes.recent(UUID(user.user_id), "rules").get(UUID(rule))

            created = remembered()
            user.data("PUT", f"/rules/{rule}", json={"name": "renamed", "concepts": EDITS})
            renamed = remembered()
            user.data("DELETE", f"/rules/{rule}")
            deleted = remembered()
            assert created is not None and renamed is not None and deleted is not None
            assert created < renamed < deleted
            assert user.data("GET", "/rules")["items"] == []
            assert remembered() is None  # seen folded: later reads need not wait for it, nor memory hold it
    finally:
        container.close()


# -- /health -----------------------------------------------------------------------------------
def _sessions(settings: Settings) -> int:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def test_a_flood_of_health_checks_opens_no_database_connection_per_call(http: httpx.Client, api_url: str,
                                                                       settings: Settings) -> None:
    assert http.get("/health").status_code == 200
    before = _sessions(settings)  # this probe is one session itself
    for _ in range(30):
        assert http.get("/health").json()["data"]["dependencies"]["postgres"] == "ok"
    with ThreadPoolExecutor(8) as executor:
        statuses = list(executor.map(lambda _: httpx.get(f"{api_url}/health", timeout=30).status_code, range(40)))
    assert statuses == [200] * 40
    opened = _sessions(settings) - before - 1
    assert opened <= 3, f"{opened} new PostgreSQL sessions for 70 /health calls"


# -- GET /jobs/{id} of a finished 200-item job --------------------------------------------------
ITEMS = 200


def _signed(settings: Settings, job_id: str, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    ts, nonce = int(time.time()), uuid.uuid4().hex[:16]
    return raw, {"content-type": "application/json", "X-Palette-Timestamp": str(ts), "X-Palette-Nonce": nonce,
                 "X-Palette-Signature": sign_callback(settings.callback_secret, ts, job_id, raw, nonce)}


@pytest.fixture(scope="module")
def finished_200_item_job(apps: Any, api_url: str, settings: Settings) -> tuple[dict[str, str], str, dict[str, bytes]]:
    """A user with a done 200-item job; the bytes of a few outputs and previews by key."""
    from adapters.bootstrap import build

    with httpx.Client(base_url=api_url, timeout=30) as http:
        user = Client(http)
        container = build(settings, pool_size=1)
        try:
            container.service.grant_credits(UUID(user.user_id), ITEMS, "test: a 200-item job")
        finally:
            container.close()
        created = user.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": ITEMS})
        job_id = created["job_id"]
        s3 = s3_client(settings)
        for slot in created["upload"]:
            s3.put_object(Bucket=settings.s3_bucket, Key=slot["key"], Body=b"jpeg")
        user.data("POST", f"/jobs/{job_id}/confirm-upload")
        user.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
        objects: dict[str, bytes] = {}
        for idx in range(ITEMS):
            out, prev = (k(UUID(user.user_id), UUID(job_id), idx) for k in (output_key, preview_key))
            if idx in (0, 7, ITEMS - 1):
                for key in (out, prev):
                    objects[key] = f"{key} {uuid.uuid4()}".encode()
                    s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=objects[key])
            raw, headers = _signed(settings, job_id, {"idx": idx, "status": "done", "output_key": out,
                                                      "preview_key": prev, "idempotency_key": f"{job_id}:{idx}"})
            r = http.post(f"/jobs/{job_id}/callback", content=raw, headers=headers)
            assert r.status_code == 200, r.text
        return user.headers, job_id, objects


def test_a_finished_200_item_job_links_every_output_and_preview(
    api_url: str, finished_200_item_job: tuple[dict[str, str], str, dict[str, bytes]]
) -> None:
    headers, job_id, objects = finished_200_item_job
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as http:
        job = http.get(f"/jobs/{job_id}").json()["data"]
        assert job["status"] == "done" and job["progress"] == {"done": ITEMS, "failed": 0, "total": ITEMS}
        urls = {}
        for item in job["items"]:
            assert item["status"] == "done" and item["output_url"] and item["preview_url"], item
            urls[httpx.URL(item["output_url"]).path] = item["output_url"]
            urls[httpx.URL(item["preview_url"]).path] = item["preview_url"]
        assert len(urls) == 2 * ITEMS
        for key, content in objects.items():
            url = next(u for path, u in urls.items() if path.endswith("/" + key))
            got = httpx.get(url, timeout=30)
            assert got.status_code == 200 and got.content == content, (key, got.status_code, got.text[:200])
            tampered = url.replace("X-Amz-Expires=", "X-Amz-Expires=1")
            assert httpx.get(tampered, timeout=30).status_code == 403


def test_measure_the_status_of_a_finished_200_item_job(
    api_url: str, finished_200_item_job: tuple[dict[str, str], str, dict[str, bytes]]
) -> None:
    """Prints p50/p99 of GET /jobs/{id} over loopback (run with -s); asserts only the answers."""
    headers, job_id, _ = finished_200_item_job
    timings = []
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as http:
        for _ in range(10):  # warm-up
            assert http.get(f"/jobs/{job_id}").status_code == 200
        for _ in range(200):
            start = time.perf_counter()
            r = http.get(f"/jobs/{job_id}")
            timings.append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200
    timings.sort()
    p50, p99 = timings[len(timings) // 2], timings[int(len(timings) * 0.99) - 1]
    print(f"\nGET /jobs/{{id}} ({ITEMS} done items, {len(timings)} requests): p50 {p50:.1f} ms, p99 {p99:.1f} ms")


def test_the_api_answers_a_request_head_over_64_kb_with_a_431(api_url: str) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    pad = b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(300))  # 300 KB: several reads
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(b"GET /livez HTTP/1.1\r\nhost: x\r\n" + pad + b"\r\n")
        answer = conn.recv(100)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert httpx.get(f"{api_url}/livez").status_code == 200


def test_the_users_of_one_address_share_its_day_of_job_creations_and_of_rule_writes(settings: Settings) -> None:
    """A user costs one registration, and users never expire: with budgets per user only, one
    client address added a day's worth of jobs and rule writes for each user it had made. Here its
    users together get PALETTE_RATE_JOBS_PER_ADDRESS_PER_DAY of each (3), whoever asks."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    tight = settings.model_copy(update={"rate_jobs_per_address_per_day": 3})
    container = build(tight, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api:
            def user() -> dict[str, str]:
                r = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"})
                assert r.status_code == 201, r.text
                return {"Authorization": f"Bearer {r.json()['data']['token']}"}

            users = [user() for _ in range(4)]
            jobs = [api.post("/jobs", headers=h, json={"preset": "interior", "item_count": 1}).status_code
                    for h in users]
            rules = [api.post("/rules", headers=h, json={"name": "warm", "preset_id": "interior",
                                                         "concepts": EDITS}).status_code for h in users]
            refused = api.post("/jobs", headers=users[3], json={"preset": "interior", "item_count": 1})
    finally:
        container.close()
    assert jobs == [201, 201, 201, 429] and rules == [201, 201, 201, 429], (jobs, rules)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "RATE_LIMITED"


def test_a_rule_deletion_spends_its_address_day_as_any_rule_write(settings: Settings) -> None:
    """A deletion records an event on the rule's stream: of an address's day of 3 rule writes, a
    creation, its deletion and a creation leave none for a fourth write."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    tight = settings.model_copy(update={"rate_jobs_per_address_per_day": 3})
    container = build(tight, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api:
            r = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"})
            h = {"Authorization": f"Bearer {r.json()['data']['token']}"}
            body = {"name": "warm", "preset_id": "interior", "concepts": EDITS}
            first = api.post("/rules", headers=h, json=body)
            statuses = [first.status_code, api.delete(f"/rules/{first.json()['data']['id']}", headers=h).status_code,
                        api.post("/rules", headers=h, json=body).status_code,
                        api.post("/rules", headers=h, json=body).status_code]
    finally:
        container.close()
    assert statuses == [201, 200, 201, 429], statuses


def test_a_command_repeated_without_end_is_logged_once_not_once_a_request(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Executing a queued job again with the same edits, and deleting a deleted job again, answer
    as the first time and change nothing; each was logged as if it had queued or deleted the job,
    a line per request, neither limited: a client chose how much the API logged."""
    import logging

    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build
    from adapters.webhooks import store

    from .test_lifecycle import jpeg

    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)  # a deletion forgets the job's deliveries (the webhooks process makes it)
    container = build(settings, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api, caplog.at_level(logging.INFO, logger="palette.api"):
            r = api.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"})
            auth = {"Authorization": f"Bearer {r.json()['data']['token']}"}
            created = api.post("/jobs", headers=auth, json={"preset": "interior", "item_count": 1}).json()["data"]
            job_id = created["job_id"]
            [slot] = created["upload"]
            assert httpx.put(slot["url"], content=jpeg(), headers={"Content-Type": slot["content_type"]}).is_success
            assert api.post(f"/jobs/{job_id}/confirm-upload", headers=auth).status_code == 200
            for _ in range(5):
                r = api.post(f"/jobs/{job_id}/execute", headers=auth, json={"concepts": EDITS})
                assert r.status_code == 200 and r.json()["data"]["status"] == "queued", r.text
            assert api.post(f"/jobs/{job_id}/cancel", headers=auth).status_code == 200
            for _ in range(5):
                assert api.delete(f"/jobs/{job_id}", headers=auth).json()["data"] == {"deleted": True}
    finally:
        container.close()
    said = [r.getMessage() for r in caplog.records if r.name == "palette.api" and job_id in r.getMessage()]
    assert said == [f"job {job_id} queued", f"job {job_id} deleted"], said
