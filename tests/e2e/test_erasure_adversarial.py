"""Erasure and retention against a hostile client, an unlucky crash and an auditor, on the real
stack: what must be gone after DELETE /me is looked for where it would live (PostgreSQL's tables,
S3's listing, the analysts' API), and the sweeper is driven with a clock set ahead."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from adapters import retention
from adapters.bootstrap import build_sweeper, open_event_store
from adapters.keyring import request_erasure
from adapters.retention import LATE_UPLOADS_S
from adapters.webhooks import store as webhooks
from domain.contracts.keys import URL_TTL_S, output_key
from domain.contracts.personal import ERASED
from infra.s3 import s3_client
from projections.models.jobs_log import JOBS_LOG
from tests.integration.test_stack import wait_until
from tests.put_back import rows_refolded

from .conftest import Client
from .test_data_lifecycle import _objects
from .test_lifecycle import EDITS, callback, create_uploaded_job, jpeg
from .test_staff_roles import staff_headers

RULE_NAME = "Grandma's living room, 12 Rue des Lilas"


def _db(settings) -> psycopg.Connection:  # type: ignore[no-untyped-def]
    return psycopg.connect(settings.effective_database_url, autocommit=True)


def _ahead(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _sweep(settings, now: datetime | None = None) -> None:  # type: ignore[no-untyped-def]
    """One sweeper pass (at ``now``), with a sweeper of its own."""
    sweeper = build_sweeper(settings)
    try:
        sweeper.step(now=now)
    finally:
        sweeper.close()


def _completed(settings, user_id: str) -> bool:  # type: ignore[no-untyped-def]
    with _db(settings) as conn:
        row = conn.execute("SELECT completed_at FROM palette_erasures WHERE user_id = %s", [user_id]).fetchone()
    return row is not None and row[0] is not None


def test_an_idempotent_answer_kept_before_the_erasure_neither_replays_nor_stays_stored(client, settings):
    """The answer to a keyed POST /rules holds the rule's name in clear: after DELETE /me the
    token must get a 401, not that answer again, and no table may still hold the name."""
    keyed = {"Idempotency-Key": "rule-1"}
    body = {"name": RULE_NAME, "preset_id": "interior", "concepts": EDITS}
    assert client.data("POST", "/rules", 201, json=body, headers=keyed)["name"] == RULE_NAME
    client.data("DELETE", "/me")

    again = client.call("POST", "/rules", json=body, headers=keyed)
    assert again.status_code == 401 and RULE_NAME not in again.text
    with _db(settings) as conn:
        kept = conn.execute("SELECT count(*) FROM palette_api.idempotency WHERE "
                            "position(%s in convert_from(body, 'UTF8')) > 0", [RULE_NAME]).fetchone()
    assert kept == (0,)


def test_a_photo_put_through_a_link_issued_before_the_erasure_is_swept_once_the_link_has_expired(http, settings):
    """Upload links live URL_TTL_S: one handed out just before DELETE /me still works after the
    erasure deleted everything. The sweeper must not settle the user before every such link has
    expired, and then it must delete what came through."""
    client = Client(http)
    created = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})
    link = created["upload"][0]
    client.data("DELETE", "/me")
    sweeper = build_sweeper(settings)
    try:
        sweeper.step(now=_ahead(URL_TTL_S - 60))  # the link still works
        late = httpx.put(link["url"], content=jpeg(), headers={"Content-Type": link["content_type"]})
        assert late.status_code == 200
        assert _objects(settings, client.user_id)
        sweeper.step(now=_ahead(URL_TTL_S + LATE_UPLOADS_S + 60))  # every link has expired by now
    finally:
        sweeper.close()
    assert _objects(settings, client.user_id) == set()


def test_a_webhook_endpoint_or_kept_answer_written_by_a_request_in_flight_during_the_erasure_is_swept(
        http, settings):
    """POST /webhooks checks the token, then resolves the URL (as long as the client's DNS makes it
    take), then inserts: a DELETE /me in between deletes the user's endpoints before the insert.
    The sweeper's second look after an erasure deletes what such a request left behind."""
    client = Client(http)
    client.data("DELETE", "/me")
    user_id = uuid.UUID(client.user_id)
    with _db(settings) as conn:  # what the request in flight writes once the erasure is done
        webhooks.create_endpoint(conn, user_id, "http://127.0.0.1:9/grandma-hook", ["job.finished"], "whsec_x", 10)
        conn.execute("INSERT INTO palette_api.idempotency (scope, key, request_hash, status, body) "
                     "VALUES (%s, 'late', 'h', 201, %s)", [f"user:{user_id}", RULE_NAME.encode()])
    _sweep(settings, now=_ahead(LATE_UPLOADS_S + URL_TTL_S + 60))
    with _db(settings) as conn:
        assert webhooks.list_endpoints(conn, user_id) == []
        assert conn.execute("SELECT count(*) FROM palette_api.idempotency WHERE scope = %s",
                            [f"user:{user_id}"]).fetchone() == (0,)


