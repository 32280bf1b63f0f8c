"""The benchmark harness (`palette bench`, `make bench`, `python -m tests.bench`): every
performance goal measured next to a naive baseline in one run, on an embedded stack it starts on
free ports; figures are medians over repeats.

It lives with the tests, outside the installed packages, and wires nothing itself: the stack,
the executors, the relay and the GPU worker come from ``adapters.bootstrap``, the callbacks are
signed by ``domain.contracts.callback``, and the naive API is `palette serve api --naive`.

- ``harness``: profiles, the stack, an in-process service per command path, helpers
- ``core``: commands in process (mixed sessions, one hot stream)
- ``api``: the HTTP API, peak and latency
- ``relay``: relay throughput, commit -> read model (at 500 and 2,000 events/s) and event -> broker
  ack on live traffic
- ``recovery``: the projector catching up after a restart, the broker SIGKILLed and restarted
- ``rebuild``: rebuild and replay over the whole log
- ``gpu``: the GPU worker against one item at a time
- ``analytics``: the analysts' Parquet export over a generated log, and its size against JSON lines
- ``quality``: ``--quality``, every edit against ground truth on generated scenes (``scenes``)
- ``webhooks``: ``python -m tests.bench.webhooks``, commit -> webhook receipt at 200 jobs/min
- ``audit``: ``--audit-events N``, the auditors' tools over a large log
- ``report``: goals, what each figure measures, table and chart; ``suite``: the run
"""

from __future__ import annotations

from tests.bench.suite import main

__all__ = ["main"]
