"""PALETTE_API_WORKERS=2: two API processes on one port, each with its own group committer and
cache, against the session's stack. Commands on one stream from both lose nothing (a conflict
reloads and decides again), and reads stay strongly consistent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from infra.stack import EmbeddedStack
from tests.conftest import free_port

from .conftest import Client
from .test_lifecycle import callback, create_uploaded_job

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 40  # results posted at once into one job (the free plan's credits allow 50)


@pytest.fixture(scope="module")
def workers_url(apps: EmbeddedStack) -> Iterator[str]:
    """`palette serve api` with PALETTE_API_WORKERS=2 on a port of its own."""
    port = free_port()
    env = {**os.environ, **apps.settings.as_env(), "PALETTE_API_WORKERS": "2", "PALETTE_API_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "adapters.cli", "serve", "api"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the API workers did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _process_prefix(response: httpx.Response) -> str:
    # Request ids are a random prefix per process and a counter (adapters.api.envelope.RequestIds).
    request_id: str = response.json()["meta"]["request_id"]
    return request_id[:8]


def test_both_processes_answer_on_the_one_port(workers_url: str) -> None:
    seen: set[str] = set()
    for _ in range(200):  # new connections until both processes have answered one
        with httpx.Client(base_url=workers_url) as http:
            seen.add(_process_prefix(http.get("/health")))
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_results_posted_at_once_through_both_processes_are_all_recorded(workers_url, settings):
    with httpx.Client(base_url=workers_url, timeout=60) as http:
        client = Client(http)
        job_id = create_uploaded_job(client, ITEMS)
        assert client.data("POST", f"/jobs/{job_id}/execute",
                           json={"concepts": {"wall": {"action": "tone", "value": "warm"}}})["status"] == "queued"

    def post(idx: int) -> tuple[int, str]:
        with httpx.Client(base_url=workers_url, timeout=60) as own:  # a connection each: both processes
            r = callback(own, settings.callback_secret, job_id,
                         {"idx": idx, "status": "failed", "idempotency_key": f"{job_id}:{idx}", "error": "x"})
            return r.status_code, r.json()["data"]["outcome"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(ITEMS) as pool:
        answers = list(pool.map(post, range(ITEMS)))
    assert answers == [(200, "recorded")] * ITEMS

    for _ in range(4):  # each read, on a new connection (either process), sees every result and the refund
        with httpx.Client(base_url=workers_url, timeout=60, headers=client.headers) as http:
            job = http.get(f"/jobs/{job_id}").json()["data"]
            me = http.get("/me").json()["data"]
        assert job["progress"] == {"done": 0, "failed": ITEMS, "total": ITEMS}
        assert (me["credits"], me["reserved"], me["active_jobs"]) == (50, 0, 0)


def test_a_job_created_through_one_process_is_listed_at_once_by_the_other(apps: EmbeddedStack,
                                                                        workers_url: str) -> None:
    """Read-your-writes across the processes (adapters.api.sibling_writes): with the projector
    stopped, the other process lists the new job only because it heard of the write."""
    apps.stop_app("projector")
    try:
        with httpx.Client(base_url=workers_url, timeout=30) as http:
            client = Client(http)
            created = client.call("POST", "/jobs", json={"preset": "interior", "item_count": 1})
        assert created.status_code == 201, created.text
        maker, job = _process_prefix(created), created.json()["data"]["job_id"]
        for _ in range(200):  # new connections until the other process answers
            with httpx.Client(base_url=workers_url, timeout=30, headers=client.headers) as own:
                listed = own.get("/jobs")
            if _process_prefix(listed) != maker:
                break
        assert _process_prefix(listed) != maker
        body = listed.json()
        assert [j["job_id"] for j in body["data"]["items"]] == [job]
        assert body["meta"]["projection_behind"] == 1
    finally:
        apps.start_app("projector")
