"""Metrics and probes of the worker processes, on a port of their own (``PALETTE_METRICS_PORT`` +
the process's offset; 0 turns them off): ``/metrics`` (Prometheus text), ``/livez`` (the process
answers) and ``/readyz`` (503 naming the failing dependency).

The figures are read from what each worker already counts, when Prometheus scrapes (custom
collectors: nothing on the hot path), plus, in the projector, the read side's lag per model
measured in the database. The histograms (the relay's commit -> ack, the GPU worker's seconds
per item by op, the group committer's batch sizes) and the group committer's counters are
observed through a hook the worker calls once per batch or item. Several API processes share one
port in prometheus_client's multiprocess mode (:func:`multiprocess_registry`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from adapters.positions import RELAY_NAME
from adapters.settings import Settings
from domain.contracts import topics

log = logging.getLogger("palette.metrics")
# The worker processes' ports: PALETTE_METRICS_PORT + offset.
OFFSETS = {"api": 0, "relay": 1, "projector": 2, "dispatcher": 3, "gpu": 4, "webhooks": 5, "checkpointer": 6}
CHECK_TIMEOUT_S = 2.0
CHECK_TTL_S = 1.0  # a flood of /readyz costs one check per dependency per second
MAX_CONNECTIONS = 32  # on the metrics and probes port at once (scrapers, probes)
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
        b'{"status":"busy"}')  # past MAX_CONNECTIONS
MAX_HEAD_READ = 64 * 1024  # of a connection turned away, read and dropped before it is closed
REQUEST_TIMEOUT_S = 10.0  # to send a whole request to that port, and to read each part of its answer
GPU_ITEM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def port_of(settings: Settings, process: str) -> int | None:
    if not settings.metrics_port or process not in OFFSETS:
        return None
    return settings.metrics_port + OFFSETS[process]


class CountsCollector:
    """A dict of counts the worker keeps (``GpuWorker.stats``, ``Projector.totals``) as one
    counter with the key as a label."""

    def __init__(self, name: str, documentation: str, label: str, counts: Callable[[], Mapping[str, float]]) -> None:
        self.name, self.documentation, self.label, self.counts = name, documentation, label, counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, value in sorted(self.counts().items()):
            family.add_metric([key], float(value))
        yield family


class ReadSideCollector:
    """Per read model: events not folded yet, seconds since the oldest of them was recorded,
    dead letters; the event store's head and the relay's position. Measured when scraped."""

    def __init__(self, database_url: str, log_reader: Any, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.database_url = database_url
        self.log = log_reader  # the projector's: the events table and the oldest events' times
        self.ttl_s = ttl_s  # the lag counts scan the log: measured at most this often, however many scrapers
        self.clock = clock
        self._last: tuple[float, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        import psycopg
        from eventsourcing.persistence import PersistenceError

        lag = GaugeMetricFamily("palette_read_model_lag_events", "events of the log a read model has not folded",
                                labels=["model"])
        lag_s = GaugeMetricFamily("palette_read_model_lag_seconds",
                                  "age of the oldest event a read model has not folded", labels=["model"])
        letters = GaugeMetricFamily("palette_dead_letters", "events parked or held per read model", labels=["model"])
        try:
            if self._last is None or self.clock() - self._last[0] >= self.ttl_s:
                self._last = (self.clock(), self._measure(psycopg))
            rows, positions = self._last[1]
        except (psycopg.Error, PersistenceError) as e:  # the log's reads go through the event store's pool
            log.warning("read-side metrics unavailable: %s", type(e).__name__)
            return
        for model, events, seconds, parked in rows:
            lag.add_metric([model], events)
            lag_s.add_metric([model], seconds)
            letters.add_metric([model], parked)
        yield from (lag, lag_s, letters)
        for name, value in positions.items():
            yield GaugeMetricFamily(f"palette_{name}_position", f"the {name.replace('_', ' ')}'s position",
                                    value=value)

    def _measure(self, psycopg: Any) -> tuple[list[tuple[str, int, float, int]], dict[str, float]]:
        from projections.log import events_table
        from projections.models import READ_MODELS
        from projections.store import unapplied

        rows = []
        now = datetime.now(UTC)
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=int(CHECK_TIMEOUT_S)) as conn:
            parked = dict(conn.execute("SELECT model, count(*) FROM palette_read.dead_letters "
                                       "WHERE status IN ('parked', 'held') GROUP BY model").fetchall())
            for name, model in READ_MODELS.items():
                count, oldest = unapplied(conn, model, events_table(self.log.recorder))
                first = self.log.read(oldest - 1, oldest, 1) if oldest is not None else []
                seconds = max(0.0, (now - first[0].timestamp).total_seconds()) if first else 0.0
                rows.append((name, count, seconds, int(parked.get(name, 0))))
            relay = conn.execute("SELECT position FROM palette_relay.positions WHERE name = %s",
                                 [RELAY_NAME]).fetchone()
        return rows, {"event_store_head": float(self.log.head()), "relay": float(relay[0] if relay else 0)}


# -- probes ---------------------------------------------------------------------------------
def dependency_checks(settings: Settings, needs: Iterable[str]) -> dict[str, Callable[[], bool]]:
    """Readiness checks of the dependencies a process needs: postgres, broker, s3."""

    def postgres() -> bool:
        import psycopg

        try:
            with psycopg.connect(settings.effective_database_url, connect_timeout=int(CHECK_TIMEOUT_S)) as conn:
                conn.execute("select 1")
            return True
        except psycopg.Error:
            return False

    def broker() -> bool:
        from infra.kafka_admin import broker_answers

        return broker_answers(settings.effective_kafka_bootstrap, timeout_ms=int(CHECK_TIMEOUT_S * 1000))

    def s3() -> bool:
        from infra.s3 import s3_client

        try:
            s3_client(settings, timeout_s=CHECK_TIMEOUT_S).head_bucket(Bucket=settings.s3_bucket)
            return True
        except Exception:  # noqa: BLE001 - any failure reads as failing
            return False

    every = {"postgres": postgres, "broker": broker, "s3": s3}
    return {name: every[name] for name in needs}


class Readiness:
    """The checks, each run at most once per CHECK_TTL_S whatever the callers."""

    def __init__(self, checks: Mapping[str, Callable[[], bool]], clock: Callable[[], float] = time.monotonic) -> None:
        self.checks = dict(checks)
        self.clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, list[str]] | None = None

    def failing(self) -> list[str]:
        with self._lock:
            if self._last is None or self.clock() - self._last[0] >= CHECK_TTL_S:
                self._last = (self.clock(), [name for name, check in self.checks.items() if not check()])
            return list(self._last[1])


class _BoundedServer(ThreadingHTTPServer):
    """At most ``MAX_CONNECTIONS`` connections served at once, a thread each; one past them is
    answered a 503 and closed (``_turn_away``). A connection's request must be in within
    ``REQUEST_TIMEOUT_S`` of its acceptance, each write of its answer within as long
    (``Handler.timeout``): a connection that sent nothing, or a byte now and then, was a thread
    and a descriptor held for good, enough of them the process's file descriptors (its database
    and broker connections' too), and, with the bound, every slot."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # The connections whose request is not in yet, and by when it must be: the timeout bounds
        # each read, so a client sending a byte now and then held its slot for good (and enough
        # of them every slot, every probe after them closed unanswered). serve_forever's loop
        # shuts the late ones down (service_actions, every half second).
        self._heads: dict[Any, float] = {}
        self._heads_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._turn_away(request)
            return
        with self._heads_lock:
            self._heads[request] = time.monotonic() + REQUEST_TIMEOUT_S
        try:
            super().process_request(request, client_address)
        except BaseException:  # socketserver closes it (shutdown_request)
            self._slots.release()
            raise

    def _turn_away(self, request: Any) -> None:
        """A 503 and the connection closed, never waiting on the client: closed unanswered, a
        liveness probe counted it a miss, and whoever held the slots had the process restarted."""
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(BUSY)
            request.shutdown(socket.SHUT_WR)
            request.recv(MAX_HEAD_READ)  # what it sent already: unread, the close would be a reset
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def head_received(self, request: Any) -> None:
        with self._heads_lock:
            self._heads.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        self.head_received(request)  # before its descriptor is closed (and may be another's)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        super().service_actions()
        now = time.monotonic()
        with self._heads_lock:  # held: a connection leaves _heads before it is closed
            for request in [request for request, by in self._heads.items() if by <= now]:
                del self._heads[request]
                with contextlib.suppress(OSError):  # its thread's read ends; the handler then closes it
                    request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone mid-request (a reset, a timeout) says nothing: the standard library
        printed its traceback to stderr, some 20 lines that were no JSON record, for each
        connection a client chose to reset. Anything else is one record of the log."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("a request to the metrics port failed")


