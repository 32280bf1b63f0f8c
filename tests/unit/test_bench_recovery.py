"""The broker-restart figures' windows (tests.bench.recovery): what broker_restart_recovery_s and
broker_restart_back_to_steady_s are computed from, as their labels in tests/bench/report.py say."""

from __future__ import annotations

import math

from tests.bench.recovery import RECOVERED_MS, RESTART_WARM_S, WINDOW_MIN_JOBS, back_to_steady, recovered_after

KILL = 1000.0


def _jobs(start: float, seconds: float, lag_ms: float, per_s: int = 50) -> list[tuple[float, float]]:
    """(commit time, lag) of jobs committed at ``per_s`` from ``start`` for ``seconds``."""
    return [(start + i / per_s, lag_ms) for i in range(round(seconds * per_s))]


def test_back_to_steady_takes_a_window_at_or_under_the_bound_and_none_over_it() -> None:
    steady = _jobs(KILL - RESTART_WARM_S, RESTART_WARM_S, 40.0)  # a steady p99 under RECOVERED_MS
    just_over = steady + _jobs(KILL, 5, RECOVERED_MS + 0.5)
    assert back_to_steady(KILL, just_over, KILL + 5) == (40.0, None)  # 100.5 ms is not at or under 100
    at = steady + _jobs(KILL, 5, RECOVERED_MS)
    assert back_to_steady(KILL, at, KILL + 5) == (40.0, 0.0)


def test_back_to_steady_is_bounded_by_a_slower_steady_p99() -> None:
    steady = _jobs(KILL - RESTART_WARM_S, RESTART_WARM_S, 150.0)
    timeline = steady + _jobs(KILL, 3, 400.0) + _jobs(KILL + 3, 3, 150.0)
    before, back = back_to_steady(KILL, timeline, KILL + 6) or (None, None)
    assert before == 150.0 and back is not None and math.isclose(back, 3.0)
    assert back_to_steady(KILL, _jobs(KILL, 3, 10.0), KILL + 3) is None  # nothing steady to compare


def test_a_row_never_seen_keeps_its_window_over_the_bound() -> None:
    window = _jobs(KILL, 1, 10.0, per_s=WINDOW_MIN_JOBS * 10)
    window[5] = (window[5][0], math.inf)  # 1 of 100: the p99 is the worst but one
    assert recovered_after(KILL, window, KILL + 1) == 0.0
    window[6] = (window[6][0], math.inf)
    assert recovered_after(KILL, window, KILL + 1) is None
