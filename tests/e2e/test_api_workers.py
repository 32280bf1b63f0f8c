"""PALETTE_API_WORKERS=2: two API processes on one port, each with its own group committer and
cache, against the session's stack. Commands on one stream from both lose nothing (a conflict
reloads and decides again), and reads stay strongly consistent; a client's open event stream does
not keep `palette serve api` from stopping."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from adapters.api.http_limits import GRACEFUL_SHUTDOWN_S
from infra.stack import EmbeddedStack
from infra.supervisor import port_free
from tests.conftest import free_port
from tests.waiting import wait_until

from .conftest import Client
from .test_lifecycle import callback, create_uploaded_job

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 40  # results posted at once into one job (the free plan's credits allow 50)


def _serve_api(apps: EmbeddedStack, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """`palette serve api` with PALETTE_API_WORKERS=``workers`` on a port of its own, answering."""
    port = free_port()
    env = {**os.environ, **apps.settings.as_env(), "PALETTE_API_WORKERS": str(workers), "PALETTE_API_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "adapters.cli", "serve", "api"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert proc.poll() is None, "the API exited as it started"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answering, timeout_s=60, what="the API workers to answer")
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, url


@pytest.fixture(scope="module")
def workers_url(apps: EmbeddedStack) -> Iterator[str]:
    proc, url = _serve_api(apps, 2)
    try:
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


@pytest.mark.parametrize("workers", [1, 2])
def test_an_open_event_stream_does_not_hold_up_a_stop(apps: EmbeddedStack, workers: int) -> None:
    """SIGTERM with a client's event stream open on a job still waiting: uvicorn waited for every
    response to end, and a stream ends after 10 minutes (the parent joins its workers without a
    bound), so `palette serve api` outlived the supervisor's 20 s and was SIGKILLed, its queued
    commands and shutdown lost. The server gives running responses GRACEFUL_SHUTDOWN_S, then ends them."""
    proc, url = _serve_api(apps, workers)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            client = Client(http)
            job = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
        opened, ended = threading.Event(), threading.Event()

        def listen() -> None:
            with contextlib.suppress(httpx.HTTPError), \
                    httpx.Client(base_url=url, timeout=120, headers=client.headers) as own, \
                    own.stream("GET", f"/jobs/{job}/events") as stream:
                assert stream.status_code == 200
                opened.set()
                for _ in stream.iter_lines():
                    pass
            ended.set()

        threading.Thread(target=listen, daemon=True).start()
        assert opened.wait(30)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=GRACEFUL_SHUTDOWN_S + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still serving {GRACEFUL_SHUTDOWN_S + 10:g} s after SIGTERM") from None
        assert code in (0, -signal.SIGTERM)  # one process: uvicorn, shut down, raises the signal again
        assert ended.wait(5)  # the stream ended: its client reconnects with Last-Event-ID
        assert time.monotonic() - stopping >= GRACEFUL_SHUTDOWN_S - 1  # the stream had its grace
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too
            proc.wait(timeout=30)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


def test_the_workers_of_a_killed_parent_stop_and_leave_the_port_to_the_next(apps: EmbeddedStack) -> None:
    """`palette serve api` SIGKILLed (the OOM killer; its supervisor restarts it): its workers went on
    serving the port without it, so each restart exited with "Address already in use", for good,
    and the workers outlived `palette up`. They stop as their parent dies."""
    proc, url = _serve_api(apps, 2)
    workers = wait_until(lambda: len(found := _children(proc.pid)) >= 2 and found, timeout_s=30, what="the workers")
    try:
        proc.kill()
        proc.wait(timeout=30)
        wait_until(lambda: not any(_running(w) for w in workers), timeout_s=GRACEFUL_SHUTDOWN_S + 20,
                   what="the orphaned workers to stop")
        assert port_free(int(url.rpartition(":")[2]))
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
