"""`palette serve api` with PALETTE_API_WORKERS=2 on the session's stack: one metrics port adds
up what both worker processes count, and every line either writes is a JSON object."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters.bootstrap import open_event_store
from adapters.settings import Settings
from domain.contracts import trace as contract
from projections.rebuild import iter_envelopes
from tests.conftest import free_port
from tests.integration.test_stack import wait_until

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 40


def _worker_pids(log: Path) -> set[int]:
    found = set()
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)  # every line: a JSON object
        if match := re.fullmatch(r"API worker process (\d+) serving", entry["msg"]):
            found.add(int(match.group(1)))
    return found


def test_two_api_workers_add_up_on_one_metrics_port_and_each_logs_json_lines(stack, tmp_path):
    api_port, metrics_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    env = {**os.environ, **stack.settings.as_env(), "PALETTE_API_PORT": str(api_port),
           "PALETTE_METRICS_PORT": str(metrics_port), "PALETTE_API_WORKERS": "2", "PALETTE_DATA_DIR": str(data_dir)}
    stale = data_dir / "api-metrics" / "counter_1.db"  # a previous run's file: removed at start
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a metrics file")
    log = tmp_path / "api.log"
    with log.open("wb") as err:
        server = subprocess.Popen([sys.executable, "-m", "adapters.cli", "serve", "api"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{api_port}"
        pids = wait_until(lambda: len(p := _worker_pids(log)) == 2 and p, timeout_s=60,
                          what="both API worker processes to serve")
        wait_until(lambda: server.poll() is None and _answers(f"{url}/livez"), what="the API to answer")
        for _ in range(REQUESTS):  # a connection each: the two processes take them as they accept
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert _registrations_traced(stack.settings, url)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        health = ("palette_http_requests_total", (("method", "GET"), ("route", "/health"), ("status", "200")))
        assert samples[health] == REQUESTS  # whichever process served each
        assert ("palette_group_commit_total", (("kind", "commands"),)) in samples
        written = {int(m.group(1)) for f in (data_dir / "api-metrics").iterdir()
                   if (m := re.fullmatch(r"\w+_(\d+)\.db", f.name))}
        assert written == pids  # each worker counts into the shared directory; the stale file is gone
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0
    _worker_pids(log)  # every line the processes wrote, to the end, parses


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _registrations_traced(settings: Settings, url: str) -> bool:
    """Users registered through the two processes: each one's event stored with a trace of its own
    (each worker process has its tracer: without one, a request outside any trace has none)."""
    store = open_event_store(settings, pool_size=1)
    try:
        before = store.recorder.max_notification_id() or 0
        users = []
        for _ in range(4):
            r = httpx.post(f"{url}/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"}, timeout=10)
            assert r.status_code == 201, r.text
            users.append(r.json()["data"]["user_id"])
        traces = {str(e.stream_id): e.trace for e in iter_envelopes(store.recorder, store.mapper.transcoder,
                                                                    before + 1, None) if str(e.stream_id) in users}
    finally:
        store.close()
    assert sorted(traces) == sorted(users)
    assert len({contract.trace_id(t) for t in traces.values()} - {""}) == len(users)
    return True
