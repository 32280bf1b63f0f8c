"""The embedded stack: restarts lose nothing, crashed apps come back, bad set-ups fail in one line."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.bootstrap import embedded_stack
from adapters.settings import load_settings
from infra.supervisor import StackError
from tests.conftest import _free_port_block
from tests.waiting import wait_until


def test_a_broker_on_memory_storage_restarts_with_an_empty_log(stack):
    """What PALETTE_BROKER_STORAGE=memory promises, and all it promises: a restart forgets every
    message (the relay publishes again from the event store: tests/integration/test_broker_loss.py)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    assert stack.settings.broker_storage == "memory"
    bootstrap = stack.settings.effective_kafka_bootstrap
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    for i in range(20):
        producer.send(topic, value=f"m{i}".encode(), key=b"k")
    producer.flush()
    producer.close()
    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic) or ()]
    assert sum(probe.end_offsets(partitions).values()) > 0
    probe.close()

    stack.kill("broker")
    stack.supervisor.restart("broker")

    after = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    assert topic not in after.topics() or sum(after.end_offsets(partitions).values()) == 0
    after.close()


def test_the_s3_services_health_check_writes_to_the_running_seaweedfs_and_leaves_nothing(stack):
    from infra.stack import S3_HEALTH_KEY

    assert stack._s3_writes()
    listed = stack._s3().list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=S3_HEALTH_KEY)
    assert listed.get("KeyCount") == 0


def test_the_s3_services_health_check_purges_the_days_of_seaweedfs_change_log_past_a_week(stack):
    """SeaweedFS's filer logs every object written or deleted under /topics/.system/log, a folder a
    day, and weed mini never runs the script that purges it: it grew ~12 MB a 1,000 jobs in a soak,
    and ~5 MB a day from the health check alone."""
    import httpx

    from infra.stack import S3_META_LOG, S3_META_LOG_KEEP_DAYS, weed_ports

    log_url = f"http://127.0.0.1:{weed_ports(stack.settings.s3_port)['filer']}{S3_META_LOG}"
    today = datetime.now(UTC).date()
    old, kept = today - timedelta(days=S3_META_LOG_KEEP_DAYS + 1), today - timedelta(days=S3_META_LOG_KEEP_DAYS)
    for day in (old, kept):
        httpx.post(f"{log_url}/{day}/00-00.test", files={"file": ("00-00.test", b"change")}).raise_for_status()

    stack._next_meta_log_purge = 0.0
    assert stack._s3_writes()

    days = {e["FullPath"].rsplit("/", 1)[-1] for e in
            httpx.get(f"{log_url}/", headers={"Accept": "application/json"}).json()["Entries"]}
    httpx.delete(f"{log_url}/{kept}", params={"recursive": "true"})
    assert str(kept) in days
    assert str(old) not in days


def test_the_s3_services_health_check_purges_a_long_change_log_a_share_at_a_time(stack, monkeypatch):
    """A stack upgraded after a year holds ~360 days of change log past the week: deleting them all
    in one health check held `palette up`'s one loop (which restarts crashed services) for as long.
    A check deletes the days that fit its budget, one at least, and the next check goes on."""
    import time

    import httpx

    from infra import stack as embedded
    from infra.stack import S3_META_LOG, S3_META_LOG_KEEP_DAYS, weed_ports

    log_url = f"http://127.0.0.1:{weed_ports(stack.settings.s3_port)['filer']}{S3_META_LOG}"
    today = datetime.now(UTC).date()
    for age in (S3_META_LOG_KEEP_DAYS + 30, S3_META_LOG_KEEP_DAYS + 31):
        day = today - timedelta(days=age)
        httpx.post(f"{log_url}/{day}/00-00.test", files={"file": ("00-00.test", b"change")}).raise_for_status()

    def stale_days() -> set[str]:
        entries = httpx.get(f"{log_url}/", headers={"Accept": "application/json"}).json()["Entries"] or []
        days = {e["FullPath"].rsplit("/", 1)[-1] for e in entries}
        return {d for d in days if d < str(today - timedelta(days=S3_META_LOG_KEEP_DAYS))}

    monkeypatch.setattr(embedded, "S3_META_LOG_PURGE_BUDGET_S", 0.0)
    stack._next_meta_log_purge = 0.0
    before = stale_days()
    assert len(before) >= 2
    assert stack._s3_writes()
    assert len(stale_days()) == len(before) - 1
    while stale_days():
        assert stack._next_meta_log_purge <= time.monotonic()
        assert stack._s3_writes()
    assert stack._next_meta_log_purge > time.monotonic() + embedded.S3_META_LOG_PURGE_S / 2