class _IPv6Server(_BoundedServer):
    """The server on an IPv6 address (PALETTE_METRICS_HOST=::1): ThreadingHTTPServer binds IPv4 only."""

    address_family = socket.AF_INET6


def serve(port: int, registry: CollectorRegistry, readiness: Readiness, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """``/metrics``, ``/livez``, ``/readyz`` on ``host:port`` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a request not sent, or an answer not read, within it: closed

        def parse_request(self) -> bool:
            try:
                return super().parse_request()
            finally:  # its head is in: the answer's writes are bounded by the timeout alone
                cast(_BoundedServer, self.server).head_received(self.request)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
            elif self.path == "/livez":
                self._send(200, b'{"status":"alive"}', "application/json")
            elif self.path == "/readyz":
                failing = readiness.failing()
                body = {"status": "ready"} if not failing else {"status": "not ready", "failing": failing}
                self._send(503 if failing else 200, json.dumps(body).encode(), "application/json")
            else:
                self._send(404, b'{"status":"not found"}', "application/json")

        def do_HEAD(self) -> None:  # a load balancer's or uptime probe's: GET's answer, no body
            self.do_GET()

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # scrapes are not worth a log line each
            return

    server = (_IPv6Server if ":" in host else _BoundedServer)((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


NEEDS = {"api": ("postgres", "broker", "s3"), "relay": ("postgres", "broker"), "projector": ("postgres", "broker"),
         "dispatcher": ("postgres", "broker"), "gpu": ("broker", "s3"), "webhooks": ("postgres", "broker"),
         "checkpointer": ("postgres",)}


class ConsumerLagCollector:
    """Per consumer group and topic: messages in the broker the group has not committed yet
    (end offsets minus committed offsets, summed over partitions). Asked of the broker when
    scraped, outside the groups (an admin client and a bare consumer)."""

    GROUPS = ((topics.PROJECTOR_GROUP, topics.EVENTS), (topics.DISPATCHER_GROUP, topics.EVENTS),
              (topics.GPU_GROUP, topics.GPU_TASKS), (topics.WEBHOOKS_GROUP, topics.EVENTS))

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._lock = threading.Lock()
        self._clients: tuple[Any, Any] | None = None

    def _connect(self) -> tuple[Any, Any]:
        from kafka import KafkaAdminClient, KafkaConsumer

        if self._clients is None:
            self._clients = (KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000),
                             KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                           request_timeout_ms=5000))
        return self._clients

    def collect(self) -> Iterator[Metric]:
        from kafka import TopicPartition

        family = GaugeMetricFamily("palette_consumer_group_lag", "messages a consumer group has not committed",
                                   labels=["group", "topic"])
        with self._lock:
            try:
                admin, probe = self._connect()
                probe.topics()  # fresh metadata: partitions_for_topic reads the cached one
                for group, topic in self.GROUPS:
                    partitions = probe.partitions_for_topic(topic) or set()
                    wanted = [TopicPartition(topic, p) for p in sorted(partitions)]
                    ends = probe.end_offsets(wanted)
                    committed = admin.list_group_offsets({group: wanted}).get(group, {})
                    behind = sum(max(0, int(end) - max(0, committed[tp].offset if tp in committed else 0))
                                 for tp, end in ends.items())
                    family.add_metric([group, topic], behind)
            except Exception as e:  # noqa: BLE001 - a scrape without this family, never a failed scrape
                log.warning("consumer group lag unavailable: %s: %s", type(e).__name__, e)
                self._close()
                return
        yield family

    def _close(self) -> None:
        clients, self._clients = self._clients, None
        for client in clients or ():
            with contextlib.suppress(Exception):  # a broker gone away: the sockets close anyway
                client.close()

    def close(self) -> None:
        """Close the admin client and the probe (a later scrape opens them again)."""
        with self._lock:
            self._close()


class WebhookCollector:
    """Deliveries by status, the oldest pending one's age, and disabled endpoints (one query per scrape)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[Metric]:
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True, connect_timeout=int(CHECK_TIMEOUT_S)) as conn:
                by_status = conn.execute("SELECT status, count(*) FROM palette_webhooks.deliveries "
                                         "GROUP BY status").fetchall()
                oldest = conn.execute("SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM "
                                      "palette_webhooks.deliveries WHERE status = 'pending'").fetchone()
                disabled = conn.execute("SELECT count(*) FROM palette_webhooks.endpoints WHERE NOT enabled"
                                        ).fetchone()
        except psycopg.Error as e:
            log.warning("webhook metrics unavailable: %s", type(e).__name__)
            return
        deliveries = GaugeMetricFamily("palette_webhook_deliveries", "webhook deliveries kept, by status",
                                       labels=["status"])
        for status, count in by_status:
            deliveries.add_metric([str(status)], count)
        yield deliveries
        yield GaugeMetricFamily("palette_webhook_oldest_pending_seconds", "age of the oldest pending delivery",
                                value=float(oldest[0]) if oldest else 0.0)
        yield GaugeMetricFamily("palette_webhook_endpoints_disabled", "endpoints disabled after failing",
                                value=float(disabled[0]) if disabled else 0.0)


