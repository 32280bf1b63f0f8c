"""A served process's collector (adapters.collector.serving_gc), checked in a fresh interpreter:
the suite's own process keeps CPython's defaults."""

from __future__ import annotations

import json
import subprocess
import sys

from adapters.collector import GC_THRESHOLDS

PROBE = """
import gc, json
from adapters.collector import serving_gc
before = gc.get_threshold()
kept = [[i] for i in range(1000)]  # made at start-up: frozen with the rest
serving_gc()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "young": gc.get_count()[0], "kept": len(kept)}))
"""


def test_serving_gc_freezes_the_start_up_heap_and_sets_the_server_thresholds() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    probe = json.loads(out)
    assert tuple(probe["before"]) == (700, 10, 10)  # CPython's defaults: the call changed them
    assert tuple(probe["after"]) == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700
    assert probe["frozen"] >= 1000  # start-up's objects (the 1,000 lists at least) are frozen
    assert probe["young"] < 50  # collected before freezing: nothing young left behind