def test_a_consumer_living_through_a_broker_restart_reads_the_new_log_from_its_start(stack):
    """A member keeps its position across the restart (kafka-python keeps it over a rebalance)
    and the memory broker answers a fetch past its new, shorter log with nothing: without reading
    the recreated topic from its start, this consumer would skip the messages sent after the
    restart until the new log grew past where it was (the GPU worker's silence in a chaos run)."""
    from kafka import KafkaProducer

    from adapters import kafka_io
    from infra.kafka_admin import ensure_topics

    bootstrap = stack.settings.effective_kafka_bootstrap
    topic = f"recreated-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], 2)

    def send(prefix: str, per_partition: int) -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
        for p in range(2):
            for i in range(per_partition):
                producer.send(topic, value=f"{prefix}{p}-{i}".encode(), partition=p)
        producer.flush()
        producer.close()

    consumer = kafka_io.consumer(stack.settings, f"g-{topic}", topic)
    received: list[bytes] = []

    def drain(expected: set[bytes]) -> bool:
        for batch in consumer.poll(200).values():
            received.extend(r.value for r in batch)
        consumer.commit()
        return expected <= set(received)

    try:
        send("old", 20)
        # The first poll joins the group: Tansu let a new member in after 5 s to over a minute
        # (as in test_broker_restart_tail); the join's time is not what this test is about.
        wait_until(lambda: drain({f"old{p}-{i}".encode() for p in range(2) for i in range(20)}),
                   timeout_s=180, what="the first messages")
        stack.kill("broker")
        stack.supervisor.restart("broker")
        ensure_topics(bootstrap, [topic], 2)
        send("new", 3)  # fewer than the consumer had read from each partition
        wait_until(lambda: drain({f"new{p}-{i}".encode() for p in range(2) for i in range(3)}),
                   timeout_s=60, what="the messages sent after the restart")
    finally:
        consumer.close()


def test_a_killed_application_process_is_restarted(apps):
    stack = apps
    before = stack.supervisor.pid("api")
    stack.kill("api")

    def restarted() -> bool:
        stack.supervisor.check()
        pid = stack.supervisor.pid("api")
        return pid is not None and pid != before and stack._api_ready()

    wait_until(restarted, what="the API to come back")


def test_a_taken_port_fails_in_one_line_and_leaves_nothing_running():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = Path(tempfile.mkdtemp(prefix="palette-port-"))
        settings = load_settings(data_dir=data_dir, pg_port=port, s3_port=39000, kafka_port=39100)
        stack = embedded_stack(settings)
        with pytest.raises(StackError, match=f"port {port} is already in use.*PALETTE_PG_PORT"):
            stack.start_infra()
        assert stack.supervisor.names() == []


def test_an_aws_profile_the_environment_names_and_no_file_holds_fails_in_one_line_before_anything_starts(
        tmp_path, monkeypatch):
    """An operator's shell exporting AWS_PROFILE (or HOME unset, so that no ~/.aws/config holds
    it): every S3 client of boto3 raised ProfileNotFound, which the S3 readiness probe took for
    "not yet", and `palette up` failed after a minute with SeaweedFS's last log lines as the reason."""
    monkeypatch.setenv("AWS_PROFILE", "palette-no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    settings = load_settings(env="development", data_dir=tmp_path / "data",
                             **_free_port_block(random.Random(os.getpid() + 5)))
    stack = embedded_stack(settings)
    try:
        with pytest.raises(StackError, match=r"^no S3 client can be made: ProfileNotFound: .*palette-no-such-profile"):
            stack.start_infra()
        assert stack.supervisor.names() == []
    finally:
        stack.stop()


