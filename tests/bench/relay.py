"""The relay and the projections: the relay's throughput over the backlog against a bare
producer, then on live traffic (~500 events/s, then ~2,000) commit -> read-model row through the
real relay and projector processes, and event -> broker ack on a second relay in this process.

Every relay here is ``adapters.bootstrap.build_relay``'s, run by its own loop (``Relay.run``; the
backlog's in a process of its own, ``relay_rates``);
only its name (its saved position) and its topic are the bench's, and it has no watch for a
broker that lost messages (that watch keeps the live relay's offsets), so the live one is untouched."""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

from adapters import kafka_io
from adapters.bootstrap import build_relay
from adapters.settings import Settings
from application.services import PaletteService
from domain.contracts.envelope import EventEnvelope
from infra.kafka_admin import ensure_topics
from tests.bench import relay_rates, rows_probe
from tests.bench.harness import Profile, Results, Stack, percentile, say, service_on

LAG_EVENTS_PER_S = 500  # job creations at half that rate: each commits 2 events
FAST_LAG_EVENTS_PER_S = 2000  # the same measurement at a higher offered load
EVENTS_TABLE = sql.Identifier("public", "palette_events")  # the main event store's table
ACK_SAMPLES = 50


def named_relay(settings: Settings, topic: str, name: str,
                      on_acked: Callable[[list[EventEnvelope]], None] | None = None) -> Any:
    """The composition root's relay, publishing to ``topic`` under its own position ``name``."""
    logging.getLogger("palette.relay").setLevel(logging.ERROR)  # its start-up line, once per run
    return build_relay(settings, name=name, topic=topic, on_acked=on_acked)


def bare_producer_rate(producer: Any, topic: str, values: list[tuple[bytes, bytes]]) -> float:
    """Messages per second of ``producer`` sending ``values`` (key, envelope) to ``topic``, every
    acknowledgement awaited; the producer is closed."""
    t0 = time.perf_counter()
    futures = [producer.send(topic, key=k, value=v) for k, v in values]
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    rate = len(values) / (time.perf_counter() - t0)
    producer.close()
    return rate


def bench_relay(settings: Settings, prof: Profile, results: Results) -> None:
    """Each rate in a process of its own, as a served relay's (``relay_rates``)."""
    rates, raw_rates, old_rates = [], [], []
    for rep in range(prof.repeats):
        topic = f"bench.relay.{rep}"
        ensure_topics(settings.effective_kafka_bootstrap, [topic, f"{topic}.raw"], settings.kafka_partitions)
        events, rate = relay_rates.in_own_process(relay_rates.relay_rate, settings, topic)
        rates.append(rate)
        # The client's ceiling: a bare producer sending the same envelopes, already encoded.
        raw_rates.append(relay_rates.in_own_process(relay_rates.producer_rate, settings, f"{topic}.raw", "librdkafka"))
        # The client the relay had before (kafka-python), for the same envelopes: the old ceiling.
        old_rates.append(relay_rates.in_own_process(relay_rates.producer_rate, settings, f"{topic}.raw",
                                                    "kafka-python"))
    # One message at a time, each waiting for its ack: the broker's own produce latency.
    producer = kafka_io.LogProducer(settings, linger_ms=0)
    acks = []
    for i in range(ACK_SAMPLES):
        t1 = time.perf_counter()
        producer.send(f"bench.relay.{prof.repeats - 1}.raw", key=b"k", value=b"%d" % i).get(timeout=30)
        acks.append((time.perf_counter() - t1) * 1000)
    producer.close()
    results["relay_backlog_events"] = events
    results["raw_produce_ack_p50_ms"] = round(statistics.median(acks), 1)
    results["relay_events_per_s"] = round(statistics.median(rates), 1)
    results["raw_producer_events_per_s"] = round(statistics.median(raw_rates), 1)
    results["raw_kafka_python_events_per_s"] = round(statistics.median(old_rates), 1)
    say(f"relay {results['relay_events_per_s']:,.0f} events/s over a backlog of {events:,} events; bare producer "
        f"{results['raw_producer_events_per_s']:,.0f} events/s (kafka-python's "
        f"{results['raw_kafka_python_events_per_s']:,.0f}); one message send->ack "
        f"{results['raw_produce_ack_p50_ms']} ms (p50 of {ACK_SAMPLES})")


DRAINED_MESSAGES = 100  # the projector's group is this close to the broker's ends: live traffic from here


