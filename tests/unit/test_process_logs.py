"""The processes' logs: httpx's line per request is not logged (adapters.logs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