def test_postgresql_refusing_the_probes_connection_is_named_at_the_timeout(monkeypatch):
    """PGSSLMODE=require in an operator's shell: libpq refused every connection to the embedded
    PostgreSQL (no SSL), the probe took that for "not yet", and the timeout quoted PostgreSQL's
    log ("database system is ready to accept connections") as the reason."""
    monkeypatch.setenv("PGSSLMODE", "require")
    top = Path(tempfile.mkdtemp(prefix="palette-ssl-"))
    top.chmod(0o755)  # root's PostgreSQL uses it: nothing made under /var/lib/palette to be left there
    settings = load_settings(env="development", data_dir=top / "data", pg_fsync=False,
                             **_free_port_block(random.Random(os.getpid() + 6)))
    stack = embedded_stack(settings)
    try:
        spec = stack._postgres_spec()
        spec.ready_timeout_s = 8
        with pytest.raises(StackError, match=r"^postgres not ready after 8s: its last probe: .*SSL"):
            stack.supervisor.start(spec)
    finally:
        stack.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_seaweedfs_starts_where_the_default_socket_paths_are_taken(tmp_path):
    """SeaweedFS's Unix sockets default to /tmp/seaweedfs-<name>-<port>.sock, which another user's
    stack on the same ports leaves behind and this user cannot remove: S3 then exited at start-up
    ("Failed to remove ... operation not permitted"). A directory holding a file is what root cannot
    remove either; the sockets now go in the stack's own directory."""
    from infra.stack import weed_ports

    settings = load_settings(env="development", data_dir=tmp_path / "data",
                             **_free_port_block(random.Random(os.getpid() + 2)))
    blocked = [Path(f"/tmp/seaweedfs-s3-{settings.s3_port}.sock"),
               Path(f"/tmp/seaweedfs-filer-{weed_ports(settings.s3_port)['filer']}.sock")]
    made = [path for path in blocked if not path.exists() and not path.is_symlink()]  # else: taken already
    stack = embedded_stack(settings)
    try:
        for path in made:
            path.mkdir()
            (path / "left-behind").write_text("")
        stack.supervisor.start(stack._weed_spec())  # ready once S3 lists buckets
        assert sorted(p.name for p in (tmp_path / "data" / "s3").glob("*.sock")) == ["filer.sock", "s3.sock"]
        assert all(path.is_dir() for path in made)  # what blocked the defaults is still there
    finally:
        stack.stop()
        for path in made:  # only what this test made: a path left by someone else is theirs
            shutil.rmtree(path, ignore_errors=True)


def test_seaweedfs_leaves_nothing_in_tmp(tmp_path):
    """`weed mini` binds its gRPC servers on /tmp/seaweedfs-<name>-grpc-<port>.sock, which no flag
    moves, and leaves the S3's and admin's: every run of a stack left two files in /tmp (five when
    killed). Its log went to files in /tmp too (glog's default), four more each run."""
    from infra.stack import weed_grpc_sockets

    settings = load_settings(env="development", data_dir=tmp_path / "data",
                             **_free_port_block(random.Random(os.getpid() + 4)))
    sockets = weed_grpc_sockets(settings.s3_port)
    if any(path.exists() and (not path.is_socket() or path.stat().st_uid != os.getuid()) for path in sockets):
        pytest.skip("another user or process holds one of these paths")
    stack = embedded_stack(settings)
    try:
        stack.supervisor.start(stack._weed_spec())
        pid = stack.supervisor.pid("s3")
        wait_until(lambda: all(path.is_socket() for path in sockets), 30, "SeaweedFS's gRPC sockets")
    finally:
        stack.stop()
    assert len(sockets) == 5 and not any(path.exists() for path in sockets)
    assert glob.glob(f"{tempfile.gettempdir()}/weed.*.{pid}") == []  # glog's files are named by pid


