"""The live pipeline after a fault, on the stack's relay and projector processes: the projector
stopped while a backlog is written, then started (how fast it catches up through the broker),
and the broker SIGKILLed under steady load and restarted (until commit -> read model is back
under 100 ms). With the broker's log in memory (``broker_storage``, the default) the restarted
broker has forgotten every message and offset: the relay sees the loss and publishes again."""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from adapters.positions import RELAY_NAME
from tests.bench.audit import EVENTS_PER_COMMAND
from tests.bench.core import make_backlog
from tests.bench.harness import Profile, Results, Stack, percentile, say, service_on
from tests.bench.relay import EVENTS_TABLE, JobRows, steady_creates, wait_drained

RESTART_WARM_S = 2.0  # steady load before the kill
RESTART_LIMIT_S = 60.0  # watched after the kill; broker_restart_recovery_s is this when it never recovered
RECOVERED_MS = 100.0  # the lag bound
WINDOW_S = 1.0  # the window whose p99 lag must be under the bound ...
WINDOW_STEP_S = 0.1  # ... windows starting every 100 ms after the kill
WINDOW_MIN_JOBS = 10
PUBLISH_LIMIT_S = 120.0  # for the relay to publish the catch-up backlog
CATCHUP_LIMIT_S = 300.0  # for the projector to fold it


def _head(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(
        EVENTS_TABLE)).fetchone()
    return int(row[0]) if row else 0


