"""When a failed delivery is tried again: a schedule of delays (``5s,5m,30m,2h,...``, the
setting ``PALETTE_WEBHOOK_RETRY_SCHEDULE``, each at most ten years), each drawn within +-20 %
(jitter, so the deliveries that failed together do not come back together); past its end the
delivery has failed."""

from __future__ import annotations

import re
from collections.abc import Callable

# Like Stripe's: the last retry about three days (71.6 h) after the first attempt.
DEFAULT_SCHEDULE = "5s,5m,30m,2h,5h,10h,14h,20h,20h"
JITTER = 0.2
MAX_RETRIES = 30
# The longest step: PostgreSQL adds it to now(), and one out of a timestamp's range (or infinite)
# failed the statement recording the attempt, which then went out again after every lease.
MAX_STEP_S = 10 * 365 * 86400.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STEP = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"5s,5m,2h"`` -> (5.0, 300.0, 7200.0); raises ValueError naming the bad step."""
    steps = []
    for part in text.split(","):
        match = _STEP.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{part.strip()!r} is not a delay like 5s, 5m, 2h or 1d")
        step = float(match[1]) * _UNITS[match[2]]
        if not step <= MAX_STEP_S:
            raise ValueError(f"{part.strip()!r} is longer than ten years")
        steps.append(step)
    if len(steps) > MAX_RETRIES:
        raise ValueError(f"at most {MAX_RETRIES} retries")
    return tuple(steps)


def retry_delay(schedule: tuple[float, ...], failures: int, draw: Callable[[], float]) -> float | None:
    """Seconds until the next try after ``failures`` failed tries in a row, jittered by
    ``draw()`` in [0, 1); None once the schedule is spent (the delivery has failed)."""
    if not 1 <= failures <= len(schedule):
        return None
    return schedule[failures - 1] * (1 - JITTER + 2 * JITTER * draw())