def test_a_checkout_deep_in_the_file_system_starts_its_stack():
    """A Unix socket's path holds at most 107 bytes: PostgreSQL's socket in a data directory
    ~100 characters deep ended its start ("could not create any Unix-domain sockets"). It now
    listens on loopback TCP only (which is all anything uses), and SeaweedFS's sockets go to the
    temporary directory. (Reachable by the postgres user, so that root's PostgreSQL uses it too.)"""
    top = Path(tempfile.mkdtemp(prefix="palette-deep-"))
    top.chmod(0o755)
    data_dir = top / ("d" * max(1, 100 - len(str(top)))) / ".palette"
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False,
                             **_free_port_block(random.Random(os.getpid() + 3)))
    stack = embedded_stack(settings)
    try:
        stack.start_infra()
        assert not (data_dir / "pg-elsewhere").exists()  # PostgreSQL's files are in the deep directory
    finally:
        stack.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_cli_reports_a_data_dir_under_a_file_without_a_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "up"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PALETTE_DATA_DIR": str(blocker / "sub")},
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and f"its parent {blocker} is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_an_invalid_setting_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "env"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PALETTE_DATA_DIR": str(tmp_path), "PALETTE_API_PORT": "http"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("palette env: invalid setting PALETTE_API_PORT")
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as another user only for root")
def test_root_starts_from_a_data_dir_postgres_cannot_reach(tmp_path):
    """A clone under /root (0700): PostgreSQL's files go where the postgres user can reach them;
    a data directory made afresh at the same path gets a fresh database, not the old one."""
    import psycopg

    from infra.stack import traversable_by

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    data_dir = home / "palette" / ".palette"
    assert not traversable_by(home, "postgres")
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False,
                             **_free_port_block(random.Random(os.getpid() + 1)))
    stack = embedded_stack(settings)
    elsewhere = None
    try:
        for fresh in (True, False):
            stack.start_infra()
            elsewhere = Path((data_dir / "pg-elsewhere").read_text().strip())
            assert traversable_by(elsewhere, "postgres") and (elsewhere / "pg" / "PG_VERSION").exists()
            assert (elsewhere / "data-dir").read_text() == f"{data_dir.resolve()}\n"  # whose files they are
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'left_behind'").fetchone()
                assert tables == (0,)  # the database the removed data directory had is gone
                if fresh:
                    conn.execute("CREATE TABLE left_behind (x int)")
            stack.stop()
            shutil.rmtree(data_dir)  # `make clean`
            data_dir.mkdir(parents=True)
    finally:
        stack.stop()
        if elsewhere is not None:
            shutil.rmtree(elsewhere, ignore_errors=True)


