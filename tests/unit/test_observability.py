"""The workers' metrics and probes port, on fake dependency checks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry

from adapters.observability import CountsCollector, Readiness, serve
from tests.raw_http import raw_head
from tests.waiting import wait_until


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_livez_and_readyz_name_the_failing_dependency():
    stats = {"done": 3, "failed": 1}
    broker_up = [True]
    calls = []
    clock = [0.0]

    def broker() -> bool:
        calls.append(1)
        return broker_up[0]

    registry = CollectorRegistry()
    registry.register(CountsCollector("palette_gpu_items", "items", "outcome", lambda: stats))
    server = serve(0, registry, Readiness({"postgres": lambda: True, "broker": broker}, clock=lambda: clock[0]))
    port = server.server_address[1]
    try:
        status, body = _get(port, "/metrics")
        assert status == 200
        assert 'palette_gpu_items_total{outcome="done"} 3.0' in body.decode()
        stats["done"] = 5  # read when scraped
        assert 'palette_gpu_items_total{outcome="done"} 5.0' in _get(port, "/metrics")[1].decode()
        assert _get(port, "/livez")[0] == 200
        assert _get(port, "/readyz") == (200, b'{"status": "ready"}')
        broker_up[0] = False
        assert _get(port, "/readyz")[0] == 200  # checked at most once a second
        clock[0] = 1.5
        status, body = _get(port, "/readyz")
        assert status == 503 and json.loads(body)["failing"] == ["broker"]
        assert len(calls) == 2
        assert _get(port, "/nope")[0] == 404
    finally:
        server.shutdown()


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}


def test_gpu_items_are_timed_once_each_under_the_set_of_ops_they_ran(tmp_path):
    from adapters.observability import collectors_for
    from adapters.settings import Settings
    from tests.unit.test_gpu_worker_hardening import record, step_once, task, worker

    both = {"wall": {"action": "recolor", "value": "#2255cc"}, "floor": {"action": "tone", "value": "warm"}}
    tasks = [task(both), task(idx=1), task({"wall": {"action": "melt", "value": ""}}, idx=2)]
    w, _, _, callbacks, _ = worker([record(t, i) for i, t in enumerate(tasks)])
    registry = CollectorRegistry()
    for collector in collectors_for("gpu", w, Settings(data_dir=tmp_path), registry):
        registry.register(collector)
    step_once(w)
    assert sorted(status for _, status, _ in callbacks.reports) == ["done", "done", "failed"]
    got = _samples(registry)
    assert got[("palette_gpu_item_seconds_count", (("op", "recolor+tone"),))] == 1
    assert got[("palette_gpu_item_seconds_count", (("op", "recolor"),))] == 1
    assert got[("palette_gpu_item_seconds_sum", (("op", "recolor"),))] > 0
    assert not any(labels and "melt" in labels[0][1] for _, labels in got)  # refused: never a label
    assert got[("palette_gpu_items_total", (("outcome", "done"),))] == 2


def test_group_commit_counters_move_with_each_saved_batch():
    from adapters.observability import command_metrics

    class Committer:
        conflicts = 1  # before the metrics were attached: not counted
        written_too_late = 4  # nor these
        observe_batch: Any = None

    committer, registry = Committer(), CollectorRegistry()
    command_metrics(committer, registry)
    committer.observe_batch(3)
    committer.conflicts = 3
    committer.written_too_late = 5
    committer.observe_batch(1)
    committer.observe_batch(2)  # no conflict since: none counted again
    committer.written_too_late = 9
    committer.observe_batch(1)
    got = _samples(registry)
    assert got[("palette_group_commit_total", (("kind", "commands"),))] == 7
    assert got[("palette_group_commit_total", (("kind", "batches"),))] == 4
    assert got[("palette_group_commit_total", (("kind", "conflicts"),))] == 2
    assert got[("palette_group_commit_total", (("kind", "written_too_late"),))] == 5
    assert got[("palette_group_commit_batch_size_count", ())] == 4


def test_every_metric_the_dashboard_queries_is_one_the_processes_define():
    """docs/grafana/palette.json against the names in the code (a renamed family leaves a panel empty)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "docs/grafana/palette.json").read_text())
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"palette_[a-z_]+", target["expr"])}
    source = "".join(p.read_text() for p in (root / "adapters").rglob("*.py"))
    defined = set(re.findall(r"\"(palette_[a-z_]+)\"", source))
    assert len(queried) >= 10 and queried <= defined, queried - defined


def _port_nobody_listens_on() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_dependency_check_fails_where_nobody_answers(tmp_path):
    """/readyz must not say ready for a dependency that is down: each check, asked of a port
    nobody listens on, fails (rather than take its error for an answer)."""
    from adapters.observability import dependency_checks
    from adapters.settings import load_settings

    port = _port_nobody_listens_on()
    settings = load_settings(data_dir=tmp_path, database_url=f"postgresql://palette:x@127.0.0.1:{port}/palette",
                             kafka_bootstrap=f"127.0.0.1:{port}", s3_endpoint=f"http://127.0.0.1:{port}")
    checks = dependency_checks(settings, ("postgres", "broker", "s3"))
    assert {name: check() for name, check in checks.items()} == {"postgres": False, "broker": False, "s3": False}