def test_one_pass_sweeps_every_settled_erasure_and_deletion_not_one_page_of_them(http, settings, monkeypatch):
    """A pass every hour that takes PAGE erasures and PAGE deletions falls behind for good once
    more arrive per hour (200 jobs a minute, a few percent deleted, is more): a pass takes all
    that settled. Shown with pages of one."""
    monkeypatch.setattr(retention, "PAGE", 1)
    late: dict[str, str] = {}
    for _ in range(2):
        gone = Client(http)
        job_id = create_uploaded_job(gone, 1)
        gone.data("DELETE", "/me")
        late[gone.user_id] = output_key(uuid.UUID(gone.user_id), uuid.UUID(job_id), 0)
    kept = Client(http)
    for _ in range(2):
        job_id = create_uploaded_job(kept, 1)
        kept.data("POST", f"/jobs/{job_id}/cancel")
        kept.data("DELETE", f"/jobs/{job_id}")
        late[job_id] = output_key(uuid.UUID(kept.user_id), uuid.UUID(job_id), 0)
    s3 = s3_client(settings)
    for key in late.values():  # what workers still busy with the items upload afterwards
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"late")
    _sweep(settings, now=_ahead(LATE_UPLOADS_S + URL_TTL_S + 3600))
    left = {k for user in (*late, kept.user_id) for k in _objects(settings, user)}
    assert not left & set(late.values())


def test_an_erasure_that_keeps_failing_does_not_stop_the_others_nor_the_rest_of_the_pass(http, settings,
                                                                                          monkeypatch):
    """Two erasures cut short by a crash; finishing the first fails (S3 refusing, say) every time.
    The second is finished all the same, and the pass goes on to its late-upload sweep."""
    stuck, cut_short = Client(http), Client(http)
    with _db(settings) as conn:
        request_erasure(conn, uuid.UUID(stuck.user_id))  # the crash: a tombstone and nothing else
    with _db(settings) as conn:
        request_erasure(conn, uuid.UUID(cut_short.user_id))
    real_erase = retention.erase

    def erase(service, pool, s3, bucket, user_id, must_exist=True):  # type: ignore[no-untyped-def]
        if str(user_id) == stuck.user_id:
            raise RuntimeError("the object store refuses (injected)")
        return real_erase(service, pool, s3, bucket, user_id, must_exist)

    monkeypatch.setattr(retention, "erase", erase)
    _sweep(settings)
    assert _completed(settings, cut_short.user_id)
    assert not _completed(settings, stuck.user_id)  # left for the next pass, which finishes it
    monkeypatch.setattr(retention, "erase", real_erase)
    _sweep(settings)
    assert _completed(settings, stuck.user_id)


def test_photos_of_a_job_never_executed_nor_canceled_are_deleted_after_the_retention_period(client, settings):
    """A job created, its photos uploaded, then abandoned, never finishes: retention counted only
    from a finish would keep its photos for ever. Past the retention period (counted from its
    creation) it is canceled, refunded, and its photos deleted."""
    job_id = create_uploaded_job(client, 2)
    credits = client.data("GET", "/me")["credits"]
    wait_until(lambda: client.data("GET", f"/jobs/{job_id}")["status"] == "uploaded", what="the upload confirmed")
    with _db(settings) as conn:
        wait_until(lambda: conn.execute("SELECT 1 FROM palette_read.jobs_log WHERE id = %s", [job_id]).fetchone(),
                   what="the job folded into jobs_log")
    assert any(job_id in k for k in _objects(settings, client.user_id))
    _sweep(settings, now=_ahead(settings.retention_days * 86400 + 3600))
    assert not any(job_id in k for k in _objects(settings, client.user_id))
    assert client.data("GET", f"/jobs/{job_id}")["status"] == "canceled"
    assert client.data("GET", "/me")["credits"] == credits + 2


