"""`palette bench`: every performance goal measured side by side with a naive baseline, in one
run, on an embedded stack the harness starts on free ports. Figures are medians over repeats."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from adapters.bootstrap import event_store_env
from adapters.settings import Settings, load_settings
from adapters.system import RandomIds, SystemClock
from application.services import PaletteApplication, PaletteService
from application.unit_of_work import ConflictError, DirectExecutor, GroupCommitter
from domain.plans import DEFAULT_PLANS, Plan
from infra.stack import EmbeddedStack, embedded_ports
from infra.supervisor import port_free

EDITS = {"wall": {"action": "recolor", "value": "#5b7f95"}, "floor": {"action": "texture", "value": "wood"},
         "lamp": {"action": "remove", "value": ""}}
# Bench users may run many jobs at once: the plan limits are not what is measured.
PLANS = {**DEFAULT_PLANS, "bench": Plan("bench", initial_credits=10**9, max_concurrency=10**6, max_rule_slots=2)}

GOALS: list[tuple[str, str, Callable[[dict[str, Any]], bool | None]]] = [
    ("commands_per_s", ">= 2000 and >= 5x naive",
     lambda r: _ok(r, "commands_per_s", lambda v: v >= 2000 and v >= 5 * (r.get("naive_commands_per_s") or 1e18))),
    ("core_commands_per_s", ">= 2000 (in process)", lambda r: _ok(r, "core_commands_per_s", lambda v: v >= 2000)),
    ("hot_stream_results_per_s", ">= 1000", lambda r: _ok(r, "hot_stream_results_per_s", lambda v: v >= 1000)),
    ("api_p99_ms", "<= 25 at 70% of peak", lambda r: _ok(r, "api_p99_ms", lambda v: v <= 25)),
    ("relay_events_per_s", ">= 10000 and >= 80% of raw producer",
     lambda r: _ok(r, "relay_events_per_s",
                   lambda v: v >= 10000 and v >= 0.8 * (r.get("raw_producer_events_per_s") or 1e18))),
    ("relay_p99_ms", "<= 50", lambda r: _ok(r, "relay_p99_ms", lambda v: v <= 50)),
    ("projection_lag_p99_ms", "<= 100 at 500 events/s", lambda r: _ok(r, "projection_lag_p99_ms", lambda v: v <= 100)),
    ("rebuild_events_per_s", ">= 20000 and >= 10x naive",
     lambda r: _ok(r, "rebuild_events_per_s",
                   lambda v: v >= 20000 and v >= 10 * (r.get("naive_rebuild_events_per_s") or 1e18))),
    ("replay_events_per_s", ">= 50000", lambda r: _ok(r, "replay_events_per_s", lambda v: v >= 50000)),
    ("gpu_items_per_s", ">= 3x naive (CPU)",
     lambda r: _ok(r, "gpu_items_per_s", lambda v: v >= 3 * (r.get("naive_gpu_items_per_s") or 1e18))),
]


def _ok(r: dict[str, Any], key: str, test: Callable[[float], bool]) -> bool | None:
    value = r.get(key)
    return None if value is None else bool(test(value))


@dataclass(frozen=True)
class Profile:
    repeats: int
    core_seconds: float
    http_sessions: int
    hot_jobs: int
    backlog_commands: int
    lag_seconds: float
    naive_rebuild_events: int
    gpu_items: int


CORE_CLIENTS = 96  # concurrent callers of the service in process (threads)
HTTP_CLIENTS = 64  # concurrent virtual users over HTTP
QUICK = Profile(repeats=3, core_seconds=3, http_sessions=200, hot_jobs=3, backlog_commands=4000,
                lag_seconds=5, naive_rebuild_events=1500, gpu_items=10)
FULL = Profile(repeats=5, core_seconds=8, http_sessions=600, hot_jobs=5, backlog_commands=20000,
               lag_seconds=15, naive_rebuild_events=4000, gpu_items=24)


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the stack ----------------------------------------------------------------------------------
def start_stack() -> tuple[EmbeddedStack, Path]:
    data_dir = Path(tempfile.mkdtemp(prefix="palette-bench-"))
    data_dir.chmod(0o755)
    rng = random.Random(os.getpid())
    for _ in range(500):
        base = rng.randrange(31000, 39000, 10)  # the derived ports stay under 65535
        ports = {"pg_port": base, "kafka_port": base + 1, "api_port": base + 2, "s3_port": base + 3}
        probe = Settings(data_dir=Path("/nonexistent"), **ports)  # type: ignore[arg-type]
        if all(port_free(p) for p in [*embedded_ports(probe).values(), ports["api_port"]]):
            break
    settings = load_settings(env="development", data_dir=data_dir, **ports)
    stack = EmbeddedStack(settings)
    stack.start_infra()
    return stack, data_dir


def service_on(settings: Settings, schema: str, naive: bool) -> tuple[PaletteService, Callable[[], None]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")  # a fixed identifier of this module
    app = PaletteApplication(env=event_store_env(settings, pool_size=8, cache=not naive, schema=schema))
    committer = None if naive else GroupCommitter(app).start()
    executor = DirectExecutor(app) if committer is None else committer
    svc = PaletteService(app, executor, SystemClock(), RandomIds(), plans=PLANS)

    def close() -> None:
        if committer is not None:
            committer.stop()
        app.close()

    return svc, close


# -- 1. the core, in process ------------------------------------------------------------------------
def mixed_session(svc: PaletteService, rng: random.Random) -> int:
    """One user's session: register, a job of 2 items through results or a cancel. Returns commands."""
    user_id = svc.register(f"bench-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", 2).value
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, {"wall": {"action": "tone", "value": "warm"}})
    if rng.random() < 0.2:
        svc.cancel_job(user_id, job_id)
        return 5
    for idx in range(2):
        svc.record_item_result(job_id, idx, "done", f"{job_id}:{idx}")
    return 6