def test_the_gpu_workers_readiness_names_the_broker_and_the_object_store_it_works_from(tmp_path):
    """The GPU worker takes its tasks from the broker and reads and writes images in S3: it is not
    ready while either is down (it uses no database)."""
    import random

    from adapters.observability import start
    from adapters.settings import load_settings
    from tests.conftest import _free_metrics_port

    port = _port_nobody_listens_on()
    settings = load_settings(data_dir=tmp_path, metrics_port=_free_metrics_port(random.Random()),
                             database_url=f"postgresql://palette:x@127.0.0.1:{port}/palette",
                             kafka_bootstrap=f"127.0.0.1:{port}", s3_endpoint=f"http://127.0.0.1:{port}")
    server = start("gpu", None, settings)
    assert server is not None
    try:
        status, body = _get(server.server_address[1], "/readyz")
        assert (status, json.loads(body)) == (503, {"status": "not ready", "failing": ["broker", "s3"]})
    finally:
        server.shutdown()
        server.server_close()


def test_a_metrics_port_of_zero_opens_no_port_for_any_process(tmp_path):
    from adapters.observability import OFFSETS, port_of, start
    from adapters.settings import load_settings

    settings = load_settings(data_dir=tmp_path, metrics_port=0)
    assert all(port_of(settings, process) is None for process in OFFSETS)
    assert start("checkpointer", None, settings) is None
    on = load_settings(data_dir=tmp_path, metrics_port=9400)
    assert {process: port_of(on, process) for process in OFFSETS} == {
        "api": 9400, "relay": 9401, "projector": 9402, "dispatcher": 9403, "gpu": 9404, "webhooks": 9405,
        "checkpointer": 9406}


def test_the_read_side_is_measured_at_most_once_per_ttl_however_many_scrape(tmp_path):
    """The lag counts scan the log: a flood of scrapes costs one measure per ttl_s."""
    from adapters.observability import ReadSideCollector

    clock = [0.0]
    measured = []

    class Counted(ReadSideCollector):
        def _measure(self, psycopg: Any) -> Any:
            measured.append(clock[0])
            return [("users", 3, 1.5, 0)], {"event_store_head": 9.0, "relay": 9.0}

    registry = CollectorRegistry()
    registry.register(Counted("postgresql://unused", None, ttl_s=10.0, clock=lambda: clock[0]))
    for now in (0.0, 1.0, 9.9, 10.0, 15.0):
        clock[0] = now
        assert _samples(registry)[("palette_read_model_lag_events", (("model", "users"),))] == 3
    assert measured == [0.0, 10.0]


def test_a_groups_lag_counts_what_it_never_committed_from_the_start_of_the_partition():
    """A group that committed nothing on a partition (new, or reset) is behind by all of it, not by
    nothing; a committed offset counts from there (fakes of the admin client and the probe)."""
    from types import SimpleNamespace

    from kafka import TopicPartition

    from adapters.observability import ConsumerLagCollector

    class Probe:
        def topics(self) -> set[str]:
            return set()

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1}

        def end_offsets(self, wanted: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {tp: 10 for tp in wanted}

        def close(self) -> None: ...

    class Admin:
        def list_group_offsets(self, asked: dict[str, list[TopicPartition]]) -> dict[str, dict[TopicPartition, Any]]:
            (group, wanted), = asked.items()
            return {group: {wanted[0]: SimpleNamespace(offset=4)}}  # partition 0 at 4, partition 1 never

        def close(self) -> None: ...

    collector = ConsumerLagCollector("127.0.0.1:1")
    collector._clients = (Admin(), Probe())
    registry = CollectorRegistry()
    registry.register(collector)
    lags = {labels: value for (name, labels), value in _samples(registry).items()
            if name == "palette_consumer_group_lag"}
    assert len(lags) == len(ConsumerLagCollector.GROUPS) and set(lags.values()) == {(10 - 4) + 10}


def test_head_on_the_probes_answers_as_get_does_without_a_body():
    """Load balancers and uptime probes send HEAD: it was a 501 from the standard library's server."""
    failing = [False]
    readiness = Readiness({"broker": lambda: not failing[0]}, clock=lambda: float(failing[0]))
    server = serve(0, CollectorRegistry(), readiness)
    port = server.server_address[1]

    try:
        for path, status in (("/livez", b"200"), ("/readyz", b"200"), ("/metrics", b"200"), ("/nope", b"404")):
            got = raw_head(port, path)
            assert got.split(b" ", 2)[1] == status, (path, got)
            assert got.endswith(b"\r\n\r\n") and b"content-length" in got.lower()  # the headers, no body
        failing[0] = True  # and a second later (the check's clock)
        assert raw_head(port, "/readyz").split(b" ", 2)[1] == b"503"
    finally:
        server.shutdown()


def test_the_probes_port_opens_on_an_ipv6_metrics_host() -> None:
    # PALETTE_METRICS_HOST=::1 passed the port check, and the server (IPv4 only) could not bind it:
    # every process ran without its metrics and probes, said in one warning of its log.
    server = serve(0, CollectorRegistry(), Readiness({}), "::1")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.server_address[1]}/livez", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_the_dispatchers_count_of_tasks_sent_takes_in_those_the_stale_sweep_sends_again(tmp_path):
    """palette_dispatcher_tasks{result="dispatched"} is every GPU task sent: a stalled job's tasks
    sent again by the sweep were left out (a lost queue's resend of every task counted nothing)."""
    from adapters.observability import collectors_for
    from adapters.settings import Settings
    from tests.unit.test_dispatcher_hardening import FakeQueue, dispatcher, envelope, queued_job

    job = queued_job(3)
    queue = FakeQueue(consumed={0: 0})
    d, producer, _ = dispatcher([envelope(job.id)], jobs=[job], queue=queue)
    registry = CollectorRegistry()
    for collector in collectors_for("dispatcher", d, Settings(data_dir=tmp_path), registry):
        registry.register(collector)
    d.step()
    queue.consumed[0] = 3  # the worker consumed every task, yet no item has a result
    assert d.sweep() == 3
    assert len(producer.tasks()) == 6
    assert _samples(registry)[("palette_dispatcher_tasks_total", (("result", "dispatched"),))] == 6


