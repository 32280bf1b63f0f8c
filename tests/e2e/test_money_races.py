"""Races between requests on the money path, through one API process and through two on one port
(each with its own group committer and cache, so a conflict is decided again from the store):
executes, cancels, GPU results, reruns, erasures, deletions and keyed creations of one user, many
in flight at once, round after round.

The oracle does not fold the events as the code does: it counts what each HTTP answer said it did
(a result ``recorded`` as done is a credit spent) and the ledger's rows (``billing_events``), holds
them to each other and to /me and the job's items, and waits for the read models (users,
jobs_log, job_items_log) to say what the write side answered."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from domain.contracts.callback import sign_callback
from infra.stack import EmbeddedStack
from tests.waiting import wait_until

from .conftest import Client
from .test_api_workers import _serve_api
from .test_lifecycle import EDITS, create_uploaded_job

ROUNDS = 2  # each race run again: an interleaving one round misses, the next may meet
START = 50  # the free plan's sign-up credits


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-processes"])
def url(request: pytest.FixtureRequest, apps: EmbeddedStack, api_url: str) -> Iterator[str]:
    if request.param == 1:
        yield api_url
        return
    proc, url = _serve_api(apps, 2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Each call on a connection of its own (either process), all released together."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        gate.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, c) for c in calls]]


def request(url: str, client: Client, method: str, path: str, **kw: Any) -> Callable[[], httpx.Response]:
    def call() -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as own:
            return own.request(method, path, headers={**client.headers, **kw.get("headers", {})},
                               **{k: v for k, v in kw.items() if k != "headers"})
    return call


def report(url: str, secret: str, job_id: str, idx: int, status: str, key: str | None = None
           ) -> Callable[[], httpx.Response]:
    body: dict[str, Any] = {"idx": idx, "status": status, "idempotency_key": key or f"{job_id}:{idx}"}
    if status == "failed":
        body["error"] = "x"

    def call() -> httpx.Response:
        raw = json.dumps(body).encode()
        ts, nonce = int(time.time()), uuid.uuid4().hex
        with httpx.Client(base_url=url, timeout=60) as own:
            return own.post(f"/jobs/{job_id}/callback", content=raw, headers={
                "content-type": "application/json", "X-Palette-Timestamp": str(ts), "X-Palette-Nonce": nonce,
                "X-Palette-Signature": sign_callback(secret, ts, job_id, raw, nonce)})
    return call


def no_5xx(answers: list[httpx.Response]) -> None:
    assert [(r.request.url.path, r.status_code, r.text[:300]) for r in answers if r.status_code >= 500] == []
    for r in answers:
        if r.status_code >= 400:
            assert r.json()["error"]["code"], r.text


def code(r: httpx.Response) -> str:
    return "ok" if r.status_code < 300 else str(r.json()["error"]["code"])


def ledger(settings: Any, user_id: str) -> list[tuple[str, int, int, str]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            "SELECT type, amount, balance_delta, ref FROM palette_read.billing_events WHERE user_id = %s "
            "ORDER BY seq", [user_id]).fetchall()]


def check_money(url: str, settings: Any, client: Client, spent_by_job: dict[str, int | None]) -> None:
    """/me and the ledger agree with what the answers said: each job reserved once, settled at most
    once, its spend the results recorded as done (None: not known from the answers)."""
    with httpx.Client(base_url=url, timeout=30, headers=client.headers) as http:
        me = http.get("/me").json()["data"]
        jobs = {j: http.get(f"/jobs/{j}").json()["data"] for j in spent_by_job}
    assert me["credits"] >= 0 and me["reserved"] >= 0
    for job in jobs.values():
        items = Counter(i["status"] for i in job["items"])
        assert job["progress"] == {"done": items["done"], "failed": items["failed"], "total": len(job["items"])}
        if job["status"] in ("done", "failed"):
            assert items["pending"] == 0 and job["status"] == ("done" if items["done"] else "failed"), job
    settled = {j for j, job in jobs.items() if job["status"] in ("done", "failed", "canceled")}
    expected_credits = START - sum(jobs[j]["progress"]["done"] if j in settled else jobs[j]["progress"]["total"]
                                   for j in jobs)
    assert (me["credits"], me["active_jobs"]) == (expected_credits, len(jobs) - len(settled)), (me, jobs)

    def folded() -> list[tuple[str, int, int, str]] | None:
        rows = ledger(settings, client.user_id)
        return rows if sum(r[2] for r in rows) == me["credits"] and len(
            [r for r in rows if r[0] == "reserve"]) == len(jobs) else None

    rows = wait_until(folded, timeout_s=30, what="the ledger to fold the user's events")
    assert sum(r[2] for r in rows) == me["credits"] >= 0
    for job_id, job in jobs.items():
        mine = Counter(r[0] for r in rows if r[3] == job_id)
        amounts = {r[0]: r[1] for r in rows if r[3] == job_id}
        assert mine["reserve"] == 1 and mine["spend"] <= 1 and mine["refund"] <= 1, (job_id, rows)
        assert amounts["reserve"] == job["progress"]["total"]
        if job_id in settled:
            assert amounts.get("spend", 0) == job["progress"]["done"], (job_id, rows, job)
            assert amounts.get("spend", 0) + amounts.get("refund", 0) == amounts["reserve"]
            if spent_by_job[job_id] is not None:
                assert amounts.get("spend", 0) == spent_by_job[job_id], (job_id, rows, job)
        else:
            assert mine["spend"] == mine["refund"] == 0
    converged(settings, client.user_id, me, jobs)


def converged(settings: Any, user_id: str, me: dict[str, Any], jobs: dict[str, dict[str, Any]]) -> None:
    """The users, jobs_log and job_items_log rows come to say what the write side answered."""
    want_user = (me["credits"], me["reserved"])
    want_jobs = {j: (job["status"], job["progress"]["done"], job["progress"]["failed"]) for j, job in jobs.items()}
    want_items = {(j, i["idx"]): i["status"] for j, job in jobs.items() for i in job["items"]}

    def seen() -> tuple[Any, ...]:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            user = conn.execute("SELECT credits, reserved FROM palette_read.users WHERE id = %s", [user_id]).fetchone()
            rows = {str(r[0]): (r[1], r[2], r[3]) for r in conn.execute(
                "SELECT id, status, done_items, failed_items FROM palette_read.jobs_log WHERE user_id = %s",
                [user_id]).fetchall()}
            items = {(str(r[0]), r[1]): r[2] for r in conn.execute(
                "SELECT job_id, idx, status FROM palette_read.job_items_log WHERE job_id = ANY(%s::uuid[])",
                [list(jobs)]).fetchall()}
        return tuple(user or ()), rows, items

    try:
        wait_until(lambda: seen() == (want_user, want_jobs, want_items), timeout_s=30, what="the read models")
    except AssertionError:
        assert seen() == (want_user, want_jobs, want_items)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_executes_cancels_and_results_at_once_spend_only_what_was_recorded_done(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 4)
    other_edits = {"wall": {"action": "tone", "value": "warm"}}
    answers = at_once([
        request(url, client, "POST", f"/jobs/{job}/execute", json={"concepts": EDITS}),
        request(url, client, "POST", f"/jobs/{job}/execute", json={"concepts": EDITS}),
        request(url, client, "POST", f"/jobs/{job}/execute", json={"concepts": other_edits}),
        *[report(url, settings.callback_secret, job, i, "done") for i in range(4)],
        request(url, client, "POST", f"/jobs/{job}/cancel"),
        request(url, client, "POST", f"/jobs/{job}/cancel"),
    ])
    no_5xx(answers)
    executes, results, cancels = answers[:3], answers[3:7], answers[7:]
    assert {code(r) for r in executes} <= {"ok", "INVALID_STATE"}
    assert {code(r) for r in cancels} <= {"ok", "INVALID_STATE"}
    recorded_done = sum(1 for r in results if r.status_code == 200 and r.json()["data"]["outcome"] == "recorded")
    assert {code(r) for r in results} <= {"ok", "INVALID_STATE"}
    check_money(url, settings, client, {job: recorded_done})


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_result_replayed_at_once_or_with_another_outcome_is_recorded_once(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 2)
        client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    answers = at_once([report(url, settings.callback_secret, job, 0, s) for s in ["done"] * 6 + ["failed"] * 6]
                      + [report(url, settings.callback_secret, job, 0, "failed", key=f"other-{n}") for n in range(4)])
    no_5xx(answers)
    outcomes = Counter(r.json()["data"]["outcome"] for r in answers)
    assert outcomes["recorded"] == 1, outcomes
    won = next(r for r in answers if r.json()["data"]["outcome"] == "recorded").json()["data"]["item_status"]
    assert {r.json()["data"]["item_status"] for r in answers} == {won}
    last = at_once([report(url, settings.callback_secret, job, 1, "failed")] * 4)
    no_5xx(last)
    assert Counter(r.json()["data"]["outcome"] for r in last) == {"recorded": 1, "duplicate": 3}
    check_money(url, settings, client, {job: 1 if won == "done" else 0})


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_reruns_racing_the_sources_last_results_make_at_most_one_job(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 2)
        client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    key = uuid.uuid4().hex
    answers = at_once([
        report(url, settings.callback_secret, job, 0, "failed"), report(url, settings.callback_secret, job, 1, "done"),
        *[request(url, client, "POST", f"/jobs/{job}/rerun") for _ in range(2)],
        *[request(url, client, "POST", f"/jobs/{job}/rerun", headers={"Idempotency-Key": key}) for _ in range(3)],
    ])
    no_5xx(answers)
    assert {code(r) for r in answers[2:]} <= {"ok", "INVALID_STATE", "CONCURRENCY_LIMIT", "CONFLICT"}, [
        r.text for r in answers[2:]]
    made = {r.json()["data"]["job_id"] for r in answers[2:] if r.status_code == 201}
    assert len(made) <= 1  # the free plan runs one job at once
    check_money(url, settings, client, {job: 1, **dict.fromkeys(made)})


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_keyed_creations_at_once_make_one_job_and_reserve_once(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
    key = uuid.uuid4().hex
    same = {"preset": "interior", "item_count": 30}
    answers = at_once([request(url, client, "POST", "/jobs", json=same, headers={"Idempotency-Key": key})
                       for _ in range(6)]
                      + [request(url, client, "POST", "/jobs", json={"preset": "interior", "item_count": 31},
                                 headers={"Idempotency-Key": key}) for _ in range(3)]
                      + [request(url, client, "POST", "/jobs", json={"preset": "interior", "item_count": 30})
                         for _ in range(3)])
    no_5xx(answers)
    assert {code(r) for r in answers} <= {"ok", "CONFLICT", "VALIDATION_FAILED", "CONCURRENCY_LIMIT",
                                          "INSUFFICIENT_CREDITS", "INVALID_STATE"}, [r.text for r in answers]
    made = {r.json()["data"]["job_id"] for r in answers if r.status_code == 201}
    assert len(made) == 1, [r.text for r in answers]
    check_money(url, settings, client, dict.fromkeys(made))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_an_erasure_racing_execute_cancel_results_and_a_rerun_settles_the_job_once(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 3)
    answers = at_once([
        request(url, client, "DELETE", "/me"), request(url, client, "DELETE", "/me"),
        request(url, client, "POST", f"/jobs/{job}/execute", json={"concepts": EDITS}),
        request(url, client, "POST", f"/jobs/{job}/cancel"),
        *[report(url, settings.callback_secret, job, i, "done") for i in range(3)],
        request(url, client, "POST", f"/jobs/{job}/rerun"),
        request(url, client, "GET", "/me"),
    ])
    no_5xx(answers)
    for r in answers[2:]:
        assert code(r) in {"ok", "INVALID_STATE", "AUTH_INVALID", "NOT_FOUND"}, r.text
    if not any(r.status_code == 200 for r in answers[:2]):
        assert request(url, client, "DELETE", "/me")().status_code == 200
    recorded = sum(1 for r in answers[4:7] if r.status_code == 200 and r.json()["data"]["outcome"] == "recorded")
    def settled() -> list[tuple[str, int, int, str]] | None:
        rows = ledger(settings, client.user_id)
        return rows if any(r[0] in ("spend", "refund") for r in rows) else None

    rows = wait_until(settled, timeout_s=30, what="the ledger to fold the settlement")
    assert Counter(r[0] for r in rows if r[3] == job) == Counter(
        {"reserve": 1, **({"spend": 1} if recorded else {}), **({"refund": 1} if recorded < 3 else {})}), rows
    assert {r[1] for r in rows if r[0] == "spend"} <= {recorded}
    assert sum(r[2] for r in rows) == START - recorded


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_one_signed_result_sent_many_times_at_once_is_taken_once(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 1)
        client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    raw = json.dumps({"idx": 0, "status": "done", "idempotency_key": f"{job}:0"}).encode()
    ts, nonce = int(time.time()), uuid.uuid4().hex
    headers = {"content-type": "application/json", "X-Palette-Timestamp": str(ts), "X-Palette-Nonce": nonce,
               "X-Palette-Signature": sign_callback(settings.callback_secret, ts, job, raw, nonce)}

    def send() -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as own:
            return own.post(f"/jobs/{job}/callback", content=raw, headers=headers)

    answers = at_once([send] * 10)
    no_5xx(answers)
    assert sorted(code(r) for r in answers) == ["AUTH_INVALID"] * 9 + ["ok"], [r.text for r in answers]
    check_money(url, settings, client, {job: 1})


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_many_results_racing_cancels_settle_the_job_once(url, settings, round_):
    items = 40
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, items)
        client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    calls = [report(url, settings.callback_secret, job, i, "done" if i % 3 else "failed") for i in range(items)]
    calls[items // 2:items // 2] = [request(url, client, "POST", f"/jobs/{job}/cancel") for _ in range(3)]
    answers = at_once(calls)
    no_5xx(answers)
    results = [r for r in answers if r.request.url.path.endswith("/callback")]
    cancels = [r for r in answers if r.request.url.path.endswith("/cancel")]
    assert {code(r) for r in cancels} <= {"ok", "INVALID_STATE"}, [r.text for r in cancels]
    assert {code(r) for r in results} <= {"ok"}, [r.text for r in results if r.status_code != 200]
    said = [(r.json()["data"]["outcome"], r.json()["data"]["item_status"]) for r in results]
    done = said.count(("recorded", "done"))
    check_money(url, settings, client, {job: done})


def test_a_user_past_its_snapshot_interval_keeps_its_balance(url, settings):
    """Enough jobs that the user's stream passes SNAPSHOT_EVERY while each job's result races its
    cancel: with two processes, each loads the user from the other's snapshot on the way."""
    from application.snapshots import SNAPSHOT_EVERY

    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
    spent: dict[str, int | None] = {}
    for n in range(SNAPSHOT_EVERY // 2 + 5):
        with httpx.Client(base_url=url, timeout=60) as http:
            client.http = http
            job = create_uploaded_job(client, 1)
            client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
        status = "done" if n % 10 == 0 else "failed"
        answers = at_once([report(url, settings.callback_secret, job, 0, status),
                           request(url, client, "POST", f"/jobs/{job}/cancel"),
                           request(url, client, "GET", "/me")])
        no_5xx(answers)
        recorded = answers[0].json()["data"]["outcome"] == "recorded"
        spent[job] = 1 if recorded and status == "done" else 0
    check_money(url, settings, client, spent)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_reruns_racing_the_sources_deletion_hold_no_credits_for_a_job_that_cannot_run(url, settings, round_):
    with httpx.Client(base_url=url, timeout=60) as http:
        client = Client(http)
        job = create_uploaded_job(client, 2)
        client.data("POST", f"/jobs/{job}/execute", json={"concepts": EDITS})
    for i in range(2):
        assert report(url, settings.callback_secret, job, i, "failed")().status_code == 200
    key = uuid.uuid4().hex
    answers = at_once([request(url, client, "DELETE", f"/jobs/{job}"), request(url, client, "DELETE", f"/jobs/{job}"),
                       request(url, client, "POST", f"/jobs/{job}/rerun"),
                       *[request(url, client, "POST", f"/jobs/{job}/rerun", headers={"Idempotency-Key": key})
                         for _ in range(2)]])
    no_5xx(answers)
    assert {code(r) for r in answers} <= {"ok", "INVALID_STATE", "NOT_FOUND", "CONCURRENCY_LIMIT", "CONFLICT"}, [
        r.text for r in answers]
    made = {r.json()["data"]["job_id"] for r in answers[2:] if r.status_code == 201}
    with httpx.Client(base_url=url, timeout=60, headers=client.headers) as http:
        me = http.get("/me").json()["data"]
        states = {j: http.get(f"/jobs/{j}").json()["data"]["status"] for j in made}
    assert me["active_jobs"] == sum(1 for s in states.values() if s not in ("canceled", "done", "failed")) <= 1
    assert me["credits"] + me["reserved"] == START