def events_between(conn: psycopg.Connection[Any], after: int, upto: int) -> int:
    """The events stored at positions after ``after`` up to ``upto``: not ``upto - after``, as a
    rolled-back insert leaves its position unused."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE notification_id > %s AND notification_id <= %s").format(
        EVENTS_TABLE), [after, upto]).fetchone()
    return int(row[0]) if row else 0


def _relay_position(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT position FROM palette_relay.positions WHERE name = %s", [RELAY_NAME]).fetchone()
    return int(row[0]) if row else 0


def _positions(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {m: int(p) for m, p in conn.execute("SELECT model, position FROM palette_read.positions").fetchall()}


def _all_folded(conn: psycopg.Connection[Any]) -> bool:
    from projections.models import READ_MODELS
    from projections.store import unapplied

    return all(unapplied(conn, m, EVENTS_TABLE)[0] == 0 for m in READ_MODELS.values())


def bench_catchup(stack: Stack, prof: Profile, results: Results) -> None:
    """The projector stopped, ~``prof.catchup_events`` events written and published by the relay,
    the projector started: log events folded per second from its first fold (or its readiness,
    if sooner) until every read model has folded the whole log."""
    from projections.models import READ_MODELS

    settings = stack.settings
    url = settings.effective_database_url
    wait_drained(settings)
    stack.stop_app("projector")
    with psycopg.connect(url, autocommit=True) as conn:
        before = _head(conn)
        say(f"projector stopped; writing a backlog of ~{prof.catchup_events:,} events")
        make_backlog(settings, prof.catchup_events // EVENTS_PER_COMMAND)
        head = _head(conn)
        results["catchup_events"] = events = events_between(conn, before, head)
        deadline = time.monotonic() + PUBLISH_LIMIT_S
        while (published := _relay_position(conn)) < head and time.monotonic() < deadline:
            time.sleep(0.05)  # in the broker before the projector starts
        folded_before = _positions(conn)
    if published < head:
        # A relay that sees the broker lose messages publishes again from the oldest event the
        # stopped projector has not folded, and may never get to the head meanwhile.
        say(f"the relay did not publish the backlog within {PUBLISH_LIMIT_S:.0f}s (position {published:,} of "
            f"{head:,}): catch-up not measured")
        results["catchup_events_per_s"] = None
        stack.start_app("projector")
        return
    times: dict[str, float] = {}
    armed, failed = threading.Event(), []

    def watch() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                armed.set()
                end = time.monotonic() + CATCHUP_LIMIT_S
                while time.monotonic() < end:
                    positions = _positions(conn)
                    if "first" not in times and positions != folded_before:
                        times["first"] = time.time()
                    if all(positions.get(m, 0) >= head for m in READ_MODELS):
                        checked = time.time()  # the snapshot the check reads
                        if _all_folded(conn):
                            times["done"] = checked
                            return
                    time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            failed.append(e)
        finally:
            armed.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    armed.wait()
    started = time.time()
    stack.start_app("projector")
    ready = time.time()
    watcher.join(timeout=CATCHUP_LIMIT_S + 20)
    results["catchup_start_s"] = round(ready - started, 2)
    if "done" not in times:
        say(f"the projector did not fold the backlog within {CATCHUP_LIMIT_S:.0f}s "
            f"({failed[0] if failed else 'timed out'}): catch-up not measured")
        results["catchup_events_per_s"] = None
        return
    t0 = min(ready, times.get("first", ready))
    results["catchup_events_per_s"] = round(events / (times["done"] - t0), 1)
    say(f"projector catching up {events:,} events: {results['catchup_events_per_s']:,.0f} events/s over "
        f"{times['done'] - t0:.1f}s (its start-up, started -> ready: {results['catchup_start_s']}s)")


def recovered_after(kill_at: float, timeline: list[tuple[float, float]], until: float,
                    bound_ms: float = RECOVERED_MS) -> float | None:
    """Seconds from ``kill_at`` to the start of the first window (WINDOW_S long, starting every
    WINDOW_STEP_S from the kill, over commit times) holding WINDOW_MIN_JOBS jobs or more whose
    p99 lag is under ``bound_ms`` (RECOVERED_MS); only windows that end by ``until``. ``timeline``:
    (commit time, lag ms; inf when not seen), in commit order."""
    commits = [t for t, _ in timeline]
    step = 0
    while (start := kill_at + step * WINDOW_STEP_S) + WINDOW_S <= until:
        lags = [lag for _, lag in timeline[bisect.bisect_left(commits, start):
                                           bisect.bisect_left(commits, start + WINDOW_S)]]
        if len(lags) >= WINDOW_MIN_JOBS and percentile(lags, 99) < bound_ms:
            return round(start - kill_at, 2)
        step += 1
    return None


def back_to_steady(kill_at: float, timeline: list[tuple[float, float]],
                   until: float) -> tuple[float, float | None] | None:
    """The steady p99 lag before the kill (the jobs committed from RESTART_WARM_S before it to a
    second before it: those of the last second meet the kill), and the seconds from the kill to
    the first window (as ``recovered_after``'s) whose p99 is at or under max(that, RECOVERED_MS);
    None when no job was committed in that steady second."""
    steady = [lag for t, lag in timeline if kill_at - RESTART_WARM_S <= t < kill_at - 1]
    if not steady:
        return None
    before = percentile(steady, 99)
    # At or under the bound: recovered_after keeps a p99 under its bound, and the next float up
    # is the least bound a p99 equal to this one is under.
    bound = math.nextafter(max(before, RECOVERED_MS), math.inf)
    return before, recovered_after(kill_at, timeline, until, bound_ms=bound)


def bench_broker_restart(stack: Stack, results: Results) -> None:
    """Steady job creations (the lag measurement's load); the broker SIGKILLed and restarted;
    seconds from the kill until commit -> jobs_log row is back under RECOVERED_MS."""
    settings = stack.settings
    url = settings.effective_database_url
    wait_drained(settings)
    with psycopg.connect(url, autocommit=True) as conn:
        losses = conn.execute("SELECT count(*) FROM palette_relay.broker_losses").fetchone()
    svc, close = service_on(settings, "public", naive=False)
    rows = JobRows(settings)
    stop = threading.Event()
    rate: list[float] = []
    load = threading.Thread(target=lambda: rate.append(
        steady_creates(svc, RESTART_WARM_S + RESTART_LIMIT_S + 5, rows.commit, stop=stop)), daemon=True)
    restarted: list[str] = []
    try:
        load.start()
        time.sleep(RESTART_WARM_S)
        kill_at = time.time()
        stack.kill("broker")
        stack.supervisor.restart("broker")
        ready_s = time.time() - kill_at
        recovered = None
        stop_at = kill_at + RESTART_LIMIT_S
        while time.time() < stop_at:
            restarted += stack.supervisor.check()  # the relay or the projector, had one crashed
            if recovered is None:
                # A job not seen RECOVERED_MS after its commit is over the bound already.
                recovered = recovered_after(kill_at, rows.timeline(), time.time() - 2 * RECOVERED_MS / 1000)
                if recovered is not None:
                    stop_at = min(stop_at, time.time() + 1)
            time.sleep(0.1)
        stop.set()
        load.join(timeout=60)
        rows.close()
    finally:
        stop.set()
        close()
    stack.ensure_topics()  # the restarted broker has forgotten every topic the stack made
    with psycopg.connect(url, autocommit=True) as conn:
        after = conn.execute("SELECT count(*) FROM palette_relay.broker_losses").fetchone()
    results["broker_restart_recovered"] = recovered is not None
    results["broker_restart_recovery_s"] = recovered if recovered is not None else RESTART_LIMIT_S
    results["broker_restart_ready_s"] = round(ready_s, 2)
    results["broker_restart_losses"] = (after[0] if after else 0) - (losses[0] if losses else 0)
    results["broker_restart_events_per_s"] = round(rate[0], 1) if rate else None
    timeline = rows.timeline()
    after_kill = [lag for t, lag in timeline if t >= kill_at]
    worst = max((lag for lag in after_kill if lag != math.inf), default=0.0)
    unseen = sum(1 for lag in after_kill if lag == math.inf)
    say(f"broker ({settings.broker_storage}) killed and restarted under "
        f"{results['broker_restart_events_per_s']} events/s: answering again after {ready_s:.1f}s, commit -> "
        f"jobs_log back under {RECOVERED_MS:.0f} ms after "
        f"{recovered if recovered is not None else f'more than {RESTART_LIMIT_S:.0f}'}s; worst lag after the kill "
        f"{worst:.0f} ms ({unseen} rows never seen); losses recorded {results['broker_restart_losses']}"
        f"{'; restarted ' + ', '.join(restarted) if restarted else ''}")
    # Diagnostics: how the lag went back to what it was before the kill (the load's steady p99,
    # from its start to a second before the kill: the jobs of the last second meet the kill).
    steadied = back_to_steady(kill_at, timeline, min(time.time(), kill_at + RESTART_LIMIT_S))
    if steadied is not None:
        before, back = steadied
        results["broker_restart_steady_p99_ms"] = round(before, 1)
        results["broker_restart_back_to_steady_s"] = back
        say(f"steady p99 before the kill {before:.0f} ms; a 1 s window back at or under it after "
            f"{back if back is not None else f'more than {RESTART_LIMIT_S:.0f}'}s")
    say(f"commit -> jobs_log p99 by second of commit from the kill: {_seconds_after(kill_at, timeline)}")


def _seconds_after(kill_at: float, timeline: list[tuple[float, float]], seconds: int = 15) -> str:
    """The p99 lag (ms; "-" when some row was never seen) of the jobs committed in each second
    around ``kill_at`` (the steady load's before it, then ``seconds`` after): where the recovery
    spends its time."""
    cells = []
    for s in range(-int(RESTART_WARM_S), seconds):
        lags = [lag for t, lag in timeline if kill_at + s <= t < kill_at + s + 1]
        p99 = percentile(lags, 99) if lags else None
        cells.append(f"{s}s:{'-' if p99 is None or p99 == math.inf else round(p99)}")
    return " ".join(cells)
