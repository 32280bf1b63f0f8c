"""The processes' logs under the data directory's logs/ (infra.supervisor): a start-up failure
quotes the log's end, read without reading the file; httpx's line per request is not logged
(adapters.logs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.supervisor import TAIL_BYTES, ServiceSpec, StackError, Supervisor


def _bytes_read() -> int:
    """What this process has read through read(2) and the like so far (Linux's rchar)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def test_a_start_up_failure_quotes_the_end_of_a_large_log_reading_only_that_end(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    big = 50 * 2**20
    with open(logs / "svc.log", "wb") as f:
        f.write(b"an early line that is no part of the report\n")
        f.truncate(big)  # sparse: 50 MB that cost no disk
        f.seek(big)
        f.write(b"\nstarting\nRuntimeError: the disk is on fire\n")
    supervisor = Supervisor(logs)
    before = _bytes_read()
    try:
        with pytest.raises(StackError) as raised:
            supervisor.start(ServiceSpec("svc", ["/bin/sh", "-c", "exit 3"], ready=lambda: False))
    finally:
        supervisor.stop_all()
    read = _bytes_read() - before
    assert read < 4 * TAIL_BYTES, f"read {read} bytes of a {big}-byte log for its last lines"
    assert str(raised.value) == "svc exited during start-up: starting | RuntimeError: the disk is on fire"


def test_httpx_and_httpcore_log_no_line_per_request() -> None:
    """A process configured as `palette serve` configures it (the GPU worker posts a callback per
    item with httpx, and logs each itself): httpx's INFO line for each request is dropped."""
    code = ("import logging, httpx\n"
            "from adapters.logs import configure\n"
            "configure('gpu')\n"
            "client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))\n"
            "client.post('http://127.0.0.1:8000/internal/callbacks', json={})\n"
            "logging.getLogger('palette.gpu').info('item done')\n"
            "print(logging.getLogger('httpx').getEffectiveLevel(), "
            "logging.getLogger('httpcore.connection').getEffectiveLevel())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert [json.loads(line)["msg"] for line in done.stderr.splitlines()] == ["item done"]
    assert done.stdout.split() == ["30", "30"]  # WARNING