def core_commands_per_s(svc: PaletteService, seconds: float, clients: int) -> float:
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            counts[i] += mixed_session(svc, rng)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(counts) / (time.perf_counter() - t0)


def hot_stream_results_per_s(svc: PaletteService, clients: int) -> float:
    user_id = svc.register(f"hot-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", 200).value
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, {"wall": {"action": "remove"}})
    def report(i: int) -> None:
        while True:  # a worker retries a 409 (the naive path conflicts on a hot stream)
            try:
                svc.record_item_result(job_id, i, "done", f"{job_id}:{i}")
                return
            except ConflictError:
                continue

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(report, range(200)))
    elapsed = time.perf_counter() - t0
    assert svc.get_job(user_id, job_id).status == "done"
    return 200 / elapsed


def bench_core(settings: Settings, prof: Profile, results: dict[str, Any]) -> None:
    for naive in (False, True):
        svc, close = service_on(settings, "bench_core_naive" if naive else "bench_core", naive)
        try:
            mixed = [core_commands_per_s(svc, prof.core_seconds, CORE_CLIENTS) for _ in range(prof.repeats)]
            hot = [hot_stream_results_per_s(svc, 32) for _ in range(prof.hot_jobs)]
        finally:
            close()
        prefix = "naive_" if naive else ""
        results[f"{prefix}core_commands_per_s"] = round(statistics.median(mixed), 1)
        results[f"{prefix}hot_stream_results_per_s"] = round(statistics.median(hot), 1)
        say(f"core {'naive' if naive else 'group commit'}: mixed {statistics.median(mixed):,.0f} cmd/s, "
            f"hot stream {statistics.median(hot):,.0f} results/s")


# -- 2. the HTTP API -------------------------------------------------------------------------------
class _Calls:
    """Timed API calls of one load-generating process."""

    def __init__(self, client: Any, secret: str) -> None:
        self.client = client
        self.secret = secret
        self.latencies: list[float] = []
        self.count = 0

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        r = await self.client.request(method, path, **kw)
        self.latencies.append((time.perf_counter() - t0) * 1000)
        self.count += 1
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r.json()["data"]

    async def open(self) -> tuple[dict[str, str], dict[str, Any]]:
        """A new user and a job of one photo (2 commands)."""
        token = (await self.call("POST", "/auth/anon", json={"device_hash": f"http-{uuid.uuid4().hex}"}))["token"]
        auth = {"Authorization": f"Bearer {token}"}
        return auth, await self.call("POST", "/jobs", json={"preset": "interior", "item_count": 1}, headers=auth)

    async def finish(self, auth: dict[str, str], job: dict[str, Any]) -> None:
        """Confirm, execute, the worker's result, and the reads (5 requests)."""
        from adapters.tokens import sign_callback

        job_id = job["job_id"]
        await self.call("POST", f"/jobs/{job_id}/confirm-upload", headers=auth)
        await self.call("POST", f"/jobs/{job_id}/execute",
                        json={"concepts": {"wall": {"action": "tone", "value": "warm"}}}, headers=auth)
        raw = json.dumps({"idx": 0, "status": "failed", "error": "bench", "idempotency_key": f"{job_id}:0"}).encode()
        ts = int(time.time())
        await self.call("POST", f"/jobs/{job_id}/callback", content=raw, headers={
            "content-type": "application/json", "X-Palette-Timestamp": str(ts),
            "X-Palette-Signature": sign_callback(self.secret, ts, str(job_id), raw)})
        await self.call("GET", f"/jobs/{job_id}", headers=auth)
        await self.call("GET", "/me", headers=auth)


