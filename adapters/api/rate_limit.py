"""Per-key token buckets (one API process): job creation and rule writes per user and per client
address, callbacks per job, registrations per client address."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_RETRY_AFTER_S = 366 * 86_400  # a Retry-After past a year says "not soon" no better, and a rate set
# as small as 1e-320 per second made the wait infinite


class RateLimited(Exception):
    """Over the limit; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        retry_after_s = min(retry_after_s, MAX_RETRY_AFTER_S)  # the message's wait is the header's
        super().__init__(f"rate limited; retry after {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


DROP_PER_ASK = 16  # refilled buckets dropped per ask, at most: the lock is held for little


class TokenBuckets:
    """A token bucket per key, in memory, at most ``max_keys`` of them: past that, the key that
    asked least recently is forgotten (a new bucket, full, if it asks again). Every attempt counts
    as asking, a refused one too, so a client that keeps trying stays remembered; one that stops
    is forgotten only once ``max_keys`` other keys have asked after it. A bucket refilled to full
    answers as a missing one would, so none is kept: an idle key costs nothing."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: object, amount: float = 1.0) -> None:
        """Spend ``amount`` tokens (one by default) for ``key`` or raise RateLimited."""
        if (wait := self._ask(key, spend=True, amount=amount)) > 0:
            raise RateLimited(wait)

    def wait_s(self, key: object) -> float:
        """How long until ``key`` holds a token (0: it holds one now); spends nothing, but counts
        as asking."""
        return self._ask(key, spend=False)

    @contextlib.contextmanager
    def spending(self, key: object, amount: float = 1.0) -> Iterator[Spending]:
        """``take`` ``amount`` for one command, given back unless the command recorded something
        (``spending.recorded``)."""
        self.take(key, amount)
        spending = Spending()
        try:
            yield spending
        finally:
            if not spending.recorded:
                self.give_back(key, amount)

    def give_back(self, key: object, amount: float = 1.0) -> None:
        """Return the tokens a request spent and had no use for (up to the burst)."""
        with self._lock:
            if key in self._buckets:
                tokens, last = self._buckets[key]
                if tokens + amount >= self.burst:
                    del self._buckets[key]
                else:
                    self._buckets[key] = (tokens + amount, last)

    def _ask(self, key: object, spend: bool, amount: float = 1.0) -> float:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            refused = tokens < amount
            left = tokens - amount if spend and not refused else tokens
            if left < self.burst:
                self._buckets[key] = (left, now)  # the most recently used end
            self._drop_refilled(now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return (amount - tokens) / self.rate if refused else 0.0

    def _drop_refilled(self, now: float) -> None:
        """Drop up to DROP_PER_ASK buckets refilled to full from the least recently used end (an
        ask adds at most one, so idle keys go faster than new ones come)."""
        for _ in range(DROP_PER_ASK):
            oldest = next(iter(self._buckets.values()), None)
            if oldest is None or oldest[0] + (now - oldest[1]) * self.rate < self.burst:
                return
            self._buckets.popitem(last=False)


DAY_S = 86_400.0


class Budget:
    """A rate with a burst and a total per day, per key: each action spends from both. The rate
    paces a client; the day's total bounds what one can add for good (events, read-model rows)
    however patiently it keeps to the rate. With ``per_address_day``, the keys acting from one
    client address also share a total per day: a user costs nothing to make (a registration),
    so without it one client added a day's total for each user it had made."""

    def __init__(self, rate_per_s: float, burst: int, per_day: int,
                 clock: Callable[[], float] = time.monotonic, per_address_day: int | None = None) -> None:
        self.pace = TokenBuckets(rate_per_s, burst, clock=clock)
        self.day = TokenBuckets(per_day / DAY_S, per_day, clock=clock)
        self.address_day = (TokenBuckets(per_address_day / DAY_S, per_address_day, clock=clock)
                            if per_address_day is not None else None)
        self._lock = threading.Lock()  # one request's three buckets are asked and spent together

    def take(self, key: object, address: str | None = None) -> None:
        """Spend one token from each of the key's pace and day and its address's day, or from none
        and raise RateLimited for the longest wait: a request one of them refuses costs the others
        nothing (a user refused for its address's sake kept paying its own day)."""
        asked = [(self.pace, key), (self.day, key)]
        if self.address_day is not None and address is not None:
            asked.append((self.address_day, address))
        with self._lock:
            wait = max(buckets.wait_s(k) for buckets, k in asked)
            if wait > 0:
                raise RateLimited(wait)
            for buckets, k in asked:
                buckets.take(k)

    @contextlib.contextmanager
    def spending(self, key: object, address: str | None = None) -> Iterator[Spending]:
        """``take`` for one command, whose address's token comes back unless the command recorded
        something (``spending.recorded``): the address's day bounds what its clients add, and
        charging refused or repeated commands let one client's throw-away users hold it at zero
        for everyone behind the same address."""
        self.take(key, address)
        spending = Spending()
        try:
            yield spending
        finally:
            if not spending.recorded and self.address_day is not None and address is not None:
                self.address_day.give_back(address)


@dataclass
class Spending:
    """What a command under ``Budget.spending`` did: set ``recorded`` once it saved an event."""

    recorded: bool = False


def forwarded(values: list[str], hops: int) -> str | None:
    """The entry of a forwarding header (X-Forwarded-For, X-Forwarded-Proto: all its lines, comma
    separated) that ``hops`` trusted proxies back wrote: that many places from the right; the
    entries left of it are whatever the client chose to send. None: no proxy trusted, or fewer
    entries than proxies."""
    if hops <= 0:
        return None
    entries = [e.strip() for value in values for e in value.split(",") if e.strip()]
    return entries[-hops] if len(entries) >= hops else None


def client_address(peer: str | None, forwarded_for: list[str], trusted_proxies: int) -> str:
    """The address a per-client limit counts against. The TCP peer, unless ``trusted_proxies``
    reverse proxies stand in front: then the entry that many places from the right of
    X-Forwarded-For (the entries left of it are whatever the client chose to send). An IPv6
    client counts by its /64, which one subscriber usually holds whole."""
    address = forwarded(forwarded_for, trusted_proxies) or peer or "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def request_address(request: Any, trusted_proxies: int) -> str:
    """client_address of an HTTP request (a Starlette ``Request``)."""
    peer = request.client.host if request.client else None
    return client_address(peer, request.headers.getlist("x-forwarded-for"), trusted_proxies)
