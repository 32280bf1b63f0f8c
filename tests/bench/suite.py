"""The whole run, in order, on one embedded stack; then the report (`palette bench`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.bench.analytics import FULL_EVENTS, QUICK_EVENTS, bench_analytics
from tests.bench.api import bench_http
from tests.bench.audit import bench_audit_at_scale
from tests.bench.core import bench_core, make_backlog
from tests.bench.gpu import bench_gpu
from tests.bench.harness import FULL, QUICK, Results, machine, rss_mb, running_stack, say
from tests.bench.rebuild import bench_rebuild_and_replay
from tests.bench.recovery import bench_broker_restart, bench_catchup
from tests.bench.relay import bench_fast_lag, bench_lag, bench_relay, wait_drained
from tests.bench.report import judge, plot, table


def run(quick: bool) -> Results:
    prof = QUICK if quick else FULL
    results: Results = {"profile": "quick" if quick else "full", "machine": machine()}
    t0 = time.monotonic()
    say(f"starting an embedded stack ({results['profile']} profile)")
    with running_stack() as stack:
        results["machine"]["broker_storage"] = stack.settings.broker_storage  # what a broker restart loses
        bench_core(stack.settings, prof, results)
        bench_http(stack, prof, results)
        say(f"writing a backlog of ~{prof.backlog_commands:,} commands")
        make_backlog(stack.settings, prof.backlog_commands)
        bench_relay(stack.settings, prof, results)
        stack.start_apps(("relay", "projector"))
        wait_drained(stack.settings)
        bench_lag(stack, prof, results)
        for name in ("relay", "projector"):
            results.setdefault("peak_rss_mb", {})[name] = rss_mb(stack.supervisor.pid(name))
        bench_fast_lag(stack, prof, results)
        bench_catchup(stack, prof, results)
        bench_broker_restart(stack, results)
        stack.supervisor.stop("projector")
        stack.supervisor.stop("relay")
        bench_rebuild_and_replay(stack.settings, prof, results)
        bench_analytics(stack.settings, QUICK_EVENTS if quick else FULL_EVENTS, results)
        bench_gpu(stack, prof, results)
    results["seconds"] = round(time.monotonic() - t0, 1)
    judge(results)
    return results


def main(quick: bool, json_path: str | None, plot_path: str | None, audit_events: int | None = None) -> int:
    from adapters.cli import Terminated

    def interrupted(signum: int, _frame: object) -> None:
        raise Terminated(signum)  # Ctrl-C's unwinding through the stack's context (exit 143 from palette)

    signal.signal(signal.SIGTERM, interrupted)
    if audit_events:
        results = bench_audit_at_scale(audit_events)
        print(json.dumps(results, indent=2))
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2))
        return 0 if results.get("reconcile_ok") else 1
    results = run(quick)
    print(table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    if plot_path:
        plot(results, plot_path)
    return 0
