"""What every measure shares: the profiles, the embedded stack the run starts on free ports, an
in-process service per command path, and small helpers (percentile, peak memory, the machine)."""

from __future__ import annotations

import os
import platform
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from adapters.bootstrap import embedded_stack, event_store_env, executor
from adapters.settings import Settings, load_settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.plans import DEFAULT_PLANS, Plan
from infra.stack import EmbeddedStack
from tests.conftest import _free_port_block
from tests.keys import process_keys

Results = dict[str, Any]
Stack = EmbeddedStack[Settings]

EDITS = {"wall": {"action": "recolor", "value": "#5b7f95"}, "floor": {"action": "texture", "value": "wood"},
         "lamp": {"action": "remove", "value": ""}}
# Bench users may run many jobs at once: the plan limits are not what is measured.
PLANS = {**DEFAULT_PLANS, "bench": Plan("bench", initial_credits=10**9, max_concurrency=10**6, max_rule_slots=2)}


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
    catchup_events: int  # written while the projector is stopped
    http_seconds: float  # each wrk run
    http_repeats: int  # wrk runs per HTTP figure (their median)


CORE_CLIENTS = 96  # concurrent callers of the service in process (threads)
HTTP_CLIENTS = 64  # concurrent virtual users over HTTP
QUICK = Profile(repeats=3, core_seconds=3, http_sessions=200, hot_jobs=3, backlog_commands=4000,
                lag_seconds=5, naive_rebuild_events=1500, gpu_items=10, catchup_events=20000,
                http_seconds=5, http_repeats=2)
FULL = Profile(repeats=5, core_seconds=8, http_sessions=600, hot_jobs=5, backlog_commands=20000,
               lag_seconds=15, naive_rebuild_events=4000, gpu_items=24, catchup_events=100000,
               http_seconds=10, http_repeats=3)


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@contextmanager
def running_stack() -> Iterator[Stack]:
    """The embedded stack of `palette up` (``adapters.bootstrap.embedded_stack``), its
    infrastructure started on free ports in a temporary directory; stopped and removed after."""
    data_dir = Path(tempfile.mkdtemp(prefix="palette-bench-"))
    data_dir.chmod(0o755)  # PostgreSQL runs as another user and must traverse it
    # The load generators are one client address with up to 256 requests in flight (LATENCY_CLIENTS):
    # the API's limit per address (256) is not what a benchmark measures.
    settings = load_settings(env="development", data_dir=data_dir, api_max_connections_per_peer=4096,
                             **_free_port_block(random.Random(os.getpid())))
    stack = embedded_stack(settings)
    try:
        stack.start_infra()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def service_on(settings: Settings, schema: str, naive: bool) -> tuple[PaletteService, Callable[[], None]]:
    """The service in this process on the event store's ``schema``, with the executor that
    ``adapters.bootstrap.build`` gives each path ("direct" when ``naive``). Not ``build`` itself:
    the measures need a schema per path, the bench plan, and no object store (nothing is
    uploaded in process, so ``confirm_upload`` checks nothing)."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")  # a fixed identifier of this package
    app = PaletteApplication(env=event_store_env(settings, pool_size=8, schema=schema))
    runs = executor(app, "direct" if naive else "group")
    committer = runs if isinstance(runs, GroupCommitter) else None
    svc = PaletteService(app, runs, SystemClock(), RandomIds(), plans=PLANS, **process_keys())

    def close() -> None:
        if committer is not None:
            committer.stop()
        app.close()

    return svc, close


def rss_mb(pid: int | None) -> float | None:
    """A process's peak resident memory (VmHWM) in MB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _stat(proc: Path) -> list[str]:
    """The fields of /proc/<pid>/stat after the command's name (which may hold spaces)."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = _stat(Path(f"/proc/{pid}"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessTable:
    """One reading of /proc: each process's children, and its CPU seconds with those of the
    children it has reaped."""

    children: dict[int, list[int]]
    used: dict[int, float]

    @classmethod
    def read(cls) -> ProcessTable:
        tick = os.sysconf("SC_CLK_TCK")
        children: dict[int, list[int]] = {}
        used: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = _stat(entry)
            except OSError:
                continue  # gone meanwhile
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            used[pid] = sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        return cls(children, used)

    def tree_cpu_s(self, pid: int) -> float:
        """CPU seconds of a process, the children it has reaped and its live descendants (whose
        reaped children are theirs)."""
        total, frontier = 0.0, [pid]
        while frontier:
            p = frontier.pop()
            total += self.used.get(p, 0.0)
            frontier.extend(self.children.get(p, ()))
        return total


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its descendants, reaped or alive (PostgreSQL's backends,
    uvicorn's workers)."""
    return ProcessTable.read().tree_cpu_s(pid)


def services_cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each process the stack runs (with its descendants), by service: one
    reading of /proc for all of them."""
    table = ProcessTable.read()
    pids = {name: stack.supervisor.pid(name) for name in stack.supervisor.names()}
    return {name: table.tree_cpu_s(pid) for name, pid in pids.items() if pid is not None}


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