def test_a_running_job_whose_row_still_says_uploaded_keeps_its_photos_past_the_retention_period(client, settings):
    """jobs_log lags the log (its projector behind): a job executed since, its row still
    'uploaded', is read again from its own events before the sweeper cancels it, so a live job
    is neither canceled nor stripped of its photos."""
    job_id = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    with _db(settings) as conn:
        def folded() -> str | None:
            row = conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s", [job_id]).fetchone()
            return row[0] if row and row[0] not in ("created", "uploaded") else None
        wait_until(folded, what="the execution folded into jobs_log")
        with contextlib.closing(open_event_store(settings)) as app, rows_refolded(conn, app, JOBS_LOG, [job_id]):
            conn.execute("UPDATE palette_read.jobs_log SET status = 'uploaded' WHERE id = %s", [job_id])
            _sweep(settings, now=_ahead(settings.retention_days * 86400 + 3600))
    assert client.data("GET", f"/jobs/{job_id}")["status"] not in ("canceled", "uploaded")
    assert any(job_id in k for k in _objects(settings, client.user_id))


@pytest.mark.parametrize("meanwhile", ["executed", "executed, an item done, canceled"])
def test_a_job_started_while_the_sweeper_decides_to_cancel_it_for_retention_keeps_its_photos(
        client, http, settings, monkeypatch, meanwhile):
    """The sweeper reads a job uploaded a retention period ago and never executed, then cancels
    it; the client executes it in between (and may have an item done and cancel it: a paid job).
    The sweep's cancel must find it started and leave it: a live job is not canceled, nor are a
    live or paid job's photos deleted (nor its ObjectsExpired recorded before its time)."""
    job_id = create_uploaded_job(client, 2)
    with _db(settings) as conn:
        wait_until(lambda: conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s",
                                        [job_id]).fetchone() == ("uploaded",), what="the job folded as uploaded")
    sweeper = build_sweeper(settings)
    executor = sweeper.container.service.executor
    read, started = executor.read, []

    def read_then_started(aggregate_id):  # type: ignore[no-untyped-def]
        aggregate = read(aggregate_id)
        if str(aggregate_id) == job_id and not started:  # what the sweeper decides on, stale at once
            started.append(client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS}))
            if meanwhile != "executed":
                assert callback(http, settings.callback_secret, job_id, {
                    "idx": 0, "status": "done", "idempotency_key": f"{job_id}:0"}).status_code == 200
                client.data("POST", f"/jobs/{job_id}/cancel")
        return aggregate

    monkeypatch.setattr(executor, "read", read_then_started)
    try:
        sweeper.step(now=_ahead(settings.retention_days * 86400 + 3600))
    finally:
        sweeper.close()
    job = client.data("GET", f"/jobs/{job_id}")
    assert started and job["status"] == ("queued" if meanwhile == "executed" else "canceled"), job
    assert any(job_id in k for k in _objects(settings, client.user_id))
    with _db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM palette_events WHERE originator_id = %s AND topic LIKE %s",
                            [job_id, "%.ObjectsExpired"]).fetchone() == (0,)