def _projector_behind(lag: Any) -> int | None:
    """Messages of palette.events the projector's group has not committed (None: not known), as
    ``lag`` (an adapters.observability.ConsumerLagCollector) reads them."""
    from domain.contracts import topics

    for family in lag.collect():
        for sample in family.samples:
            if sample.labels == {"group": topics.PROJECTOR_GROUP, "topic": topics.EVENTS}:
                return int(sample.value)
    return None


def wait_drained(settings: Settings, timeout_s: float = 300) -> None:
    """Until the projector has folded the backlog and gone through it in the broker too (lag is
    measured on live traffic: a projector that caught up from the event store still has to read
    past what it already folded)."""
    from projections.models import READ_MODELS
    from projections.store import unapplied

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if all(unapplied(conn, m, EVENTS_TABLE)[0] == 0 for m in READ_MODELS.values()):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("the projector did not catch up with the backlog")
    from adapters.observability import ConsumerLagCollector

    lag = ConsumerLagCollector(settings.effective_kafka_bootstrap)  # one admin client for the wait
    try:
        while time.monotonic() < deadline:
            behind = _projector_behind(lag)
            if behind is not None and behind <= DRAINED_MESSAGES:
                return
            time.sleep(0.5)
    finally:
        lag.close()
    raise RuntimeError("the projector did not read through the broker's backlog")


def steady_creates(svc: PaletteService, seconds: float, on_commit: Callable[[str], None],
                   events_per_s: float = LAG_EVENTS_PER_S, stop: threading.Event | None = None) -> float:
    """Job creations offered on schedule for ``seconds`` (or until ``stop``) at ``events_per_s``
    (fewer when this process falls behind its schedule); returns the events per second committed."""
    user_id = svc.register(f"lag-{uuid.uuid4()}", plan="bench").value[0]
    rate = events_per_s / 2

    def create() -> None:
        on_commit(str(svc.create_job(user_id, "interior", 1).value))

    t0 = time.time()
    futures: list[Future[None]] = []
    # 16 callers at 500 events/s, more at a higher rate (each waits for its group commit).
    with ThreadPoolExecutor(max(16, round(16 * events_per_s / LAG_EVENTS_PER_S))) as pool:
        while time.time() < t0 + seconds and not (stop is not None and stop.is_set()):
            time.sleep(max(0.0, t0 + len(futures) / rate - time.time()))
            futures.append(pool.submit(create))
        offered_s = min(seconds, time.time() - t0)
    return 2 * sum(1 for f in futures if f.exception() is None) / offered_s


class JobRows:
    """When each job created (``commit``, called as create_job returns) has its jobs_log tracking
    row, polled every 10 ms by a process of its own (``rows_probe``) until ``close``, and then
    for ``wait_after_s`` at most."""

    def __init__(self, settings: Settings, table: tuple[str, str] = rows_probe.TRACKING,
                 wait_after_s: float = rows_probe.WAIT_AFTER_S) -> None:
        self.commits: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        spawn = multiprocessing.get_context("spawn")  # this process runs threads: no fork
        self._jobs: Any = spawn.Queue()
        self._found: Any = spawn.Queue()
        self._ended = False
        self._ended_at = math.inf  # when the probe gave up on the rows it never saw
        self._wait_after_s = wait_after_s
        self._poller = spawn.Process(target=rows_probe.poll_rows, daemon=True,
                                     args=(settings.effective_database_url, self._jobs, self._found, table,
                                           wait_after_s))
        self._poller.start()
        if self._found.get(timeout=60) != "ready":
            raise RuntimeError("the read-model probe did not start")

    def commit(self, job: str) -> None:
        self.commits[job] = time.time()
        self._jobs.put(job)

    def _collect(self, wait: bool = False) -> None:
        """What the probe found so far (``wait``: until it ends)."""
        deadline = time.monotonic() + self._wait_after_s + 30
        while not self._ended:
            if wait:
                batch = relay_rates.from_child(self._poller, self._found, deadline, "the read-model probe")
            else:
                try:
                    batch = self._found.get_nowait()
                except queue.Empty:
                    return
            if batch is None:
                self._ended, self._ended_at = True, time.time()
            else:
                self.seen.update(batch)

    def lags_ms(self) -> list[float]:
        """The lag of every job seen so far; once the probe has ended, a job it never saw counts
        as the time it was waited for (a lag of at least that): left out, the lags' tail would
        lose the slowest rows of all."""
        self._collect()
        return [(self.seen.get(k, self._ended_at) - t) * 1000
                for k, t in list(self.commits.items()) if k in self.seen or self._ended]

    def timeline(self) -> list[tuple[float, float]]:
        """(commit time, lag in ms) of every job so far, in commit order; inf: not seen yet."""
        self._collect()
        return sorted((t, (self.seen[k] - t) * 1000 if k in self.seen else math.inf)
                      for k, t in list(self.commits.items()))

    def close(self) -> None:
        """Once no more jobs are created: until every row is seen, or 30 s more."""
        self._jobs.put(None)
        self._collect(wait=True)
        self._poller.join(timeout=10)


