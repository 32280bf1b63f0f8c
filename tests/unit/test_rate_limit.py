"""Token buckets: a burst, then the rate, and an honest Retry-After."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.api.rate_limit import RateLimited, TokenBuckets


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_passes_then_the_next_waits_one_token():
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=2, burst=3, clock=clock)
    for _ in range(3):
        buckets.take("u")
    with pytest.raises(RateLimited) as e:
        buckets.take("u")
    assert e.value.retry_after_s == pytest.approx(0.5)
    assert e.value.retry_after_header == "1"
    buckets.take("other")  # keys are independent
    clock.t = 0.5
    buckets.take("u")


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(gaps):
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=5, burst=4, clock=clock)
    granted = 0
    for gap in gaps:
        clock.t += gap
        try:
            buckets.take("k")
            granted += 1
        except RateLimited as e:
            assert e.retry_after_s > 0
    assert granted <= 4 + 5 * clock.t + 1e-9