async def _staged(items: list[Any], run: Callable[[Any], Any], concurrency: int, rate: float | None) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int, item: Any) -> Any:
        if rate is not None:  # open loop: start on schedule whatever the latency
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        async with sem:
            return await run(item)

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


async def _http_load(base_url: str, secret: str, sessions: int, concurrency: int,
                     rate_per_s: float | None) -> tuple[int, float, list[float]]:
    """Returns (API requests, seconds spent in API stages, latencies). The client's uploads to
    S3 happen between the stages, untimed: they load SeaweedFS, not the API."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        calls = _Calls(client, secret)
        t0 = time.perf_counter()
        opened = await _staged([None] * sessions, lambda _: calls.open(), concurrency, rate_per_s)
        api_s = time.perf_counter() - t0

        async def upload(opened_job: Any) -> None:
            for slot in opened_job[1]["upload"]:
                r = await client.put(slot["url"], content=b"\xff\xd8bench", headers={"Content-Type": "image/jpeg"})
                r.raise_for_status()

        await _staged(opened, upload, 16, None)
        t0 = time.perf_counter()
        await _staged(opened, lambda o: calls.finish(*o), concurrency, rate_per_s)
        api_s += time.perf_counter() - t0
        return calls.count, api_s, calls.latencies


def _http_process(args: tuple[str, str, int, int, float | None]) -> tuple[int, float, list[float]]:
    return asyncio.run(_http_load(*args))


def http_run(base_url: str, secret: str, sessions: int, concurrency: int,
             rate_per_s: float | None = None, processes: int = 2) -> tuple[float, list[float]]:
    """Load from several client processes (one Python client cannot saturate the API); returns
    (requests per second of API time, latencies)."""
    import multiprocessing

    share = (base_url, secret, sessions // processes, max(1, concurrency // processes),
             None if rate_per_s is None else rate_per_s / processes)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_http_process, [share] * processes)
    latencies = [x for _, _, lat in parts for x in lat]
    return sum(n / s for n, s, _ in parts), latencies


def bench_http(stack: EmbeddedStack, prof: Profile, results: dict[str, Any]) -> None:
    settings = stack.settings
    url = f"http://{settings.api_host}:{settings.api_port}"
    for path in ("naive", "group"):
        stack.settings = settings.model_copy(update={"command_path": path})
        stack.start_apps(("api",))
        try:
            runs = [http_run(url, settings.callback_secret, prof.http_sessions, HTTP_CLIENTS)[0]
                    for _ in range(prof.repeats)]
            peak = statistics.median(runs)
            results["naive_commands_per_s" if path == "naive" else "commands_per_s"] = round(peak, 1)
            say(f"HTTP {path}: {peak:,.0f} requests/s (median of {len(runs)})")
            if path == "group":
                rate = 0.7 * peak / 3.5  # sessions per second per stage (2 + 5 requests) at 70% of the peak
                _, latencies = http_run(url, settings.callback_secret, prof.http_sessions, 256, rate)
                results["api_p99_ms"] = round(percentile(latencies, 99), 2)
                results["api_p50_ms"] = round(percentile(latencies, 50), 2)
                say(f"HTTP latency at 70% of peak: p50 {results['api_p50_ms']} ms, p99 {results['api_p99_ms']} ms")
                results.setdefault("peak_rss_mb", {})["api"] = rss_mb(stack.supervisor.pid("api"))
        finally:
            stack.supervisor.stop("api")
    stack.settings = settings


# -- 3. relay, projections, rebuild, replay (the main store) ---------------------------------------
def make_backlog(settings: Settings, commands: int) -> None:
    svc, close = service_on(settings, "public", naive=False)
    try:
        sessions = max(1, commands // 6)
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: mixed_session(svc, random.Random(i)), range(sessions)))
    finally:
        close()


def bench_relay(settings: Settings, prof: Profile, results: dict[str, Any]) -> None:
    from adapters import kafka_io
    from adapters.envelope import encode, from_notification
    from adapters.kafka_admin import ensure_topics
    from adapters.relay import PgPositions, Relay

    app = PaletteApplication(env=event_store_env(settings, pool_size=2, cache=False))
    head = app.recorder.max_notification_id() or 0
    rates, raw_rates = [], []
    for rep in range(prof.repeats):
        topic = f"bench.relay.{rep}"
        ensure_topics(settings.effective_kafka_bootstrap, [topic, f"{topic}.raw"], settings.kafka_partitions)
        positions = PgPositions.connect(settings.effective_database_url)
        relay = Relay(app, kafka_io.producer(settings, linger_ms=5), positions,
                      name=f"bench-{uuid.uuid4().hex[:6]}", topic=topic)
        position, t0 = 0, time.perf_counter()
        while position < head:
            position = relay.step(position)
        relay.drain()
        rates.append(head / (time.perf_counter() - t0))
        relay.producer.close()
        positions.close()
        # The client's ceiling: a bare producer sending the same envelopes, already encoded.
        values = [(str(n.originator_id).encode(), encode(from_notification(n, app.mapper.transcoder)))
                  for n in app.recorder.select_notifications(start=1, limit=head)]
        producer = kafka_io.producer(settings, linger_ms=5)
        t0 = time.perf_counter()
        futures = [producer.send(f"{topic}.raw", key=k, value=v) for k, v in values]
        producer.flush()
        for f in futures:
            f.get(timeout=30)
        raw_rates.append(len(values) / (time.perf_counter() - t0))
        producer.close()
    # One message at a time, each waiting for its ack: the broker's own produce latency.
    producer = kafka_io.producer(settings, linger_ms=0)
    acks = []
    for i in range(50):
        t1 = time.perf_counter()
        producer.send(f"bench.relay.{prof.repeats - 1}.raw", key=b"k", value=b"%d" % i).get(timeout=30)
        acks.append((time.perf_counter() - t1) * 1000)
    producer.close()
    results["raw_produce_ack_p50_ms"] = round(statistics.median(acks), 1)
    results["relay_events_per_s"] = round(statistics.median(rates), 1)
    results["raw_producer_events_per_s"] = round(statistics.median(raw_rates), 1)
    say(f"relay {results['relay_events_per_s']:,.0f} events/s over {head:,} events; "
        f"raw producer {results['raw_producer_events_per_s']:,.0f}/s; one produce->ack "
        f"{results['raw_produce_ack_p50_ms']} ms (p50)")
    app.close()


def wait_drained(settings: Settings, timeout_s: float = 300) -> None:
    """Until the projector has folded the backlog (lag is measured on live traffic, not catch-up)."""
    from projections.read_models import READ_MODELS
    from projections.store import unapplied

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if all(unapplied(conn, m, "palette_events")[0] == 0 for m in READ_MODELS.values()):
                return
            time.sleep(0.2)
    raise RuntimeError("the projector did not catch up with the backlog")


def _steady_creates(svc: PaletteService, seconds: float, on_commit: Callable[[str], None],
                    rate: float = 250) -> int:
    """Job creations on schedule (2 events each: 500 events/s at 250/s); returns how many."""
    user_id = svc.register(f"lag-{uuid.uuid4()}", plan="bench").value[0]

    def create() -> None:
        on_commit(str(svc.create_job(user_id, "interior", 1).value))

    t0 = time.time()
    i = 0
    with ThreadPoolExecutor(16) as pool:
        while time.time() < t0 + seconds:
            time.sleep(max(0.0, t0 + i / rate - time.time()))
            pool.submit(create)
            i += 1
    return i


def bench_lag(stack: EmbeddedStack, prof: Profile, results: dict[str, Any]) -> None:
    """Commit -> read-model row through the real relay and projector processes, then commit ->
    Kafka ack on a relay instance in this process, each at ~500 events/s."""
    from adapters import kafka_io
    from adapters.relay import PgPositions, Relay

    settings = stack.settings
    svc, close = service_on(settings, "public", naive=False)
    seen: dict[str, float] = {}
    commits: dict[str, float] = {}
    stop = threading.Event()

    def poll_rows() -> None:
        # Only the oldest unseen jobs are asked for (rows arrive about in order): the probe's own
        # load stays small however far the projector falls behind.
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            while not stop.is_set() or len(seen) < len(commits):
                pending = [k for k in list(commits) if k not in seen][:200]
                if pending:
                    rows = conn.execute("SELECT stream_id::text FROM palette_read.jobs_log_tracking "
                                        "WHERE stream_id = ANY(%s::uuid[])", [pending]).fetchall()
                    now = time.time()
                    for (job,) in rows:
                        seen.setdefault(job, now)
                if stop.is_set() and time.time() > stopped_at + 30:
                    return
                time.sleep(0.01)

    stopped_at = float("inf")
    poller = threading.Thread(target=poll_rows, daemon=True)
    poller.start()
    n = _steady_creates(svc, prof.lag_seconds, lambda job: commits.__setitem__(job, time.time()))
    stopped_at = time.time()
    stop.set()
    poller.join(timeout=30)
    lags = [(seen[k] - commits[k]) * 1000 for k in commits if k in seen]
    results["projection_lag_p99_ms"] = round(percentile(lags, 99), 1) if lags else None
    results["projection_lag_p50_ms"] = round(percentile(lags, 50), 1) if lags else None

    # The relay's commit-to-ack latency: a second relay (own position and topic) in this process.
    acked: list[float] = []
    app = PaletteApplication(env=event_store_env(settings, pool_size=2, cache=False))
    positions = PgPositions.connect(settings.effective_database_url)
    relay = Relay(app, kafka_io.producer(settings, linger_ms=5), positions,
                  name=f"bench-lag-{uuid.uuid4().hex[:6]}", topic="bench.lag",
                  on_acked=lambda envs: acked.extend(time.time() - e.timestamp.timestamp() for e in envs))
    relay_stop = threading.Event()
    start_at = app.recorder.max_notification_id() or 0

    def relay_loop() -> None:
        position = start_at
        while not relay_stop.is_set():
            new = relay.step(position)
            if new == position:
                time.sleep(0.005)
            position = new
        relay.drain()

    looper = threading.Thread(target=relay_loop, daemon=True)
    looper.start()
    _steady_creates(svc, min(prof.lag_seconds, 8), lambda job: None)
    relay_stop.set()
    looper.join(timeout=30)
    relay.producer.close()
    positions.close()
    app.close()
    close()
    results["relay_p99_ms"] = round(percentile([a * 1000 for a in acked], 99), 1) if acked else None
    say(f"lag at {2 * n / prof.lag_seconds:,.0f} events/s: projection p50 {results['projection_lag_p50_ms']} ms, "
        f"p99 {results['projection_lag_p99_ms']} ms ({len(lags)}/{len(commits)} seen); relay commit->ack p99 "
        f"{results['relay_p99_ms']} ms")


def bench_rebuild_and_replay(settings: Settings, prof: Profile, results: dict[str, Any]) -> None:
    from projections.read_models import JOBS_LOG
    from projections.rebuild import iter_envelopes, rebuild
    from projections.replay import Replayer
    from projections.store import BatchResult, apply_model, create_model_tables

    app = PaletteApplication(env=event_store_env(settings, pool_size=2, cache=False))
    url = settings.effective_database_url
    rates = []
    for _ in range(prof.repeats):
        report = rebuild(url, app.recorder, app.mapper.transcoder, "jobs_log")
        rates.append(report.events_per_s)
    results["rebuild_events_per_s"] = round(statistics.median(rates), 1)
    # The naive projector: one transaction per event, into its own tables.
    envelopes = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))[: prof.naive_rebuild_events]
    with psycopg.connect(url, autocommit=True) as conn:
        for tbl in ("jobs_log__naive", "jobs_log_tracking__naive"):
            conn.execute(f"DROP TABLE IF EXISTS palette_read.{tbl}")  # fixed names of this module
        create_model_tables(conn, JOBS_LOG, "__naive")
        t0 = time.perf_counter()
        for env in envelopes:
            with conn.transaction():
                apply_model(conn, JOBS_LOG, [env], BatchResult(), suffix="__naive", park=False)
        results["naive_rebuild_events_per_s"] = round(len(envelopes) / (time.perf_counter() - t0), 1)
    say(f"rebuild jobs_log {results['rebuild_events_per_s']:,.0f} events/s; naive (commit per event) "
        f"{results['naive_rebuild_events_per_s']:,.0f} events/s")
    replay_rates = []
    sink = io.BytesIO()
    for _ in range(prof.repeats):
        sink.seek(0)
        sink.truncate()
        t0 = time.perf_counter()
        n = 0
        for chunk in Replayer(app).all_jsonl():
            sink.write(chunk)
            n += 1
        replay_rates.append(n / (time.perf_counter() - t0))
    results["replay_events_per_s"] = round(statistics.median(replay_rates), 1)
    say(f"replay all to JSON lines {results['replay_events_per_s']:,.0f} events/s")
    app.close()


# -- 4. the GPU worker (in a child process, for its own peak memory) ----------------------------------
def _room_jpeg(seed: int) -> bytes:
    from PIL import Image

    from gpu_consumer.demo import synthetic_room

    room = synthetic_room(800, 1280)  # 1 MP
    g = random.Random(seed)
    arr = (room[0].permute(1, 2, 0) * 255).round().byte().numpy()
    arr = (arr.astype("int16") + g.randint(-10, 10)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _gpu_phase(settings_json: str, items: int, naive: bool) -> dict[str, Any]:
    import resource

    import httpx
    import torch

    from adapters.dispatcher import tasks_for
    from adapters.s3 import s3_client
    from adapters.tokens import sign_callback
    from application.keys import input_key
    from gpu_consumer import ops
    from gpu_consumer.codec import encode_preview
    from gpu_consumer.segment import PriorClusterSegmenter
    from gpu_consumer.worker import CallbackClient, GpuWorker, ImagePipeline, Task, pick_device

    torch.set_num_threads(2)
    settings = Settings.model_validate_json(settings_json)
    svc, close = service_on(settings, "public", naive=False)
    s3 = s3_client(settings, max_pool=16)
    warm = 2  # first items pay one-off costs (allocator, texture cache): untimed, in both paths
    user_id = svc.register(f"gpu-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", items + warm).value
    for idx in range(items + warm):
        s3.put_object(Bucket=settings.s3_bucket, Key=input_key(user_id, job_id, idx), Body=_room_jpeg(idx))
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, EDITS, ["sofa"])
    tasks = [Task.parse(json.dumps(t).encode()) for t in tasks_for(svc.app.repository.get(job_id))]
    device = pick_device(settings.device)
    if naive:
        from PIL import Image

        segmenter = PriorClusterSegmenter()
        http = httpx.Client(base_url=settings.api_url, timeout=30)

        def run(batch: list[Task]) -> None:
            for task in batch:  # one item at a time: download, decode, each op, encode, upload, callback
                data = s3.get_object(Bucket=settings.s3_bucket, Key=task.input_key)["Body"].read()
                u8 = torch.from_numpy(__import__("numpy").asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy())
                image = ops.to_float(u8)
                masks = segmenter.masks(image, [*task.concepts, *task.protect])
                out = ops.apply_edits(image, masks, task.concepts, masks["sofa"], crop=False)
                out_u8 = ops.to_u8(out, u8)
                png = io.BytesIO()
                Image.fromarray(out_u8.numpy()).save(png, "PNG")
                s3.put_object(Bucket=settings.s3_bucket, Key=task.output_key, Body=png.getvalue())
                s3.put_object(Bucket=settings.s3_bucket, Key=task.preview_key, Body=encode_preview(out_u8))
                raw = json.dumps({"idx": task.idx, "status": "done", "output_key": task.output_key,
                                  "preview_key": task.preview_key, "idempotency_key": task.idempotency_key}).encode()
                ts = int(time.time())
                signature = sign_callback(settings.callback_secret, ts, str(task.job_id), raw)
                http.post(f"/jobs/{task.job_id}/callback", content=raw, headers={
                    "content-type": "application/json", "X-Palette-Timestamp": str(ts),
                    "X-Palette-Signature": signature}).raise_for_status()
    else:
        from adapters.bootstrap import compute_threads_for

        pipeline = ImagePipeline(s3, settings.s3_bucket, device)
        worker = GpuWorker(None, None, pipeline, CallbackClient(settings.api_url, settings.callback_secret),
                           compute_threads=compute_threads_for(device))

        def run(batch: list[Task]) -> None:
            for start in range(0, len(batch), 16):
                worker.process(batch[start:start + 16])

    run(tasks[:warm])
    t0 = time.perf_counter()
    run(tasks[warm:])
    elapsed = time.perf_counter() - t0
    job: Any = svc.app.repository.get(job_id)
    close()
    assert job.done_items == items + warm, f"only {job.done_items}/{items + warm} items done"
    return {"items_per_s": items / elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": str(device)}


def bench_gpu(stack: EmbeddedStack, prof: Profile, results: dict[str, Any]) -> None:
    import multiprocessing

    stack.start_apps(("api",))
    ctx = multiprocessing.get_context("spawn")
    try:
        for naive in (True, False):
            runs = []
            for _ in range(max(1, prof.repeats - 2)):
                with ctx.Pool(1) as pool:
                    runs.append(pool.apply(_gpu_phase, (stack.settings.model_dump_json(), prof.gpu_items, naive)))
            rate = statistics.median(r["items_per_s"] for r in runs)
            results["naive_gpu_items_per_s" if naive else "gpu_items_per_s"] = round(rate, 2)
            if not naive:
                results["gpu_device"] = runs[0]["device"]
                results.setdefault("peak_rss_mb", {})["gpu_worker"] = round(max(r["peak_rss_mb"] for r in runs), 1)
            say(f"GPU worker {'naive' if naive else 'pipeline'}: {rate:.2f} items/s at 1 MP "
                f"(peak RSS {max(r['peak_rss_mb'] for r in runs):.0f} MB)")
    finally:
        stack.supervisor.stop("api")


# -- the run -------------------------------------------------------------------------------------------
def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def machine() -> dict[str, Any]:
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {"cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1), "cpu": model,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "host": socket.gethostname()}


def bench_audit_at_scale(events: int) -> dict[str, Any]:
    """A log of ``events`` events, then `audit reconcile` and `replay all` over it, timed."""
    from projections import audit
    from projections.replay import Replayer

    results: dict[str, Any] = {"audit_events_target": events}
    stack, data_dir = start_stack()
    try:
        from projections.rebuild import rebuild

        say(f"writing ~{events:,} events")
        t0 = time.monotonic()
        make_backlog(stack.settings, events // 2)  # a session: 6 commands, about 12 events
        app = PaletteApplication(env=event_store_env(stack.settings, pool_size=2, cache=False))
        results["audit_events"] = app.recorder.max_notification_id()
        say(f"{results['audit_events']:,} events written in {time.monotonic() - t0:.0f}s; building the "
            "billing projection (a rebuild folds exactly what the live projector would)")
        for name in ("users", "billing_events"):
            built = rebuild(stack.settings.effective_database_url, app.recorder, app.mapper.transcoder, name)
            results[f"rebuild_{name}_seconds"] = round(built.seconds, 1)
        with psycopg.connect(stack.settings.effective_database_url, autocommit=True) as conn:
            t0 = time.monotonic()
            report = audit.reconcile(conn, app.recorder, app.mapper.transcoder)
            results["reconcile_seconds"] = round(time.monotonic() - t0, 1)
            results["reconcile_ok"] = report.ok
        t0 = time.monotonic()
        n = sum(1 for _ in Replayer(app).all_jsonl())
        results["replay_at_scale_events_per_s"] = round(n / (time.monotonic() - t0), 1)
        app.close()
        say(f"reconcile over {results['audit_events']:,} events: {results['reconcile_seconds']}s "
            f"({'OK' if report.ok else 'DIFFERENCES'}); replay {results['replay_at_scale_events_per_s']:,.0f} events/s")
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


def run(quick: bool) -> dict[str, Any]:
    prof = QUICK if quick else FULL
    results: dict[str, Any] = {"profile": "quick" if quick else "full", "machine": machine()}
    t0 = time.monotonic()
    say(f"starting an embedded stack ({results['profile']} profile)")
    stack, data_dir = start_stack()
    try:
        bench_core(stack.settings, prof, results)
        bench_http(stack, prof, results)
        say(f"writing a backlog of ~{prof.backlog_commands:,} commands")
        make_backlog(stack.settings, prof.backlog_commands)
        bench_relay(stack.settings, prof, results)
        stack.start_apps(("relay", "projector"))
        wait_drained(stack.settings)
        bench_lag(stack, prof, results)
        for name in ("relay", "projector"):
            results.setdefault("peak_rss_mb", {})[name] = rss_mb(stack.supervisor.pid(name))
        stack.supervisor.stop("projector")
        stack.supervisor.stop("relay")
        bench_rebuild_and_replay(stack.settings, prof, results)
        bench_gpu(stack, prof, results)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["goals"] = {name: {"goal": text, "met": check(results)} for name, text, check in GOALS}
    return results


KEYS = ["commands_per_s", "naive_commands_per_s", "api_p99_ms", "core_commands_per_s", "naive_core_commands_per_s",
        "hot_stream_results_per_s", "naive_hot_stream_results_per_s", "relay_events_per_s", "relay_p99_ms",
        "raw_producer_events_per_s", "raw_produce_ack_p50_ms", "projection_lag_p99_ms", "rebuild_events_per_s",
        "naive_rebuild_events_per_s",
        "replay_events_per_s", "gpu_items_per_s", "naive_gpu_items_per_s", "gpu_device"]


def table(results: dict[str, Any]) -> str:
    lines = [f"{'metric':<34}{'value':>14}", "-" * 48]
    for key in KEYS:
        value = results.get(key)
        shown = "null" if value is None else (f"{value:,.2f}" if isinstance(value, float) else str(value))
        lines.append(f"{key:<34}{shown:>14}")
    for name, mb in (results.get("peak_rss_mb") or {}).items():
        lines.append(f"{'peak_rss_mb.' + name:<34}{(mb if mb is not None else 0):>14,.1f}")
    lines += ["", f"{'goal':<26}{'target':<40}result", "-" * 74]
    for name, g in results["goals"].items():
        verdict = {True: "pass", False: "SHORT", None: "not measured"}[g["met"]]
        lines.append(f"{name:<26}{g['goal']:<40}{verdict}")
    m = results["machine"]
    lines += ["", f"machine: {m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}, GPU: {m['gpu'] or 'none'}; "
              f"{results['profile']} run in {results['seconds']}s"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Each goal's measured value as a share of its target (1.0 = the goal), as a bar chart."""
    from PIL import Image, ImageDraw

    ratios = []
    for key, target, higher in (("commands_per_s", 2000, True), ("core_commands_per_s", 2000, True),
                                ("hot_stream_results_per_s", 1000, True), ("api_p99_ms", 25, False),
                                ("relay_events_per_s", 10000, True), ("relay_p99_ms", 50, False),
                                ("projection_lag_p99_ms", 100, False), ("rebuild_events_per_s", 20000, True),
                                ("replay_events_per_s", 50000, True)):
        value = results.get(key)
        if value:
            ratios.append((key, value / target if higher else target / value))
    if results.get("gpu_items_per_s") and results.get("naive_gpu_items_per_s"):
        ratios.append(("gpu x naive / 3", results["gpu_items_per_s"] / results["naive_gpu_items_per_s"] / 3))
    w, row = 900, 34
    img = Image.new("RGB", (w, row * (len(ratios) + 2)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "measured / goal (right of the line = goal met)", fill="black")
    x0, scale = 260, 200
    for i, (name, ratio) in enumerate(ratios, 1):
        y = i * row + 8
        d.text((10, y + 8), name, fill="black")
        d.rectangle([x0, y + 4, x0 + min(ratio, 3) * scale, y + row - 8], fill="#3a7" if ratio >= 1 else "#d54")
        d.text((x0 + min(ratio, 3) * scale + 6, y + 8), f"{ratio:.2f}", fill="black")
    d.line([x0 + scale, row, x0 + scale, row * (len(ratios) + 1)], fill="black", width=2)
    img.save(path)


def main(quick: bool, json_path: str | None, plot_path: str | None, audit_events: int | None = None) -> int:
    import signal

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds through run()'s finally: the stack is stopped

    signal.signal(signal.SIGTERM, interrupted)
    if audit_events:
        results = bench_audit_at_scale(audit_events)
        print(json.dumps(results, indent=2))
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2))
        return 0 if results.get("reconcile_ok") else 1
    results = run(quick)
    print(table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    if plot_path:
        plot(results, plot_path)
    return 0

