"""``bench_catchup`` on its own (not the whole `palette bench`): a fresh embedded stack, the relay
and the projector started, then ``--repeats`` rounds of the catch-up measure (projector stopped,
``--events`` written and published, projector started, timed until every read model has folded
the whole log). Prints each round and the median.

    .venv/bin/python -m tests.bench.catchup_direct --events 100000 --repeats 3

``PALETTE_PROJECTOR_CATCHUP_EVENTS=0`` in the environment selects the old path (Kafka only)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from tests.bench.core import make_backlog
from tests.bench.harness import FULL, Results, running_stack, say
from tests.bench.recovery import bench_catchup
from tests.bench.relay import wait_drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-commands", type=int, default=2000)
    args = parser.parse_args()
    prof = dataclasses.replace(FULL, catchup_events=args.events)
    rates: list[float] = []
    with running_stack() as stack:
        say(f"catch-up threshold: {stack.settings.projector_catchup_events} events (0: Kafka only)")
        make_backlog(stack.settings, args.warm_commands)
        stack.start_apps(("relay", "projector"))
        wait_drained(stack.settings)
        for _ in range(args.repeats):
            results: Results = {}
            bench_catchup(stack, prof, results)
            print(json.dumps(results), flush=True)
            if results.get("catchup_events_per_s"):
                rates.append(results["catchup_events_per_s"])
    print(json.dumps({"rates": rates, "median": statistics.median(rates) if rates else None}), flush=True)


if __name__ == "__main__":
    main()
