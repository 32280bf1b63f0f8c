"""The relay and lag measures on their own (not the whole `palette bench`): a fresh embedded stack
with a backlog, then ``--repeats`` rounds of ``bench_relay`` (throughput against a bare producer),
``bench_lag`` (commit -> jobs_log row at 500 events/s, and event -> ack on a second relay) and
``bench_fast_lag`` (the same at 2,000 events/s) through the stack's relay and projector processes.
Prints each round and the medians, for A/B comparisons of the read side's pipeline, with the CPU
the relay and projector processes used per event offered during the 2,000 events/s round.

    .venv/bin/python -m tests.bench.lag_direct --repeats 3 --seconds 5

``--py-spy DIR`` records the relay and projector processes during each 2,000 events/s round
(py-spy's raw folded stacks, one file per process and round)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
from pathlib import Path

from tests.bench.core import make_backlog
from tests.bench.harness import QUICK, Results, Stack, cpu_s, running_stack, say
from tests.bench.relay import FAST_LAG_EVENTS_PER_S, bench_fast_lag, bench_lag, bench_relay, wait_drained

FIGURES = ("relay_events_per_s", "raw_producer_events_per_s", "raw_kafka_python_events_per_s", "relay_p99_ms",
           "projection_lag_p50_ms", "projection_lag_p99_ms", "projection_lag_p50_ms_2000", "projection_lag_p99_ms_2000",
           "projection_lag_events_per_s_2000", "relay_cpu_ms_per_event_2000", "projector_cpu_ms_per_event_2000")


def recording(stack: Stack, out: Path, seconds: float, rep: int) -> list[subprocess.Popen[bytes]]:
    """py-spy on the relay and the projector for ``seconds``."""
    spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[2] / ".venv/bin/py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--format", "raw", "--rate", "200", "--duration", str(round(seconds)),
                              "--output", str(out / f"{name}-{rep}.txt"), "--pid", str(stack.supervisor.pid(name))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name in ("relay", "projector")]


def stack_cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) each of the relay and projector processes has used so far."""
    used = {}
    for name in ("relay", "projector"):
        pid = stack.supervisor.pid(name)
        if pid is None:
            raise RuntimeError(f"the {name} process is not running (see its log): the round is void")
        used[name] = cpu_s(pid)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=QUICK.lag_seconds, help="each lag round")
    parser.add_argument("--backlog-commands", type=int, default=QUICK.backlog_commands)
    parser.add_argument("--skip-throughput", action="store_true", help="no bench_relay rounds")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    prof = dataclasses.replace(QUICK, repeats=1, lag_seconds=args.seconds)
    rounds: list[Results] = []
    with running_stack() as stack:
        make_backlog(stack.settings, args.backlog_commands)
        stack.start_apps(("relay", "projector"))
        wait_drained(stack.settings)
        for rep in range(args.repeats):
            results: Results = {}
            if not args.skip_throughput:
                bench_relay(stack.settings, prof, results)
            bench_lag(stack, prof, results)
            spies = recording(stack, args.py_spy, args.seconds, rep) if args.py_spy else []
            before = stack_cpu_s(stack)
            bench_fast_lag(stack, prof, results)
            for name, used in stack_cpu_s(stack).items():  # per event offered at 2,000 events/s
                results[f"{name}_cpu_ms_per_event_2000"] = round(
                    1000 * (used - before[name]) / (FAST_LAG_EVENTS_PER_S * args.seconds), 3)
            for spy in spies:
                spy.wait()
            rounds.append(results)
            print(json.dumps({k: results.get(k) for k in FIGURES}), flush=True)
    medians = {k: statistics.median(v) for k in FIGURES
               if (v := [r[k] for r in rounds if r.get(k) is not None])}
    say(f"medians of {len(rounds)} round(s)")
    print(json.dumps({"medians": medians}), flush=True)


if __name__ == "__main__":
    main()