def test_application_processes_log_one_json_object_per_line(apps):
    """What `palette serve` writes (the files under the data directory keep it as written)."""
    import json

    lines = (apps.log_dir / "relay.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"ts", "level", "process", "logger", "msg"} <= r.keys() for r in records)
    assert any(r["process"] == "relay" and r["msg"].startswith("relay starting after position") for r in records)


def test_worker_processes_serve_metrics_and_probes(apps):
    """The relay's and the projector's ports, parsed as Prometheus parses them: counters move
    after a job is created; the read side's lag per model and the groups' lag are there."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from adapters import bootstrap
    from adapters.observability import port_of

    def scrape(process: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port_of(apps.settings, process)}/metrics",
                                        timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None  # the process is still starting
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    acked = ("palette_relay_events_total", (("result", "acknowledged"),))
    applied = ("palette_projector_events_total", (("result", "applied"),))
    latencies = ("palette_relay_commit_to_ack_seconds_count", ())
    relay_before = wait_until(lambda: scrape("relay"), what="the relay's metrics port")
    projector_before = wait_until(lambda: scrape("projector"), what="the projector's metrics port")
    container = bootstrap.build(apps.settings)
    try:
        container.service.register(f"metrics-{uuid.uuid4()}")
    finally:
        container.close()
    relay = wait_until(lambda: (m := scrape("relay")) and m[acked] > relay_before[acked] and m,
                       what="the relay's count to move")
    assert relay[latencies] > relay_before.get(latencies, 0)
    projector = wait_until(lambda: (m := scrape("projector")) and m[applied] > projector_before[applied] and m,
                           what="the projector's count to move")
    for model in ("users", "rules", "jobs_log", "job_items_log", "billing_events"):
        assert ("palette_read_model_lag_events", (("model", model),)) in projector
        assert ("palette_dead_letters", (("model", model),)) in projector
    assert ("palette_consumer_group_lag", (("group", "palette-projections"), ("topic", "palette.events"))) in projector
    # measured in the database at most every 10 s (the scrape may read the first measurement)
    assert projector[("palette_event_store_head_position", ())] >= projector[("palette_relay_position", ())] >= 0
    for probe in ("/livez", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port_of(apps.settings, 'projector')}{probe}",
                                    timeout=5) as r:
            assert r.status == 200


def test_webhook_metrics_read_the_delivery_tables(settings):
    """The webhooks process's families, from its tables (a pending delivery counts, and ages)."""
    import psycopg

    from adapters.observability import WebhookCollector
    from adapters.webhooks.store import ensure_schema

    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        ensure_schema(conn)
        endpoint = uuid.uuid4()
        conn.execute("INSERT INTO palette_webhooks.endpoints (id, user_id, url, events, secret) "
                     "VALUES (%s, %s, 'http://127.0.0.1:9/x', '{job.queued}', 's')", [endpoint, uuid.uuid4()])
        conn.execute("INSERT INTO palette_webhooks.deliveries (id, endpoint_id, message_id, job_id, version, "
                     "event_type, body, created_at) VALUES (%s, %s, 'msg_x_1', %s, 1, 'job.queued', '\\x7b7d', "
                     "now() - interval '1 hour')", [uuid.uuid4(), endpoint, uuid.uuid4()])
        try:
            samples = {(s.name, tuple(s.labels.items())): s.value
                       for family in WebhookCollector(settings.effective_database_url).collect()
                       for s in family.samples}
        finally:
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])
    assert samples[("palette_webhook_deliveries", (("status", "pending"),))] >= 1
    assert samples[("palette_webhook_oldest_pending_seconds", ())] >= 3600
    assert ("palette_webhook_endpoints_disabled", ()) in samples


def test_the_apis_readiness_names_postgresql_while_it_is_down_and_recovers(tmp_path):
    """A load balancer's view: /readyz is 503 naming postgres within 5 s of PostgreSQL stopping
    (each check at most 1 s old, 2 s to answer), and 200 again once it is back; /livez stays 200."""
    import httpx

    from tests.chaos import pg_stop_immediate

    data_dir = Path(tempfile.mkdtemp(prefix="palette-ready-"))
    data_dir.chmod(0o755)
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False, metrics_port=0,
                             **_free_port_block(random.Random(os.getpid() + 3)))
    stack = embedded_stack(settings)
    url = f"http://{settings.api_host}:{settings.api_port}"

    def ready() -> tuple[int, list[str]]:
        r = httpx.get(f"{url}/readyz", timeout=5)
        return r.status_code, r.json().get("failing", [])

    try:
        stack.start_infra()
        stack.start_apps(("api",))
        wait_until(lambda: ready() == (200, []), what="the API to be ready")
        pg_stop_immediate(stack)
        wait_until(lambda: ready() == (503, ["postgres"]), timeout_s=5, what="/readyz to name postgres")
        assert httpx.get(f"{url}/livez", timeout=5).status_code == 200  # alive all the same

        def back() -> bool:
            stack.supervisor.check()  # restarts PostgreSQL, as palette up does
            return ready() == (200, [])

        wait_until(back, timeout_s=90, what="/readyz to be 200 again")
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("form", ["PLAINTEXT://127.0.0.1:{port}", " 127.0.0.1:{port} ,127.0.0.1:1"])
def test_the_broker_probe_reads_a_bootstrap_as_the_kafka_clients_do(settings, form):
    """A bootstrap the clients take (a protocol prefix, spaces; a bracketed IPv6 address or a host
    without its port too) was cut at its last ':' by the probe alone: /health named the broker
    down for ever, and `palette up --external` ended on "api not ready"."""
    from kafka import KafkaAdminClient

    from infra.kafka_admin import broker_answers

    bootstrap = form.format(port=settings.kafka_port)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        assert admin.list_topics()  # the client takes it
    finally:
        admin.close()
    assert broker_answers(bootstrap)