def projection_lags(settings: Settings, svc: PaletteService, seconds: float,
                    events_per_s: float = LAG_EVENTS_PER_S) -> tuple[list[float], int, int, float]:
    """Milliseconds from each job creation's return (committed) to its jobs_log tracking row,
    polled every 10 ms, creations offered at ``events_per_s``; returns the lags (a row never seen:
    the time it was waited for), how many jobs were seen and created, and events/s."""
    rows = JobRows(settings)
    rate = steady_creates(svc, seconds, rows.commit, events_per_s)
    rows.close()
    return rows.lags_ms(), len(rows.seen), len(rows.commits), rate


def lag_figures(settings: Settings, svc: PaletteService, seconds: float, events_per_s: float, suffix: str,
                results: Results) -> tuple[int, int]:
    """projection_lag_{p50_ms,p99_ms,events_per_s}``suffix``; returns the jobs seen and created."""
    lags, seen, created, rate = projection_lags(settings, svc, seconds, events_per_s)
    results[f"projection_lag_events_per_s{suffix}"] = round(rate, 1)
    results[f"projection_lag_p99_ms{suffix}"] = round(percentile(lags, 99), 1) if lags else None
    results[f"projection_lag_p50_ms{suffix}"] = round(percentile(lags, 50), 1) if lags else None
    return seen, created


def bench_lag(stack: Stack, prof: Profile, results: Results) -> None:
    """Needs the stack's relay and projector processes running, the backlog drained."""
    settings = stack.settings
    svc, close = service_on(settings, "public", naive=False)
    try:
        seen, created = lag_figures(settings, svc, prof.lag_seconds, LAG_EVENTS_PER_S, "", results)
        rate = results["projection_lag_events_per_s"]
        # Event -> ack: a second relay in this process (own position and topic), from the head on.
        acked: list[float] = []
        relay = named_relay(settings, "bench.lag", f"bench-lag-{uuid.uuid4().hex[:6]}",
                                  on_acked=lambda envs: acked.extend(time.time() - e.timestamp.timestamp()
                                                                     for e in envs))
        relay.positions.save(relay.name, relay.recorder.max_notification_id() or 0)
        stop = threading.Event()
        loop = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        loop.start()
        results["relay_ack_events_per_s"] = round(steady_creates(svc, min(prof.lag_seconds, 8), lambda job: None), 1)
        stop.set()
        loop.join(timeout=30)
        relay.close()
    finally:
        close()
    results["relay_p99_ms"] = round(percentile([a * 1000 for a in acked], 99), 1) if acked else None
    say(f"commit -> jobs_log row at {rate:,.0f} events/s: p50 {results['projection_lag_p50_ms']} ms, "
        f"p99 {results['projection_lag_p99_ms']} ms ({seen}/{created} seen); event -> broker ack (second "
        f"relay) at {results['relay_ack_events_per_s']:,.0f} events/s: p99 {results['relay_p99_ms']} ms")


def bench_fast_lag(stack: Stack, prof: Profile, results: Results) -> None:
    """projection_lag at FAST_LAG_EVENTS_PER_S: the same processes, the log drained first."""
    settings = stack.settings
    wait_drained(settings)
    svc, close = service_on(settings, "public", naive=False)
    k = f"_{FAST_LAG_EVENTS_PER_S}"
    try:
        seen, created = lag_figures(settings, svc, prof.lag_seconds, FAST_LAG_EVENTS_PER_S, k, results)
    finally:
        close()
    say(f"commit -> jobs_log row offered {FAST_LAG_EVENTS_PER_S:,} events/s, committed "
        f"{results['projection_lag_events_per_s' + k]:,.0f} events/s: p50 {results['projection_lag_p50_ms' + k]} "
        f"ms, p99 {results['projection_lag_p99_ms' + k]} ms ({seen}/{created} seen)")
