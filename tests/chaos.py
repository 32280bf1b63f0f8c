"""Chaos: the whole embedded stack (its own, on free ports) under a client workload over HTTP
while a driver SIGKILLs random application processes every 1-5 s (each of them, and the broker,
at least once in the first round), kills the broker, and stops PostgreSQL with
``pg_ctl stop -m immediate``. Then: nothing lost, nothing done twice, read models equal to the
aggregates (balances, ledger sums, statuses, items: not the projections' own fold) and to a fold
of the log, every job terminal or resumable by its client. Some clients register a webhook
endpoint (a receiver in this process): every event of their jobs that the log calls for is
received, at least once, in the log's order, and every receipt of one event under one webhook-id.

``make chaos`` runs it long (``python -m tests.chaos --minutes 10``); ``make test`` runs a
short one (tests/integration/test_chaos.py).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from adapters.api.idempotency import id_for_key
from adapters.bootstrap import embedded_stack, event_store_env
from adapters.settings import load_settings
from application.services import PaletteApplication
from infra.stack import EmbeddedStack, find_pg_bin
from projections.log import events_table
from projections.models import READ_MODELS
from projections.rebuild import iter_envelopes
from projections.store import unapplied
from tests.webhook_receiver import Received, Receiver

APPS = ("api", "relay", "projector", "dispatcher", "gpu", "webhooks")
EDITS = {"wall": {"action": "tone", "value": "warm"}}
RETRYABLE = {409, 429, 500, 502, 503, 504}
HOOKED = 0.5  # the share of sessions whose user registers a webhook endpoint
# The webhooks the log calls for (issue 18): event class -> webhook type. The oracle's own table,
# not the webhook code's.
WEBHOOK_TYPES = {"JobQueued": "job.queued", "ItemCompleted": "item.completed", "JobFinished": "job.finished",
                 "JobCanceled": "job.canceled"}
Webhook = tuple[str, int | None]  # (type, item idx)
Receipts = dict[str, list[tuple[Webhook, str]]]  # job id -> (webhook, webhook-id) in arrival order


def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 180, 150)).save(buf, "JPEG")
    return buf.getvalue()


@dataclass
class Acked:
    """What the clients were told succeeded (the oracle for "lost")."""

    user: str
    items: int
    keys: set[str] = field(default_factory=set)
    confirmed: bool = False
    executed: bool = False
    canceled: bool = False
    hooked: bool = False  # its user has a webhook endpoint (registered before the job)


@dataclass
class Report:
    minutes: float = 0.0
    kills: Counter[str] = field(default_factory=Counter)
    pg_stops: int = 0
    sessions: int = 0
    requests: int = 0
    retries: int = 0
    gave_up: int = 0
    jobs: int = 0
    events: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    hooked_jobs: int = 0
    webhooks_expected: int = 0
    webhook_receipts: int = 0
    webhook_duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))
        return (f"chaos: {self.minutes:.1f} min, {sum(self.kills.values())} SIGKILLs ({kills}), "
                f"{self.pg_stops} PostgreSQL immediate stops; {self.sessions} client sessions, "
                f"{self.requests} requests ({self.retries} retried, {self.gave_up} given up); "
                f"{self.jobs} jobs {dict(self.statuses)}, {self.events} events; webhooks: "
                f"{self.webhooks_expected} events of {self.hooked_jobs} jobs expected, {self.webhook_receipts} "
                f"received ({self.webhook_duplicates} duplicates); {len(self.problems)} problems (lost or duplicated)")


class Workload:
    def __init__(self, base_url: str, report: Report, seed: int, think_s: float = 1.0,
                 hooks: Receiver | None = None) -> None:
        self.base_url = base_url
        self.hooks = hooks
        self.think_s = think_s
        self.report = report
        self.rng = random.Random(seed)
        self.jobs: dict[str, Acked] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.image = jpeg()

    def call(self, http: httpx.Client, method: str, path: str, deadline_s: float = 90,
             **kw: Any) -> httpx.Response | None:
        """Until a definitive answer: transport errors, 5xx, 409 (in flight) and 429 are retried
        with the same request (and Idempotency-Key); None when the deadline passes."""
        deadline = time.monotonic() + deadline_s
        first = True
        while time.monotonic() < deadline:
            with self.lock:
                self.report.requests += 1
                self.report.retries += 0 if first else 1
            first = False
            try:
                r = http.request(method, path, **kw)
                if r.status_code not in RETRYABLE:
                    return r
                wait = float(r.headers.get("Retry-After", "0.3"))
            except httpx.HTTPError:
                wait = 0.3
            time.sleep(min(wait, 2.0) * (0.5 + random.random()))
        with self.lock:
            self.report.gave_up += 1
        return None

    def session(self, http: httpx.Client) -> None:
        r = self.call(http, "POST", "/auth/anon", json={"device_hash": f"chaos-{uuid.uuid4().hex}"})
        if r is None or r.status_code not in (200, 201):
            return
        token, user = r.json()["data"]["token"], r.json()["data"]["user_id"]
        auth = {"Authorization": f"Bearer {token}"}
        hooked = False
        if self.hooks is not None and self.rng.random() < HOOKED:
            r = self.call(http, "POST", "/webhooks", headers=auth,
                          json={"url": self.hooks.url(f"/chaos/{user}"), "events": list(WEBHOOK_TYPES.values())})
            hooked = r is not None and r.status_code == 201
        items = self.rng.randint(1, 2)
        key = f"job-{uuid.uuid4().hex}"
        r = self.call(http, "POST", "/jobs", json={"preset": "interior", "item_count": items},
                      headers={**auth, "Idempotency-Key": key})
        if r is None or r.status_code != 201:
            return
        job_id = r.json()["data"]["job_id"]
        assert str(id_for_key(uuid.UUID(user), "job", key)) == job_id
        acked = Acked(user, items, {key}, hooked=hooked)
        with self.lock:
            self.jobs[job_id] = acked
        for slot in r.json()["data"]["upload"]:
            for _ in range(20):
                try:
                    if httpx.put(slot["url"], content=self.image, headers={"Content-Type": slot["content_type"]},
                                 timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        steps = [("confirm-upload", {}, "confirmed"), ("execute", {"json": {"concepts": EDITS}}, "executed")]
        if self.rng.random() < 0.2:
            steps = [*steps[:self.rng.randint(0, 2)], ("cancel", {}, "canceled")]
        for step, kw, flag in steps:
            r = self.call(http, "POST", f"/jobs/{job_id}/{step}",
                          headers={**auth, "Idempotency-Key": f"{key}-{step}"}, **kw)
            if r is None or r.status_code != 200:
                return
            setattr(acked, flag, True)

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=15) as http:
            while not self.stop.wait(self.rng.uniform(0, 2 * self.think_s)):  # a user's think time
                self.session(http)
                with self.lock:
                    self.report.sessions += 1


def pg_stop_immediate(stack: EmbeddedStack) -> None:
    pgdir = stack._pg_paths()[0]  # under the data directory, or where root put it (infra.stack.PG_HOME)
    argv = [find_pg_bin("pg_ctl"), "stop", "-D", str(pgdir), "-m", "immediate", "-w"]
    if stack._run_as:
        argv = ["runuser", "-u", stack._run_as, "--", *argv]
    subprocess.run(argv, check=False, capture_output=True, timeout=60)


def run(minutes: float, seed: int = 1, workers: int = 3, pg_stops: int = 2, say: Any = print,
        keep: bool = False, think_s: float = 1.0) -> Report:
    from tests.conftest import _free_port_block

    report = Report(minutes=minutes)
    rng = random.Random(seed)
    data_dir = Path(tempfile.mkdtemp(prefix="palette-chaos-"))
    data_dir.chmod(0o755)
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False, projector_sweep_s=5.0,
                             dispatch_stale_s=20.0, webhook_retry_schedule="1s,2s,5s,10s,30s,60s",
                             **_free_port_block(random.Random(seed + 7)))
    stack = embedded_stack(settings)
    supervising = threading.Event()
    hooks = Receiver()
    try:
        stack.start_infra()
        stack.start_apps(APPS)

        def supervise() -> None:
            while not supervising.is_set():
                stack.supervisor.check()
                time.sleep(0.2)

        threading.Thread(target=supervise, daemon=True).start()
        base_url = f"http://{settings.api_host}:{settings.api_port}"
        load = Workload(base_url, report, seed, think_s, hooks)
        threads = [threading.Thread(target=load.run, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        say(f"[chaos] stack up in {data_dir}; {workers} clients; killing for {minutes} min")
        end = time.monotonic() + minutes * 60
        stops_at = sorted(rng.uniform(0.15, 0.85) * minutes * 60 for _ in range(pg_stops))
        victims = [*APPS, "broker"]
        first_round = rng.sample(victims, len(victims))  # every one of them, before any twice
        started = time.monotonic()
        while time.monotonic() < end:
            time.sleep(rng.uniform(1, 5))
            if stops_at and time.monotonic() - started >= stops_at[0]:
                stops_at.pop(0)
                pg_stop_immediate(stack)
                report.pg_stops += 1
                say("[chaos] pg_ctl stop -m immediate")
                continue
            victim = first_round.pop() if first_round else rng.choice(victims)
            stack.kill(victim)
            report.kills[victim] += 1
        say(f"[chaos] stopping the clients after {sum(report.kills.values())} kills; settling")
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
        verify(stack, load, report, say)
    finally:
        supervising.set()
        stack.stop()
        hooks.close()
        if keep:
            say(f"[chaos] kept {data_dir} (logs/ has every process's log)")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return report


def _wait(what: str, predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001, S110 - the stack may still be coming back
            pass
        time.sleep(0.5)
    return False


def verify(stack: EmbeddedStack, load: Workload, report: Report, say: Any) -> None:
    s = stack.settings
    url = s.effective_database_url
    base_url = f"http://{s.api_host}:{s.api_port}"
    _wait("every process", lambda: httpx.get(f"{base_url}/health", timeout=5).json()["data"]["status"] == "ok", 180)
    app = PaletteApplication(env=event_store_env(s, pool_size=2))
    try:
        executed = [j for j, a in load.jobs.items() if a.executed and not a.canceled]

        def all_terminal() -> bool:
            return all(app.repository.get(uuid.UUID(j)).status.terminal for j in executed)

        if not _wait("jobs", all_terminal, 300):
            say("[chaos] some executed jobs did not finish")
        with psycopg.connect(url, autocommit=True) as conn:
            table = events_table(app.recorder)

            def drained() -> bool:
                relay = conn.execute("SELECT position FROM palette_relay.positions").fetchone()
                head = app.recorder.max_notification_id() or 0
                return bool(relay and relay[0] >= head) and all(
                    unapplied(conn, m, table)[0] == 0 for m in READ_MODELS.values())

            if not _wait("projections", drained, 300):
                report.problems.append("the read models did not catch up with the log")
            log = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
            report.events = len(log)
            check_log(log, load, report, app)
            report.problems.extend(read_model_problems(conn, log, app, load.jobs))
            from tests.integration.test_projections import assert_models_equal_fold

            try:
                assert_models_equal_fold(app, conn)
            except AssertionError as e:
                report.problems.append(f"a read model differs from the fold of the log: {e}")

        def webhooks_received() -> list[str]:
            assert load.hooks is not None
            with load.hooks.changed:
                receipts = list(load.hooks.got)
            log = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
            return webhook_problems(log, load.jobs, receipts, report)

        if load.hooks is not None:
            _wait("webhooks", lambda: not webhooks_received(), 120)
            report.problems.extend(webhooks_received())
    finally:
        app.close()


def read_model_problems(conn: psycopg.Connection[Any], log: list[Any], app: Any,
                        acked_jobs: dict[str, Acked] | None = None) -> list[str]:
    """The projected rows against oracles that share nothing with the projections' fold: each
    user's row and ledger sums against its User aggregate (the domain's own fold), each job's and
    item's row against its Job aggregate, and the jobs against what their clients were told.
    ``log`` is the whole event log, every event of it folded."""
    problems: list[str] = []
    users = {str(r[0]): tuple(r[1:]) for r in conn.execute(
        "SELECT id, plan, credits, reserved, spent, granted FROM palette_read.users").fetchall()}
    ledger = {str(r[0]): tuple(int(v) for v in r[1:]) for r in conn.execute(
        "SELECT user_id, sum(balance_delta), coalesce(sum(amount) FILTER (WHERE type = 'grant'), 0), "
        "coalesce(sum(amount) FILTER (WHERE type = 'spend'), 0) FROM palette_read.billing_events "
        "GROUP BY user_id").fetchall()}
    jobs = {str(r[0]): (str(r[1]), *r[2:]) for r in conn.execute(
        "SELECT id, user_id, status, total_items, done_items, failed_items FROM palette_read.jobs_log").fetchall()}
    items: dict[str, dict[int, str]] = {}
    for job_id, idx, status in conn.execute("SELECT job_id, idx, status FROM palette_read.job_items_log").fetchall():
        items.setdefault(str(job_id), {})[idx] = status
    streams = {str(e.stream_id): e.stream_type for e in log}
    deleted = {str(e.stream_id) for e in log if e.type == "JobDeleted"}  # gone from every view
    for kind, rows in (("User", users), ("Job", jobs)):
        want = {s for s, k in streams.items() if k == kind and s not in deleted}
        if set(rows) != want:
            problems.append(f"{kind} read model: {len(set(rows) - want)} row(s) without a stream, "
                            f"{len(want - set(rows))} stream(s) without a row")
    active: Counter[str] = Counter()
    for job_id in (s for s, k in streams.items() if k == "Job"):
        job = app.repository.get(uuid.UUID(job_id))
        row = jobs.get(job_id)
        if job.deleted:
            if row is not None or job_id in items:
                problems.append(f"job {job_id}: deleted, still in jobs_log or job_items_log")
            continue
        want_row = (str(job.user_id), job.status.value, job.item_count, job.done_items, job.failed_items)
        if row != want_row:
            problems.append(f"job {job_id}: jobs_log has {row}, the aggregate {want_row}")
        want_items = {i: job.items[i].status if i in job.items else "pending" for i in range(job.item_count)}
        if items.get(job_id) != want_items:
            problems.append(f"job {job_id}: job_items_log has {items.get(job_id)}, the aggregate {want_items}")
        active[str(job.user_id)] += row is not None and row[1] not in ("done", "failed", "canceled")
        acked = (acked_jobs or {}).get(job_id)
        if acked is not None and row is not None and acked.canceled and row[1] != "canceled":
            problems.append(f"job {job_id}: cancel acknowledged, jobs_log says {row[1]}")
    for user_id in (s for s, k in streams.items() if k == "User"):
        user = app.repository.get(uuid.UUID(user_id))
        want_user = (user.plan, user.balance, user.reserved, user.spent, user.granted)
        if users.get(user_id) != want_user:
            problems.append(f"user {user_id}: users has (plan, credits, reserved, spent, granted) "
                            f"{users.get(user_id)}, the aggregate {want_user}")
        sums = ledger.get(user_id, (0, 0, 0))
        if sums != (user.balance, user.granted, user.spent):
            problems.append(f"user {user_id}: billing_events sums (balance_delta, granted, spent) to {sums}, "
                            f"the aggregate has {(user.balance, user.granted, user.spent)}")
        if active[user_id] != user.active_jobs:
            problems.append(f"user {user_id}: {active[user_id]} open job(s) in jobs_log, "
                            f"the aggregate has {user.active_jobs}")
    return problems


def webhook_problems(log: list[Any], jobs: dict[str, Acked], receipts: list[Received], report: Report) -> list[str]:
    """What the webhook receiver got (``receipts``, in arrival order) for the jobs of hooked users
    against their log: every event the log calls for received (duplicates allowed), nothing else,
    each event under one webhook-id of its own, a job's events first received in the log's order.
    Counts go to ``report``."""
    want: dict[str, list[Webhook]] = {j: [] for j, acked in jobs.items() if acked.hooked}
    for e in log:
        if str(e.stream_id) in want and e.type in WEBHOOK_TYPES:
            idx = e.data["idx"] if e.type == "ItemCompleted" else None
            want[str(e.stream_id)].append((WEBHOOK_TYPES[e.type], idx))
    owners = {str(e.stream_id): str(e.data["user_id"]) for e in log if e.type == "JobCreated"}
    got, problems = received_webhooks(receipts, owners)
    sent_as: dict[str, set[Webhook]] = defaultdict(set)  # webhook-id -> the events sent under it
    report.hooked_jobs, report.webhook_receipts = len(want), 0
    report.webhooks_expected = sum(len(events) for events in want.values())
    for job_id, events in want.items():
        ids: dict[Webhook, set[str]] = defaultdict(set)
        for event, webhook_id in got.get(job_id, []):
            ids[event].add(webhook_id)
            sent_as[webhook_id].add(event)
        report.webhook_receipts += len(got.get(job_id, []))
        missing = [e for e in events if e not in ids]
        if missing:
            problems.append(f"webhooks: job {job_id}: {missing} never received")
        if set(ids) - set(events):
            problems.append(f"webhooks: job {job_id}: received {sorted(map(str, set(ids) - set(events)))}, "
                            "which its log does not have")
        problems += [f"webhooks: job {job_id}: {event} received under {len(i)} webhook-ids"
                     for event, i in ids.items() if len(i) > 1]
        first = [e for e in dict.fromkeys(event for event, _ in got.get(job_id, [])) if e in events]
        if first != [e for e in events if e in ids]:
            problems.append(f"webhooks: job {job_id}: first received in the order {first}, its log has {events}")
    report.webhook_duplicates = report.webhook_receipts - sum(len({e for e, _ in got.get(j, [])}) for j in want)
    problems += [f"webhooks: webhook-id {i} sent for {len(events)} events" for i, events in sent_as.items()
                 if len(events) > 1]
    return problems


def received_webhooks(receipts: list[Received], owners: dict[str, str]) -> tuple[Receipts, list[str]]:
    """Per job, its receipts in arrival order; and a problem for each receipt at an endpoint
    other than its job's user's (``owners``: job id -> user id, from the log)."""
    got: Receipts = defaultdict(list)
    problems = []
    for r in receipts:
        payload = json.loads(r.body)
        job_id = payload["data"]["job_id"]
        idx = payload["data"]["item"]["idx"] if payload["type"] == "item.completed" else None
        got[job_id].append(((payload["type"], idx), r.headers["webhook-id"]))
        if r.path != f"/chaos/{owners.get(job_id)}":
            problems.append(f"webhooks: job {job_id} (of user {owners.get(job_id)}) delivered to {r.path}")
    return got, problems


def check_log(log: list[Any], load: Workload, report: Report, app: Any) -> None:
    reserved = Counter(e.data["job_id"] for e in log if e.type == "CreditsReserved")
    settled = Counter(e.data["job_id"] for e in log if e.type == "CreditsSettled")
    items = Counter((e.stream_id, e.data["idx"]) for e in log if e.type == "ItemCompleted")
    created = {str(e.stream_id): e for e in log if e.type == "JobCreated"}
    report.jobs = len(created)
    for (job, idx), n in items.items():
        if n > 1:
            report.problems.append(f"job {job} item {idx} recorded {n} times")
    for job_id in created:
        job = app.repository.get(uuid.UUID(job_id))
        report.statuses[job.status.value] += 1
        if reserved[job_id] != 1:
            report.problems.append(f"job {job_id} reserved {reserved[job_id]} times")
        if settled[job_id] != (1 if job.status.terminal else 0):
            report.problems.append(f"job {job_id} ({job.status}) settled {settled[job_id]} times")
        acked = load.jobs.get(job_id)
        if acked is None:
            continue  # created but its client never heard back (gave up): resumable with its key
        if acked.canceled and job.status.value != "canceled":
            report.problems.append(f"job {job_id}: cancel acknowledged, status {job.status}")
        if acked.executed and not acked.canceled and not job.status.terminal:
            report.problems.append(f"job {job_id}: executed but stuck in {job.status}")
        if acked.confirmed and job.status.value == "created":
            report.problems.append(f"job {job_id}: confirm acknowledged but lost")
    for job_id in load.jobs:
        if job_id not in created:
            report.problems.append(f"job {job_id}: creation acknowledged but not in the log")
    users = {e.data["user_id"] for e in created.values()}
    for user_id in users:
        user = app.repository.get(uuid.UUID(str(user_id)))
        if user.balance < 0 or user.granted != user.balance + user.reserved + user.spent:
            report.problems.append(f"user {user_id}: credits not conserved")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--pg-stops", type=int, default=3)
    parser.add_argument("--think", type=float, default=1.0, help="mean seconds between a client's sessions")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (and its logs)")
    args = parser.parse_args()
    report = run(args.minutes, args.seed, args.workers, args.pg_stops, keep=args.keep, think_s=args.think)
    print(report.summary())
    for p in report.problems[:50]:
        print(f"PROBLEM {p}")
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