def test_a_scrape_meeting_a_dead_event_store_connection_loses_the_read_side_families_not_the_scrape(
        settings, schema, conn):
    """The read side's lag reads the oldest unfolded event through the projector's event store,
    whose pool raises eventsourcing's errors, not psycopg's: a pooled connection PostgreSQL had
    closed (a restart, an idle timeout) failed the whole scrape, every other family with it, and
    printed a bare traceback into the projector's JSON log."""
    from prometheus_client import CollectorRegistry, generate_latest

    from adapters.bootstrap import event_store_env
    from adapters.observability import CountsCollector, ReadSideCollector
    from adapters.positions import PgPositions
    from adapters.system import RandomIds, SystemClock
    from application.executors import DirectExecutor
    from application.services import PaletteApplication, PaletteService
    from projections.log import LogReader
    from projections.schema import ensure_schema
    from tests.keys import process_keys

    ensure_schema(conn)
    PgPositions.connect(settings.effective_database_url).close()
    app = PaletteApplication(env=event_store_env(settings, pool_size=1, schema=schema))  # no projector folds it
    try:
        PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(), **process_keys()).register(
            f"scrape-{uuid.uuid4()}")  # an event no read model has folded
        with app.recorder.datastore.get_connection() as pooled:
            pid = pooled.info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        registry = CollectorRegistry()
        registry.register(ReadSideCollector(settings.effective_database_url, LogReader.of(app)))
        registry.register(CountsCollector("palette_projector_events", "events", "result", lambda: {"applied": 1}))
        scraped = generate_latest(registry).decode()
        assert 'palette_projector_events_total{result="applied"} 1.0' in scraped
        scraped = generate_latest(registry).decode()  # the next scrape, measured afresh, has them again
        assert 'palette_read_model_lag_events{model="users"}' in scraped
    finally:
        app.close()


def test_postgresql_stops_with_a_killed_supervisor_though_a_client_session_is_open():
    """`palette up` SIGKILLed (the OOM killer) sent PostgreSQL SIGTERM, its smart shutdown, which
    waits on every client session: one left open (an operator's psql) kept it running, refusing
    connections and holding its port, so the next `palette up` failed ("port ... is already in
    use") for as long as the session stayed. It gets its stop signal, SIGINT, as on Ctrl-C."""
    import psycopg

    from infra.supervisor import port_free

    top = Path(tempfile.mkdtemp(prefix="palette-orphan-"))
    top.chmod(0o755)  # root's PostgreSQL uses it: nothing made under /var/lib/palette to be left there
    ports = _free_port_block(random.Random(os.getpid() + 7))
    env = {**os.environ, "PALETTE_ENV": "development", "PALETTE_DATA_DIR": str(top / "data"),
           "PALETTE_PG_FSYNC": "false", **{f"PALETTE_{name.upper()}": str(port) for name, port in ports.items()}}
    standin = subprocess.Popen(  # `palette up` as far as PostgreSQL
        [sys.executable, "-c", "import time\nfrom adapters.bootstrap import embedded_stack\n"
         "from adapters.settings import load_settings\nstack = embedded_stack(load_settings())\n"
         "stack.supervisor.start(stack._postgres_spec())\nstack._ensure_database()\n"
         "print(stack.supervisor.pid('postgres'), flush=True)\ntime.sleep(600)"],
        env=env, stdout=subprocess.PIPE, text=True)
    postmaster = top / "data" / "pg" / "postmaster.pid"
    try:
        assert standin.stdout is not None and standin.stdout.readline().strip().isdigit()
        with psycopg.connect(load_settings(env="development", data_dir=top / "data", **ports).effective_database_url):
            standin.kill()
            standin.wait(timeout=30)
            wait_until(lambda: port_free(ports["pg_port"]) and not postmaster.exists(), timeout_s=30,
                       what="PostgreSQL to stop with its supervisor")
    finally:
        standin.kill()
        standin.wait(timeout=30)
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(postmaster.read_text().split()[0]), signal.SIGQUIT)
        shutil.rmtree(top, ignore_errors=True)
