"""The sender: claims due deliveries and posts them, signed, from a pool of threads.

A claim leases the delivery (its next try moved ``lease_s`` ahead) before the POST, and the
attempt is recorded after it: a process killed in between leaves the delivery due again once the
lease runs out, and it goes out again under the same ``webhook-id`` (at least once). Later
deliveries of the same job to the same endpoint wait while an earlier one is pending, so a
receiver sees a job's events in order. The consumer wakes the sender after recording; without a
wake it looks for due retries every ``poll_s``.

No user's endpoints take the threads from everyone else's: at most ``PER_USER_IN_FLIGHT`` of one
user's deliveries are in flight at once in this process, and an endpoint whose attempt failed is
held (none of its deliveries tried) for the retry schedule's delay after as many failures in a
row, or for the wait a 429 or 503 answer asked for in its Retry-After when that is longer, at
most ``HOLD_MAX_S``: an endpoint that hangs costs one attempt per step, not one per delivery
queued for it, and one that recovers is tried again within half an hour. A 410 (Gone) disables
the endpoint at once, as the failures of ``disable_after`` would. Nor do several
users' endpoints together: attempts to suspect endpoints (never succeeded, or failing now) take at
most the threads but ``proven_reserve``'s, so endpoints that answer always have those.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import httpx
from psycopg_pool import ConnectionPool

from adapters.webhooks import store, targets
from adapters.webhooks.retries import retry_delay
from adapters.webhooks.signing import signed_headers

log = logging.getLogger("palette.webhooks")
PRUNE_EVERY_S = 3600.0
PRUNE_PAGE = 5000
LEASE_S = 3 * targets.TIMEOUT_S  # well past an attempt's deadline (targets.post)
PER_USER_IN_FLIGHT = 2
HOLD_MAX_S = 1800.0


def proven_reserve(workers: int) -> int:
    """The sender threads that only endpoints which answered, and are not failing, may take: a
    quarter, at least one (none of a single thread)."""
    return max(1, workers // 4) if workers > 1 else 0


class WebhookSender:
    def __init__(self, pool: ConnectionPool[Any], http: httpx.Client, schedule: tuple[float, ...], *,
                 production: bool, disable_after: int, disable_after_s: float, workers: int = 8,
                 keep_s: float = 7 * 24 * 3600.0, lease_s: float = LEASE_S, poll_s: float = 1.0,
                 draw: Callable[[], float] = random.random, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.http = http
        self.schedule = schedule
        self.production = production
        self.disable_after = disable_after
        self.disable_after_s = disable_after_s
        self.workers = workers
        self.keep_s = keep_s
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.draw = draw
        self.clock = clock
        self._next_prune = 0.0
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy: Counter[UUID | None] = Counter()  # attempts in flight, by user
        self._suspects = 0  # attempts in flight to suspect endpoints

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: claim what is due as threads free up; the attempts in flight finish."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="webhook-post") as posts:
            while not stop.is_set():
                self._wake.clear()
                if time.monotonic() >= self._next_prune:
                    self._prune()
                free = self.workers - self._in_flight
                claimed = self._claim(free) if free > 0 else []
                for due in claimed:
                    with self._lock:
                        self._in_flight += 1
                        self._busy[due.user_id] += 1
                        self._suspects += due.suspect
                    posts.submit(self._deliver, due)
                if not claimed or len(claimed) < free:
                    self._wake.wait(self.poll_s)

    def _claim(self, limit: int) -> list[store.Due]:
        try:
            with self._lock:
                busy = {user: n for user, n in self._busy.items() if user is not None}  # none at 0: deleted
                suspects = self._suspects
            with self.pool.connection() as conn:
                return store.claim(conn, limit, self.lease_s, PER_USER_IN_FLIGHT, busy,
                                   suspects=self.workers - proven_reserve(self.workers), suspects_busy=suspects)
        except Exception as e:  # noqa: BLE001 - the database is away: the next poll tries again
            log.warning("due deliveries not claimed (%s: %s)", type(e).__name__, str(e)[:200])
            return []

    def _prune(self) -> None:
        """Forget one page of what ``store.prune`` forgets (deliveries finished, or pending to an
        endpoint disabled, more than ``keep_s`` ago; rotated secrets past their grace); the next
        page at once when one was full, else in an hour."""
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        try:
            with self.pool.connection() as conn:
                if store.prune(conn, self.keep_s, PRUNE_PAGE) == PRUNE_PAGE:
                    self._next_prune = 0.0
        except Exception as e:  # noqa: BLE001 - the next hour tries again
            log.warning("webhook rows not pruned (%s: %s)", type(e).__name__, str(e)[:200])

    def _deliver(self, due: store.Due) -> None:
        try:
            # post never raises: whatever sending to the URL raises is the attempt's failure,
            # recorded and retried as one. Signing is ours: a fault there goes to the lease.
            outcome = targets.post(self.http, due.url, due.body,
                                   signed_headers(due.keys, due.message_id, int(self.clock()), due.body),
                                   self.production)
            retry_in = None if outcome.ok else retry_delay(self.schedule, due.tries + 1, self.draw)
            with self.pool.connection() as conn:
                store.finish(conn, due.id, outcome, retry_in, self.disable_after, self.disable_after_s, due.lease,
                             self._holding(outcome), due.tries)
        except Exception as e:  # noqa: BLE001 - the lease brings the delivery back
            log.warning("delivery %s not recorded (%s: %s); due again after its lease",
                        due.id, type(e).__name__, str(e)[:200])
        finally:
            with self._lock:
                self._in_flight -= 1
                self._suspects -= due.suspect
                self._busy[due.user_id] -= 1
                if self._busy[due.user_id] <= 0:
                    del self._busy[due.user_id]
            self._wake.set()

    def _holding(self, outcome: targets.Outcome) -> Callable[[int], float]:
        """The endpoint's hold after a failed attempt: a wait its answer asked for (a 429 or 503's
        Retry-After, at most HOLD_MAX_S) when longer than the schedule's."""
        asked = outcome.retry_after_s
        if asked is None:
            return self._hold_s
        wait = min(asked, HOLD_MAX_S)
        return lambda failures: max(self._hold_s(failures), wait)

    def _hold_s(self, failures: int) -> float:
        """How long an endpoint is held after ``failures`` failed attempts in a row: the retry
        schedule's step for that many (its last step past its end), at most HOLD_MAX_S."""
        return min(HOLD_MAX_S, retry_delay(self.schedule, min(failures, len(self.schedule)), self.draw) or 0.0)

    def close(self) -> None:
        self.http.close()
        self.pool.close()
