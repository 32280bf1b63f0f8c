"""Shared fixtures. The embedded stack (same infra code as `palette up`) starts once per session,
on free loopback ports in a temporary directory, only when a test asks for it."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from adapters.bootstrap import embedded_stack
from adapters.settings import Settings, load_settings
from infra.config import unproxied_loopback
from infra.stack import PG_HOME, PG_OWNER, EmbeddedStack, embedded_ports
from infra.supervisor import port_free

# Hypothesis builds its table of Unicode characters on a machine's first text draw (~1.5 s on the
# 2-core CI machine), which its too_slow health check took for a slow strategy: on a fresh clone,
# whichever text-drawing property ran first could fail. Deadlines and the other checks stay.
hypothesis_settings.register_profile("palette", suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("palette")

# Behind a proxy (http_proxy set to reach the package registries), the tests' own clients of the
# stacks they start would ask it for 127.0.0.1, as `palette` did before its main took loopback out.
unproxied_loopback(os.environ)


# A port a test binds seconds after choosing it must sit below the kernel's ephemeral range: a
# client's connection made meanwhile (to PostgreSQL, the broker) can otherwise take it, and the
# server's bind fails with "address already in use" (seen once in CI, on a port from 40000-49000).
EPHEMERAL_LOW = 32768  # Linux's default ip_local_port_range starts here


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW


def _free_port_block(rng: random.Random) -> dict[str, int]:
    """Ports for one stack where every derived port (SeaweedFS neighbours, gRPC +10000) is free,
    all below the ephemeral range."""
    top = max(21010, min(29000, _ephemeral_low() - 10010))  # the highest derived port is base + 10009
    for _ in range(500):
        base = rng.randrange(21000, top, 10)
        candidate = {"pg_port": base, "kafka_port": base + 1, "api_port": base + 2, "s3_port": base + 3}
        probe = Settings(data_dir=Path("/nonexistent"), **candidate)  # type: ignore[arg-type]
        if all(port_free(p) for p in [*embedded_ports(probe).values(), candidate["api_port"]]):
            return candidate
    raise RuntimeError("no free port block found")


def _free_metrics_port(rng: random.Random) -> int:
    """A base for the worker processes' metrics ports (base + 1..6) where all of them are free."""
    for _ in range(500):
        base = rng.randrange(15000, 20000, 10)
        if all(port_free(base + offset) for offset in range(1, 7)):
            return base
    raise RuntimeError("no free metrics port block found")


def free_port(rng: random.Random | None = None) -> int:
    """One loopback port free now, for a server a test starts (10000-14999, below the ephemeral
    range, apart from the blocks above)."""
    rng = rng or random.Random()
    for _ in range(500):
        if port_free(port := rng.randrange(10000, 15000)):
            return port
    raise RuntimeError("no free port found")


RECORDS: list[str] = []  # every log record of the test process, formatted (scanned for secrets)


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        RECORDS.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def keep_log_records() -> Iterator[None]:
    handler = _Keep(level=logging.DEBUG)
    root = logging.getLogger()
    previous = root.level
    root.setLevel(min(previous, logging.INFO))
    root.addHandler(handler)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="session", autouse=True)
def no_database_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Root's PostgreSQL files for a data directory the postgres user cannot reach (a test's
    0700 tmp_path) go under PG_HOME, outside the data directory: those the session made for a
    data directory in its own temporary directory are removed at its end (39 MB a cluster was left
    there by every run), unless one still runs."""
    before = set(PG_HOME.iterdir()) if PG_HOME.is_dir() else set()
    yield
    for base in left_behind((set(PG_HOME.iterdir()) if PG_HOME.is_dir() else set()) - before,
                            tmp_path_factory.getbasetemp()):
        shutil.rmtree(base, ignore_errors=True)


def left_behind(bases: Iterable[Path], basetemp: Path) -> list[Path]:
    """Those of ``bases`` (PostgreSQL files under PG_HOME) of a data directory in this session's
    ``basetemp`` and not running. Only this session's: another session on the machine (a CI run
    beside a developer's) makes its own under PG_HOME meanwhile, for data directories in the same
    temporary directory, and one between its initdb and its start, or stopped to be started
    again, runs no PostgreSQL: removing it failed that session's test."""
    ours = basetemp.resolve()
    found = []
    for base in bases:
        try:
            owner = Path((base / PG_OWNER).read_text().strip())
        except OSError:
            continue  # not known to be a test's
        if owner.is_relative_to(ours) and not _postgres_runs(base / "pg"):
            found.append(base)
    return found


def _postgres_runs(pg: Path) -> bool:
    """Whether the postmaster.pid in ``pg`` names a live process (one a test killed leaves it)."""
    try:
        os.kill(int((pg / "postmaster.pid").read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@pytest.fixture(scope="session")
def stack() -> Iterator[EmbeddedStack]:
    data_dir = Path(tempfile.mkdtemp(prefix="palette-test-"))
    data_dir.chmod(0o755)  # PostgreSQL runs as another user and must traverse it
    ports = _free_port_block(random.Random(os.getpid()))
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False,
                             metrics_port=_free_metrics_port(random.Random(os.getpid())), **ports)
    s = embedded_stack(settings)
    s.start_infra()
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack: EmbeddedStack) -> Settings:
    return stack.settings


APP_PROCESSES = ("api", "relay", "projector")
GPU_PROCESSES = ("dispatcher", "gpu")


@pytest.fixture(scope="session")
def apps(stack: EmbeddedStack) -> EmbeddedStack:
    """API, relay and projector on the session's stack (started once, as `palette up` does).
    Without the GPU worker, tests stand in for it and their jobs stay where they put them."""
    missing = tuple(n for n in APP_PROCESSES if stack.supervisor.pid(n) is None)
    if missing:
        stack.start_apps(missing)
    return stack


@pytest.fixture(scope="module")
def gpu_apps(apps: EmbeddedStack) -> Iterator[EmbeddedStack]:
    """The dispatcher and the GPU worker too, for one module; stopped after it."""
    apps.start_apps(GPU_PROCESSES)
    yield apps
    for name in GPU_PROCESSES:
        apps.supervisor.stop(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the reliability suites report: what the simulations and attacks tried."""
    from tests import figures

    for line in figures.summary():
        terminalreporter.write_line(line)