def test_connections_that_send_nothing_are_closed_and_bounded_on_the_probes_port(monkeypatch):
    """A connection to the metrics port that sent nothing held a thread and a descriptor for good:
    enough of them took every file descriptor of the process (its database and broker
    connections' too). Each is closed after REQUEST_TIMEOUT_S, and one past MAX_CONNECTIONS at once
    is answered a 503 and closed: closed unanswered, it was a miss of the supervisor's liveness
    probe, so whoever could reach the port held every slot and had the process restarted each minute."""
    import socket
    import time

    from adapters import observability
    from infra.stack import alive

    # Long enough that the fifth connection is accepted before the four time out (one thread
    # accepts them in the order they came, the four first: no wait is needed for that).
    monkeypatch.setattr(observability, "REQUEST_TIMEOUT_S", 2.0)
    monkeypatch.setattr(observability, "MAX_CONNECTIONS", 4)
    server = serve(0, CollectorRegistry(), Readiness({}))
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        for s in idle:
            s.sendall(b"GET /met")  # and no more
        with socket.create_connection(("127.0.0.1", port)) as past:
            past.sendall(b"GET /livez HTTP/1.0\r\n\r\n")
            past.settimeout(5)
            answer = b"".join(iter(lambda: past.recv(1000), b""))  # to its end: closed
            assert answer.startswith(b"HTTP/1.0 503 ")  # every slot is taken
        assert alive(f"http://127.0.0.1:{port}/livez")  # the process's own answer all the same
        started = time.monotonic()
        assert all(_closed(s) for s in idle)  # by the server, not by the test's 5 s
        assert time.monotonic() - started < 4
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            assert resp.status == 200  # their slots given back
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def _closed(conn: Any) -> bool:
    """Whether the server closed ``conn`` (an end of file, or a reset where it left what was sent
    unread) without answering, within 5 s."""
    conn.settimeout(5)
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_client_resetting_its_connection_to_the_probes_port_writes_nothing_to_the_log(capfd):
    """Each reset was a traceback of some 20 raw lines on the process's stderr (its log), no JSON
    record: a client chose how much, and what shape, the process logged."""
    import socket
    import struct
    import threading

    server = serve(0, CollectorRegistry(), Readiness({}))
    port = server.server_address[1]
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(b"GET /met")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
            assert resp.status == 200
        # every connection's thread done, its error handled (or printed), before stderr is read
        wait_until(lambda: not any(t.name.endswith("(process_request_thread)") for t in threading.enumerate()),
                   10, "the connections' threads to end")
    finally:
        server.shutdown()
        server.server_close()
    assert capfd.readouterr().err == ""


def test_connections_trickling_their_request_are_closed_and_leave_the_probes_answered(monkeypatch):
    """REQUEST_TIMEOUT_S bounded each read, not the request: MAX_CONNECTIONS clients sending a
    byte of their request now and then (each read within the timeout) held every slot for good,
    and every probe and scrape after them was closed unanswered (a /livez unanswered: the
    process taken for dead), where before the bound they were answered."""
    import contextlib
    import socket
    import threading

    from adapters import observability

    monkeypatch.setattr(observability, "REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(observability, "MAX_CONNECTIONS", 4)
    server = serve(0, CollectorRegistry(), Readiness({}))
    port = server.server_address[1]
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    stop = threading.Event()

    def trickle() -> None:  # a byte a connection every 0.2 s, well within the timeout
        while not stop.wait(0.2):
            for s in trickling:
                with contextlib.suppress(OSError):
                    s.sendall(b"x")

    def answered() -> bool:  # closed unanswered while the four hold every slot
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        # before: never, the four trickling for good; now once their request time is up (1 to 1.5 s)
        wait_until(answered, 10, "a /livez answered beside the trickling connections")
        assert sender.is_alive()  # the four still trickling all along
    finally:
        stop.set()
        sender.join()
        for s in trickling:
            s.close()
        server.shutdown()
        server.server_close()
