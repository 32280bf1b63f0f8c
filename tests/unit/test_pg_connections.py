"""The embedded PostgreSQL takes as many connections as `palette up`'s API workers may hold: its
``max_connections`` was a fixed 200, which four workers' pools at their largest pass, so a stack
scaled with PALETTE_API_WORKERS was refused "too many clients" under load."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.api.app import API_POOL_SIZE
from adapters.api.idempotency import UNFLUSHED_CONNECTIONS
from adapters.bootstrap import EVENT_STORE_OVERFLOW
from adapters.loop_pg import LoopConnections
from infra.stack import PG_CONNECTIONS_BESIDE_API, EmbeddedStack


def api_worker_connections() -> int:
    """What one API process may hold, summed from its pools' sizes in the code."""
    loop_default = inspect.signature(LoopConnections).parameters["size"].default
    return API_POOL_SIZE + EVENT_STORE_OVERFLOW + API_POOL_SIZE + loop_default + UNFLUSHED_CONNECTIONS


def max_connections_started(tmp_path: Path, api_workers: int) -> int:
    settings = SimpleNamespace(data_dir=tmp_path / "data", pg_port=5433, pg_fsync=False, log_max_bytes=2**20,
                               log_keep=1, api_workers=api_workers)
    stack: Any = EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=["false"])
    stack._run_as = None
    pgdir = tmp_path / "data" / "pg"
    pgdir.mkdir(parents=True)
    (pgdir / "PG_VERSION").write_text("17\n")
    argv = [str(a) for a in stack._postgres_spec().argv]
    return int(next(a for a in argv if a.startswith("max_connections=")).split("=")[1])


@pytest.mark.parametrize("api_workers", [1, 2, 4, 64])
def test_the_embedded_postgres_holds_every_api_workers_pools(tmp_path: Path, api_workers: int) -> None:
    allowed = max_connections_started(tmp_path, api_workers)
    assert allowed - api_workers * api_worker_connections() >= PG_CONNECTIONS_BESIDE_API
    assert allowed >= 200  # one worker's stack keeps what it always had