def ops_label(concepts: Mapping[str, Mapping[str, Any]]) -> str:
    """An item's ops as one label: its distinct actions, sorted, joined by "+" ("recolor",
    "recolor+texture"). Each item is observed once, under the set of ops it ran; the ops have
    checked every action before an item is observed, so the labels are subsets of four actions."""
    return "+".join(sorted({str(edit.get("action")) for edit in concepts.values()})) or "none"


def collectors_for(process: str, worker: Any, settings: Settings, registry: CollectorRegistry) -> list[Collector]:
    """What each worker counts, as metrics."""
    found: list[Collector] = []
    if process == "relay" and hasattr(worker, "observe_ack"):
        found.append(CountsCollector("palette_relay_events", "events the relay published (acknowledged)",
                                     "result", lambda: {"acknowledged": worker.published}))
        latency = Histogram("palette_relay_commit_to_ack_seconds", "decided -> broker ack, oldest event per batch",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry)
        worker.observe_ack = latency.observe
    if process == "webhooks":
        found.append(WebhookCollector(settings.effective_database_url))
    if process == "dispatcher" and hasattr(worker, "dispatched"):
        found.append(CountsCollector("palette_dispatcher_tasks", "GPU tasks sent, and records parked", "result",
                                     lambda: {"dispatched": worker.dispatched, "parked": worker.parked}))
    if process == "gpu" and isinstance(getattr(worker, "stats", None), dict):
        found.append(CountsCollector("palette_gpu_items", "GPU worker items by outcome", "outcome",
                                     lambda: worker.stats))
        seconds = Histogram("palette_gpu_item_seconds", "seconds editing one item on the device (masks, refinement, "
                            "edits; after its fetch, before its upload), by the item's ops", ["op"],
                            buckets=GPU_ITEM_BUCKETS, registry=registry)
        worker.observe_item = lambda task, s: seconds.labels(ops_label(task.concepts)).observe(s)
    if process == "projector" and hasattr(worker, "totals"):
        found.append(CountsCollector("palette_projector_events", "events the projector handled by result", "result",
                                     lambda: {k: getattr(worker.totals, k) for k in
                                              ("applied", "skipped", "parked", "filled")}))
        if getattr(worker, "log", None) is not None:
            found.append(ReadSideCollector(settings.effective_database_url, worker.log))
        found.append(ConsumerLagCollector(settings.effective_kafka_bootstrap))
    return found


