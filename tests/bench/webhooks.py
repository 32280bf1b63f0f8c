"""Webhook delivery latency: from the event's commit to the receiver's receipt, at a steady 200
jobs/min through the real API, relay and ``palette serve webhooks`` to a receiver on loopback.

Each job has a user of its own (a free plan runs one job at a time) and two items (job.queued,
item.completed x2, job.finished: four webhooks); its user's endpoint subscribes to all of them.
The start of the latency is the payload's ``timestamp`` (the event's time, taken by the API just
before its commit), the end the receiver's clock on arrival, so the figure includes the commit
itself. Run: ``python -m tests.bench.webhooks [--seconds 60] [--jobs-per-min 200]``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg

from domain.contracts.callback import sign_callback
from tests.bench.harness import Results, Stack, percentile, running_stack, say

ITEMS = 2
WEBHOOKS_PER_JOB = ITEMS + 2
EVENTS = ["job.queued", "item.completed", "job.finished", "job.canceled"]


class Receipts:
    """What a loopback receiver got: per webhook-id, the seconds from the event to its arrival."""

    def __init__(self) -> None:
        self.latency_s: dict[str, float] = {}
        self.duplicates = 0
        self.lock = threading.Condition()

    def add(self, message_id: str, body: bytes, arrived: float) -> None:
        event_at = datetime.fromisoformat(json.loads(body)["timestamp"]).timestamp()
        with self.lock:
            if message_id in self.latency_s:
                self.duplicates += 1
            self.latency_s.setdefault(message_id, arrived - event_at)
            self.lock.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: len(self.latency_s) >= count, timeout=timeout_s)


@contextmanager
def receiver(receipts: Receipts) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            receipts.add(self.headers["webhook-id"], body, time.time())
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks"
    finally:
        server.shutdown()


class User:
    def __init__(self, http: httpx.Client, hook_url: str) -> None:
        r = http.post("/auth/anon", json={"device_hash": f"bench-{uuid.uuid4().hex}"})
        r.raise_for_status()
        self.headers = {"Authorization": f"Bearer {r.json()['data']['token']}"}
        http.post("/webhooks", json={"url": hook_url, "events": EVENTS}, headers=self.headers).raise_for_status()


def run_job(http: httpx.Client, user: User, callback_secret: str) -> None:
    """One job from creation to its last item, as the app and the GPU worker drive it."""
    created = http.post("/jobs", json={"preset": "interior", "item_count": ITEMS}, headers=user.headers)
    created.raise_for_status()
    job = created.json()["data"]
    for slot in job["upload"]:
        httpx.put(slot["url"], content=b"\xff\xd8bench", headers={"Content-Type": slot["content_type"]})
    job_id = job["job_id"]
    http.post(f"/jobs/{job_id}/confirm-upload", headers=user.headers).raise_for_status()
    http.post(f"/jobs/{job_id}/execute", json={"concepts": {"wall": {"action": "recolor", "value": "#5b7f95"}}},
              headers=user.headers).raise_for_status()
    for idx in range(ITEMS):
        raw = json.dumps({"idx": idx, "status": "failed", "error": "bench", "idempotency_key": f"{job_id}:{idx}"})
        ts = int(time.time())
        http.post(f"/jobs/{job_id}/callback", content=raw, headers={
            "content-type": "application/json", "X-Palette-Timestamp": str(ts),
            "X-Palette-Signature": sign_callback(callback_secret, ts, job_id, raw.encode())}).raise_for_status()


def bench_webhooks(stack: Stack, results: Results, seconds: float = 60.0, jobs_per_min: float = 200.0) -> None:
    settings = stack.settings
    jobs = round(seconds * jobs_per_min / 60)
    receipts = Receipts()
    with receiver(receipts) as hook_url, httpx.Client(base_url=f"http://{settings.api_host}:{settings.api_port}",
                                                      timeout=30) as http:
        users = [User(http, hook_url) for _ in range(jobs)]
        say(f"webhooks: {jobs} jobs of {ITEMS} items at {jobs_per_min:.0f}/min ({jobs * WEBHOOKS_PER_JOB} webhooks)")
        interval = 60.0 / jobs_per_min
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            futures = []
            for n in range(jobs):
                time.sleep(max(0.0, start + n * interval - time.monotonic()))  # the offered load's pace
                futures.append(pool.submit(run_job, http, users[n], settings.callback_secret))
            for future in futures:
                future.result()
        complete = receipts.wait_for(jobs * WEBHOOKS_PER_JOB, timeout_s=120)
    latencies_ms = [1000 * s for s in receipts.latency_s.values()]
    recorded_ms, sent_ms = stages(settings.effective_database_url)
    results.update({
        "webhook_jobs_per_min": jobs_per_min, "webhooks_expected": jobs * WEBHOOKS_PER_JOB,
        "webhooks_received": len(latencies_ms), "webhook_duplicates": receipts.duplicates,
        "webhook_p50_ms": round(percentile(latencies_ms, 50), 1),
        "webhook_p99_ms": round(percentile(latencies_ms, 99), 1),
        "webhook_max_ms": round(max(latencies_ms), 1),
        "webhook_recorded_p50_ms": round(percentile(recorded_ms, 50), 1),
        "webhook_recorded_p99_ms": round(percentile(recorded_ms, 99), 1),
        "webhook_sent_p50_ms": round(percentile(sent_ms, 50), 1),
        "webhook_sent_p99_ms": round(percentile(sent_ms, 99), 1),
    })
    say(f"webhooks: {len(latencies_ms)}/{jobs * WEBHOOKS_PER_JOB} received{'' if complete else ' (INCOMPLETE)'}, "
        f"commit -> receipt p50 {results['webhook_p50_ms']} ms, p99 {results['webhook_p99_ms']} ms, "
        f"max {results['webhook_max_ms']} ms; event -> delivery recorded p50 {results['webhook_recorded_p50_ms']} ms, "
        f"recorded -> answer recorded p50 {results['webhook_sent_p50_ms']} ms")


def stages(database_url: str) -> tuple[list[float], list[float]]:
    """Where the time goes: event -> delivery row (relay, broker, consumer), and delivery row ->
    first attempt recorded (the sender's wait for a turn, the POST, the receipt)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT convert_from(d.body, 'UTF8')::jsonb->>'timestamp', d.created_at, a.at "
            "FROM palette_webhooks.deliveries d JOIN palette_webhooks.attempts a ON a.delivery_id = d.id AND a.n = 1"
        ).fetchall()
    recorded = [1000 * (created - datetime.fromisoformat(at)).total_seconds() for at, created, _ in rows]
    sent = [1000 * (answered - created).total_seconds() for _, created, answered in rows]
    return recorded, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--jobs-per-min", type=float, default=200.0)
    args = parser.parse_args()
    results: Results = {}
    with running_stack() as stack:
        stack.start_apps(("api", "relay", "projector", "webhooks"))
        bench_webhooks(stack, results, args.seconds, args.jobs_per_min)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