def test_an_abandoned_job_whose_objects_cannot_be_deleted_now_does_not_end_the_sweep(client, other, settings,
                                                                                    monkeypatch):
    """S3 failing for one abandoned job's objects ended the whole pass (the other abandoned jobs,
    the unpaid pass, erasures, late uploads) till the next; it is logged and the pass goes on."""
    failing, fine = create_uploaded_job(client, 1), create_uploaded_job(other, 1)  # a job at once each
    with _db(settings) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM palette_read.jobs_log WHERE id = ANY(%s) AND "
                                        "status = 'uploaded'", [[failing, fine]]).fetchone() == (2,),
                   what="both jobs folded as uploaded")
    delete = retention.delete_prefixes

    def delete_failing_for_one(s3, bucket, prefixes):  # type: ignore[no-untyped-def]
        if any(failing in p for p in prefixes):
            raise OSError("the store is unreachable")
        return delete(s3, bucket, prefixes)

    monkeypatch.setattr(retention, "delete_prefixes", delete_failing_for_one)
    _sweep(settings, now=_ahead(settings.retention_days * 86400 + 3600))
    assert client.data("GET", f"/jobs/{failing}")["status"] == other.data("GET", f"/jobs/{fine}")["status"] == \
        "canceled"
    assert any(failing in k for k in _objects(settings, client.user_id)) and not _objects(settings, other.user_id)


def test_the_analysts_api_shows_an_erased_users_fields_as_erased(http, settings):
    client = Client(http)
    rule = client.data("POST", "/rules", 201, json={"name": RULE_NAME, "preset_id": "interior", "concepts": EDITS})
    client.data("DELETE", "/me")
    analyst = staff_headers(settings, "analyst")
    state = http.get(f"/streams/{rule['id']}/state", params={"version": 1}, headers=analyst)
    events = http.get(f"/streams/{client.user_id}/events", headers=analyst)
    assert state.status_code == 200 and events.status_code == 200
    assert state.json()["data"]["state"]["name"] == ERASED
    registered = json.loads(events.text.splitlines()[0])
    assert registered["type"] == "Registered" and registered["data"]["device_key"] == ERASED


def _user(http: httpx.Client, device: str) -> Client:
    r = http.post("/auth/anon", json={"device_hash": device})
    assert r.status_code in (200, 201), r.text
    client = Client.__new__(Client)
    client.http, client.token, client.user_id = http, r.json()["data"]["token"], r.json()["data"]["user_id"]
    client.headers = {"Authorization": f"Bearer {client.token}"}
    return client


