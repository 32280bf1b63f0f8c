"""Scale-out on external services: PostgreSQL, the broker and S3 started on their own, then two
`palette up --external` instances on them (two APIs, two projectors in one group, two
dispatchers, two GPU workers, two relays of which one publishes). Clients alternate between the
APIs request by request (a job created on one is executed or canceled on the other, racing
the workers' results); afterwards every job settles once, nothing a client was told is lost,
and the read models equal both the aggregates and the fold of the log (``tests.chaos.verify``)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from adapters.bootstrap import embedded_stack
from adapters.settings import Settings, load_settings
from infra.stack import EmbeddedStack
from tests.chaos import APPS, Report, Workload, verify
from tests.conftest import _free_port_block, free_port

from .test_stack import wait_until

INSTANCES = 2
CLIENTS = 4
LOAD_S = 15.0


class Alternating:
    """An HTTP client that sends each request to the next API in turn."""

    def __init__(self, clients: list[httpx.Client]) -> None:
        self.clients = clients
        self.turn = 0

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        self.turn += 1
        return self.clients[self.turn % len(self.clients)].request(method, path, **kw)


class AlternatingLoad(Workload):
    def __init__(self, urls: list[str], report: Report, seed: int) -> None:
        super().__init__(urls[0], report, seed, think_s=0.3)
        self.urls = urls

    def run(self) -> None:
        clients = [httpx.Client(base_url=url, timeout=15) for url in self.urls]
        try:
            http: Any = Alternating(clients)
            while not self.stop.wait(self.rng.uniform(0, 2 * self.think_s)):
                self.session(http)
                with self.lock:
                    self.report.sessions += 1
        finally:
            for c in clients:
                c.close()


@pytest.fixture
def external() -> Iterator[tuple[Settings, EmbeddedStack]]:
    """The infrastructure alone, as if it were someone else's."""
    data_dir = Path(tempfile.mkdtemp(prefix="palette-external-"))
    data_dir.chmod(0o755)
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False,
                             **_free_port_block(random.Random(os.getpid() + 11)))
    stack = embedded_stack(settings)
    stack.start_infra()
    try:
        yield settings, stack
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_two_instances_on_external_services_keep_every_invariant(external):
    infra, _ = external
    rng = random.Random(os.getpid())
    shared = {**os.environ, **infra.as_env(), "PALETTE_PROJECTOR_SWEEP_S": "5", "PALETTE_DISPATCH_STALE_S": "20",
              "PALETTE_DEVICE": "cpu"}
    instances: list[tuple[subprocess.Popen[bytes], Settings, Path]] = []
    try:
        for n in range(INSTANCES):
            data_dir = Path(tempfile.mkdtemp(prefix=f"palette-instance{n}-"))
            env = {**shared, "PALETTE_DATA_DIR": str(data_dir), "PALETTE_API_PORT": str(free_port(rng)),
                   "PALETTE_METRICS_PORT": "0"}
            with (data_dir / "up.log").open("wb") as out:  # kept for the message should it not answer
                proc = subprocess.Popen(
                    [sys.executable, "-m", "adapters.cli", "up", "--external", "--apps", *APPS], env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            settings = infra.model_copy(update={"data_dir": data_dir, "api_port": int(env["PALETTE_API_PORT"])})
            instances.append((proc, settings, data_dir))
            _wait_healthy(f"http://127.0.0.1:{settings.api_port}/health", proc, data_dir, n)
        report = Report(minutes=LOAD_S / 60)
        load = AlternatingLoad([f"http://127.0.0.1:{s.api_port}" for _, s, _ in instances], report, seed=5)
        threads = [threading.Thread(target=load.run, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)  # the load's duration, not a synchronisation: verify waits on outcomes
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
        verify(SimpleNamespace(settings=instances[0][1]), load, report, print)  # type: ignore[arg-type]
        assert report.sessions >= CLIENTS and report.jobs > 0, report.summary()
        assert report.problems == [], report.summary() + "\n" + "\n".join(report.problems[:20])
        relay_logs = [(d / "logs" / "relay.log").read_text() for _, _, d in instances]
        assert sum("standing by" in text for text in relay_logs) == INSTANCES - 1  # one relay published
    finally:
        for proc, _, data_dir in instances:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(data_dir, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).json()["data"]["status"] == "ok"
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], data_dir: Path, n: int) -> None:
    """Wait for the instance's /health to say ok; if it does not within 180 s, fail with what it
    answered last, whether ``palette up`` still runs, and the end of its output."""
    try:
        wait_until(lambda: _healthy(url), timeout_s=180, what=f"instance {n} to answer")
    except AssertionError as e:
        try:
            last = httpx.get(url, timeout=5).text
        except httpx.HTTPError as error:
            last = repr(error)
        tail = (data_dir / "up.log").read_text(errors="replace")[-4000:]
        raise AssertionError(f"{e}; /health: {last[:500]}; palette up exit code: {proc.poll()}; "
                             f"its output ends:\n{tail}") from None