def command_metrics(committer: Any, registry: CollectorRegistry) -> None:
    """The group committer's commands, batches, conflicts and commands refused as written too
    late, and a histogram of batch sizes, counted as each batch is saved (plain counters: several
    API processes add up in multiprocess mode; a conflict or a refusal is counted with the batch
    saved after it)."""
    work = Counter("palette_group_commit", "the group committer's work", ["kind"], registry=registry)
    sizes = Histogram("palette_group_commit_batch_size", "commands saved per batch",
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500), registry=registry)
    commands, batches, conflicts, too_late = (work.labels(kind) for kind in
                                              ("commands", "batches", "conflicts", "written_too_late"))
    counted = [committer.conflicts, committer.written_too_late]

    def observe(size: int) -> None:  # on the committer's thread, once per saved batch
        sizes.observe(size)
        commands.inc(size)
        batches.inc()
        for n, (counter, now) in enumerate(((conflicts, committer.conflicts),
                                            (too_late, committer.written_too_late))):
            if now > counted[n]:
                counter.inc(now - counted[n])
                counted[n] = now

    committer.observe_batch = observe


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """Several API processes (PALETTE_API_WORKERS > 1) on one metrics port: each counts into files
    under ``directory`` (prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``, which
    the worker processes inherit), and the returned registry adds them up when scraped. Emptied
    first, or a previous run's counts would be added in; the files of a worker that died stay, as
    its counts do. Every API family is a counter or a histogram, which add up across processes."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def start(process: str, worker: Any, settings: Settings,
          registry: CollectorRegistry | None = None) -> ThreadingHTTPServer | None:
    """The process's metrics and probes port, when PALETTE_METRICS_PORT is set (``registry``:
    what the process already measures, e.g. the API's requests)."""
    port = port_of(settings, process)
    if port is None:
        return None
    registry = registry or CollectorRegistry()
    for collector in collectors_for(process, worker, settings, registry):
        registry.register(collector)
    try:
        return serve(port, registry, Readiness(dependency_checks(settings, NEEDS.get(process, ()))),
                     settings.metrics_host)
    except OSError as e:
        log.warning("metrics port %d not opened: %s", port, e.strerror)
        return None