def test_every_route_refuses_an_erased_users_token(client, settings):
    job_id = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{job_id}/cancel")
    rule_id = client.data("POST", "/rules", 201, json={"name": RULE_NAME, "preset_id": "interior",
                                                       "concepts": EDITS})["id"]
    hook_id = client.data("POST", "/webhooks", 201,
                          json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]})["id"]
    client.data("DELETE", "/me")
    routes = [("GET", "/me"), ("DELETE", "/me"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{job_id}"),
              ("DELETE", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/execute"), ("POST", f"/jobs/{job_id}/rerun"),
              ("POST", f"/jobs/{job_id}/cancel"), ("POST", f"/jobs/{job_id}/confirm-upload"),
              ("GET", f"/jobs/{job_id}/events"), ("GET", "/rules"), ("POST", "/rules"), ("PUT", f"/rules/{rule_id}"),
              ("DELETE", f"/rules/{rule_id}"), ("GET", "/webhooks"), ("POST", "/webhooks"),
              ("GET", f"/webhooks/{hook_id}"), ("DELETE", f"/webhooks/{hook_id}"),
              ("POST", f"/webhooks/{hook_id}/rotate-secret"), ("POST", f"/webhooks/{hook_id}/enable"),
              ("GET", f"/webhooks/{hook_id}/deliveries"), ("GET", "/presets")]
    answers = {(m, p): client.call(m, p, json={}, headers={"Idempotency-Key": f"k-{m}-{p}"}) for m, p in routes}
    assert {k: r.status_code for k, r in answers.items() if r.status_code != 401} == {}
    assert all(RULE_NAME not in r.text for r in answers.values())


@pytest.mark.parametrize("attempt", range(3))
def test_erasure_racing_everything_the_user_can_do_leaves_nothing_running_and_nothing_broken(http, settings, attempt):
    """DELETE /me twice, while the same token creates jobs and rules and webhooks, the GPU
    reports results for its running job and the same device registers: no 5xx, and once it is all
    over the user is erased with no job left unfinished nor any credit held."""
    from concurrent.futures import ThreadPoolExecutor

    from adapters.bootstrap import open_event_store
    from domain.job import Job
    from domain.user import User

    from .test_lifecycle import callback

    device = f"device-{uuid.uuid4().hex}"
    client = _user(http, device)
    running = create_uploaded_job(client, 2)
    client.data("POST", f"/jobs/{running}/execute", json={"concepts": EDITS})

    def call(method: str, path: str, **kw):  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            return own.request(method, path, headers={**client.headers, **kw.pop("headers", {})}, **kw)

    def report(idx: int):  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            return callback(own, settings.callback_secret, running, {
                "idx": idx, "status": "failed", "error": "x", "idempotency_key": f"{running}:{idx}"})

    def register():  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            return own.post("/auth/anon", json={"device_hash": device})

    tasks = [lambda: call("DELETE", "/me"), lambda: call("DELETE", "/me"),
             lambda: call("POST", "/jobs", json={"preset": "interior", "item_count": 1}),
             lambda: call("POST", "/jobs", json={"preset": "interior", "item_count": 1}),
             lambda: call("POST", "/rules", json={"name": RULE_NAME, "preset_id": "interior", "concepts": EDITS}),
             lambda: call("POST", "/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]}),
             lambda: report(0), lambda: report(1), register]
    with ThreadPoolExecutor(len(tasks)) as pool:
        answers = [f.result() for f in [pool.submit(t) for t in tasks]]
    assert [(r.request.method, r.request.url.path, r.status_code, r.text[:200]) for r in answers
            if r.status_code >= 500] == []
    if not any(r.request.method == "DELETE" and r.status_code == 200 for r in answers[:2]):
        client.data("DELETE", "/me")  # both DELETEs lost to each other's refusal: the user asks again
    created = [r.json()["data"]["job_id"] for r in answers[2:4] if r.status_code == 201]
    app = open_event_store(settings)
    try:
        user = app.repository.get(uuid.UUID(client.user_id))
        assert isinstance(user, User) and user.erased and user.reservations == {}
        for job_id in (running, *created):
            job = app.repository.get(uuid.UUID(job_id))
            assert isinstance(job, Job) and job.status.terminal, (job_id, job.status)
    finally:
        app.close()
    _sweep(settings, now=_ahead(LATE_UPLOADS_S + 3600))  # what a request in flight left after the erasure
    with _db(settings) as conn:
        assert webhooks.list_endpoints(conn, uuid.UUID(client.user_id)) == []
    assert _completed(settings, client.user_id) and _objects(settings, client.user_id) == set()
    again = http.post("/auth/anon", json={"device_hash": device})
    assert again.status_code in (200, 201) and again.json()["data"]["user_id"] != client.user_id


def test_a_device_erased_by_the_operator_registers_anew_through_the_api(http, settings, monkeypatch, capsys):
    from adapters import cli

    device = f"device-{uuid.uuid4().hex}"
    first = _user(http, device)
    assert _user(http, device).user_id == first.user_id  # the API process has the user's key cached now
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    assert cli.main(["admin", "erase", first.user_id]) == 0
    capsys.readouterr()
    again = http.post("/auth/anon", json={"device_hash": device})
    assert again.status_code == 201, again.text
    assert again.json()["data"]["user_id"] != first.user_id


def test_a_pass_with_no_job_deleted_lately_does_not_read_the_whole_log_again_next_time(client, settings):
    """The late-deletion sweep looks for JobDeleted after a cursor: a cursor that moves only when
    it finds one makes every pass read the log from there to its end — all of it, hourly, on a
    stack where nobody deletes jobs. After a pass it stands at the log's head."""
    from adapters.bootstrap import open_event_store

    client.data("POST", "/rules", 201, json={"name": "x", "preset_id": "interior", "concepts": EDITS})
    app = open_event_store(settings)
    try:
        head = app.recorder.max_notification_id()
    finally:
        app.close()
    _sweep(settings, now=_ahead(LATE_UPLOADS_S + 3600))  # every JobDeleted so far has settled
    with _db(settings) as conn:
        position = conn.execute("SELECT position FROM palette_sweeps WHERE name = 'late-deletions'").fetchone()
    assert position is not None and position[0] >= head


def test_a_new_device_registering_many_times_at_once_gets_one_user_and_no_error(http):
    """A phone retrying its first /auth/anon: every request makes the user's data key at once
    (one INSERT ... ON CONFLICT DO NOTHING each); the losers must then find the winner's key."""
    from concurrent.futures import ThreadPoolExecutor

    device = f"device-{uuid.uuid4().hex}"

    def register() -> httpx.Response:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            return own.post("/auth/anon", json={"device_hash": device})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: register(), range(8)))
    assert [(r.status_code, r.text[:200]) for r in answers if r.status_code not in (200, 201)] == []
    assert len({r.json()["data"]["user_id"] for r in answers}) == 1


def test_a_users_first_key_made_by_many_processes_at_once_is_one_key_for_all(settings):
    """The keyring itself, as several API processes call it for users new to all of them: the
    INSERT ... ON CONFLICT DO NOTHING that loses waits for the winner, and the SELECT in the same
    statement, on the snapshot from before, found nothing — KeyDestroyed for a live user (53 of
    300 users before the fix)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from psycopg_pool import ConnectionPool

    from adapters.keyring import PgKeyring
    from adapters.keyring import ensure_schema as ensure_keyring

    with ConnectionPool(settings.effective_database_url, min_size=8, max_size=8,
                        kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            ensure_keyring(conn)
        keyring = PgKeyring(pool, settings.device_key_secret)
        for _ in range(100):
            user_id, ready = uuid.uuid4(), Barrier(8, timeout=30)

            def make(user_id: uuid.UUID = user_id, ready: Barrier = ready) -> bytes:
                ready.wait()
                return keyring.key_for(user_id)

            with ThreadPoolExecutor(8) as threads:
                keys = [f.result() for f in [threads.submit(make) for _ in range(8)]]
            assert len(set(keys)) == 1


class Crash(Exception):
    """The process dies here (injected)."""


CRASH_POINTS = ("recording Erased", "destroying the key", "deleting webhooks and kept answers",
                "deleting objects", "marking the tombstone complete")


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_an_erasure_cut_short_at_any_step_refuses_the_token_and_is_finished_by_the_sweeper(
        http, settings, monkeypatch, crash):
    from adapters import bootstrap, erasure
    from adapters import keyring as keyring_module
    from adapters.bootstrap import open_event_store
    from domain.user import User

    client = Client(http)
    create_uploaded_job(client, 1)
    client.data("POST", "/rules", 201, json={"name": RULE_NAME, "preset_id": "interior", "concepts": EDITS},
                headers={"Idempotency-Key": "r"})
    client.data("POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/h", "events": ["job.finished"]})
    user_id = uuid.UUID(client.user_id)

    def boom(*_: object, **__: object) -> None:
        raise Crash(crash)

    container = bootstrap.build(settings, pool_size=2)
    try:
        with monkeypatch.context() as m:
            target = {"recording Erased": (container.service, "erase_user"),
                      "destroying the key": (container.service.sealer, "forget"),
                      "deleting webhooks and kept answers": (erasure, "forget_user_data"),
                      "deleting objects": (erasure, "delete_prefixes"),
                      "marking the tombstone complete": (keyring_module, "complete_erasure")}[crash]
            m.setattr(*target, boom)
            with pytest.raises(Crash):
                erasure.erase(container.service, container.read_pool, container.s3, settings.s3_bucket, user_id)
    finally:
        container.close()
    wait_until(lambda: client.call("GET", "/me").status_code == 401, timeout_s=10,
               what="the API to refuse the token from the tombstone")
    assert not _completed(settings, client.user_id)

    sweeper = build_sweeper(settings)
    try:
        assert sweeper.step().erasures_finished >= 1
    finally:
        sweeper.close()
    assert _completed(settings, client.user_id) and _objects(settings, client.user_id) == set()
    with _db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM palette_user_keys WHERE user_id = %s", [user_id]).fetchone() == (0,)
        assert webhooks.list_endpoints(conn, user_id) == []
        assert conn.execute("SELECT count(*) FROM palette_api.idempotency WHERE scope = %s",
                            [f"user:{user_id}"]).fetchone() == (0,)
    app = open_event_store(settings)
    try:
        user = app.repository.get(user_id)
        assert isinstance(user, User) and user.erased and user.reservations == {}
    finally:
        app.close()
