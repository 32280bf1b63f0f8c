"""Token buckets: a burst, then the rate, and an honest Retry-After."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.api.rate_limit import DAY_S, MAX_RETRY_AFTER_S, Budget, RateLimited, TokenBuckets


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


def granted(limits: TokenBuckets | Budget, clock: FakeClock, gaps: list[float]) -> int:
    """How many takes ``limits`` grants, one after each gap; a refusal always names a wait."""
    count = 0
    for gap in gaps:
        clock.t += gap
        try:
            limits.take("k")
            count += 1
        except RateLimited as e:
            assert e.retry_after_s > 0
    return count


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(gaps):
    clock = FakeClock()
    assert granted(TokenBuckets(rate_per_s=5, burst=4, clock=clock), clock, gaps) <= 4 + 5 * clock.t + 1e-9


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.just(0.0) | st.floats(0, 0.3) | st.floats(0, 3), min_size=1, max_size=60))
def test_in_any_window_never_more_than_burst_plus_rate_times_its_length(gaps):
    """The token bucket's bound holds from any moment, not only from the first: an idle key
    saves up at most ``burst``, and a refused take saves nothing."""
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=5, burst=4, clock=clock)
    grants = []
    for gap in gaps:
        clock.t += gap
        try:
            buckets.take("k")
            grants.append(clock.t)
        except RateLimited:
            pass
    for i, start in enumerate(grants):
        for j in range(i, len(grants)):
            assert j - i + 1 <= 4 + 5 * (grants[j] - start) + 1e-9, (start, grants[j])


@pytest.mark.parametrize(("wait_s", "header"), [(0.01, "1"), (1.0, "1"), (1.5, "2"), (2.0, "2"), (59.2, "60")])
def test_retry_after_is_the_wait_rounded_up_to_whole_seconds_and_at_least_one(wait_s, header):
    assert RateLimited(wait_s).retry_after_header == header


def test_a_budget_keeps_to_its_pace_and_to_its_total_in_any_day():
    clock = FakeClock()
    budget = Budget(rate_per_s=5, burst=20, per_day=30, clock=clock)
    for _ in range(20):
        budget.take("u")
    with pytest.raises(RateLimited) as paced:
        budget.take("u")
    assert paced.value.retry_after_s == pytest.approx(0.2)  # the pace's next token
    clock.t = 4.0  # the pace is full again; the day has 10 left
    for _ in range(10):
        budget.take("u")
    with pytest.raises(RateLimited) as spent:
        budget.take("u")
    assert spent.value.retry_after_s == pytest.approx(DAY_S / 30 - 4.0)  # a day token, less the 4 s since
    budget.take("other")  # per key


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 3600), min_size=1, max_size=80))
def test_a_budget_never_grants_more_than_its_day_allows(gaps):
    clock = FakeClock()
    count = granted(Budget(rate_per_s=5, burst=20, per_day=30, clock=clock), clock, gaps)
    assert count <= 30 + 30 * clock.t / DAY_S + 1e-9  # a day's worth at once, then the day's rate
    assert count <= 20 + 5 * clock.t + 1e-9


def test_a_key_that_keeps_asking_while_refused_is_not_forgotten_for_other_keys():
    """Past ``max_keys`` the key that asked least recently is forgotten (it would start afresh):
    one spent and still trying is asking, so newcomers push out the quiet keys, not it."""
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=1 / DAY_S, burst=2, max_keys=3, clock=clock)
    for _ in range(2):
        buckets.take("spent")
    for key in ("b", "b", "c"):  # "b" spent too: only a bucket forgotten would take it again
        buckets.take(key)
    with pytest.raises(RateLimited):
        buckets.take("spent")  # still trying
    buckets.take("d")  # one key too many: "b" asked least recently
    assert len(buckets._buckets) == 3  # the bound itself, reached and kept
    with pytest.raises(RateLimited):
        buckets.take("spent")
    buckets.take("b")  # forgotten, so afresh: the price of a bound on memory
    for key in ("e", "f", "g"):  # once it stops asking, it goes like any other
        buckets.take(key)
    buckets.take("spent")


def test_a_bucket_refilled_to_full_is_dropped_as_a_missing_one_would_answer_the_same():
    """An idle key costs nothing: once refilled, its bucket is a new one; dropped at the least
    recently used end as keys ask, and a take or a give back that leaves one full keeps none."""
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=1, burst=2, clock=clock)
    for key in range(10):
        buckets.take(key)
    assert len(buckets._buckets) == 10
    clock.t = 2.0  # burst / rate: every one of them has refilled
    buckets.take("new")
    assert list(buckets._buckets) == ["new"]
    buckets.give_back("new")
    assert buckets.wait_s("idle") == 0 and len(buckets._buckets) == 0
    for _ in range(2):
        buckets.take(3)  # dropped, so afresh: a full burst, as it would have had
    with pytest.raises(RateLimited):
        buckets.take(3)
    # Each on its own, with an older bucket not refilled in front of it (the sweep stops there):
    # a take that leaves a bucket full keeps none, and so does a give back that fills one.
    assert list(buckets._buckets) == [3]
    buckets.take("free", 0)
    assert list(buckets._buckets) == [3]
    buckets.take("spent")
    buckets.give_back("spent")
    assert list(buckets._buckets) == [3]


def test_the_users_of_one_address_share_its_day_however_many_they_are():
    """Each user's day bounds what one user adds for good; users cost an address nothing to make
    (a registration every 5 s, and they never expire), so without a day per address one client
    added as much as it had users. With it, an address's users together get its day, and a user
    refused by its own budget spends nothing of the address's."""
    clock = FakeClock()
    budget = Budget(rate_per_s=5, burst=20, per_day=1000, clock=clock, per_address_day=100)
    given_out = 0
    for user in range(500):
        try:
            budget.take(f"user-{user}", "198.51.100.7")
            given_out += 1
        except RateLimited:
            pass
    assert given_out == 100
    budget.take("user-0", "203.0.113.9")  # another address has its own day
    for _ in range(20):
        budget.take("eager", "203.0.113.10")
    for _ in range(30):
        with pytest.raises(RateLimited):
            budget.take("eager", "203.0.113.10")  # its burst is spent, not the address's day
    for user in range(80):
        budget.take(f"neighbour-{user}", "203.0.113.10")
    with pytest.raises(RateLimited):
        budget.take("neighbour-80", "203.0.113.10")
    clock.t = DAY_S / 100  # one address token back
    budget.take("user-600", "198.51.100.7")
    with pytest.raises(RateLimited):
        budget.take("user-601", "198.51.100.7")


def test_a_request_one_budget_refuses_spends_from_none_of_them():
    """A user refused for its address's sake kept paying its own pace and day: retrying as
    Retry-After said, it spent its whole day on refusals and stayed refused from anywhere."""
    clock = FakeClock()
    budget = Budget(rate_per_s=5, burst=20, per_day=50, clock=clock, per_address_day=1)
    budget.take("neighbour", "198.51.100.7")  # the address's one token
    for _ in range(200):
        with pytest.raises(RateLimited) as e:
            budget.take("victim", "198.51.100.7")
        assert e.value.retry_after_s > DAY_S - 300  # the longest wait: the address's day
        clock.t += 1.0
    for i in range(20):  # its pace's burst, and 20 of its day's 50, all still there (an address each)
        budget.take("victim", f"203.0.113.{i}")
    with pytest.raises(RateLimited) as e:
        budget.take("victim", "203.0.113.99")
    assert e.value.retry_after_s == pytest.approx(0.2)  # its pace, not a day gone
    for i in range(30):
        clock.t += 0.25  # within its pace
        budget.take("victim", f"192.0.2.{i}")  # the rest of its day
    with pytest.raises(RateLimited) as e:
        budget.take("victim", "192.0.2.99")
    assert e.value.retry_after_s > 1000  # its day is spent: 50 taken, none by the refusals


def test_a_request_refused_with_under_a_second_to_wait_spends_from_none_of_them_either():
    clock = FakeClock()
    budget = Budget(rate_per_s=1, burst=1, per_day=1, clock=clock, per_address_day=1)
    budget.take("neighbour", "198.51.100.7")
    clock.t = DAY_S - 0.5  # the address's next token half a second away
    with pytest.raises(RateLimited) as e:
        budget.take("victim", "198.51.100.7")
    assert e.value.retry_after_s == pytest.approx(0.5)
    budget.take("victim", "203.0.113.1")  # its one token of pace and of day, both still there


def test_a_command_that_records_nothing_gives_its_address_its_token_back():
    """The address's day bounds what its clients add for good: refused and repeated commands
    add nothing, and charging them let one client's throw-away users hold it at zero."""
    clock = FakeClock()
    budget = Budget(rate_per_s=1000, burst=1000, per_day=10_000, clock=clock, per_address_day=3)
    with budget.spending("neighbour", "198.51.100.7") as spending:
        spending.recorded = True  # the address's bucket is no longer full: a token back must stay
    for _ in range(50):
        with pytest.raises(LookupError), budget.spending("attacker", "198.51.100.7"):
            raise LookupError("no such rule")  # the command refused: nothing recorded
        with budget.spending("attacker", "198.51.100.7"):
            pass  # a repeat: answered, nothing recorded
    for _ in range(2):
        with budget.spending("neighbour", "198.51.100.7") as spending:
            spending.recorded = True
    with pytest.raises(RateLimited), budget.spending("neighbour", "198.51.100.7"):
        pass
    buckets = TokenBuckets(rate_per_s=1, burst=2, clock=clock)
    buckets.give_back("unknown")  # never asked: nothing to give back, and nothing kept
    buckets.take("k")
    buckets.give_back("k")
    buckets.give_back("k")  # not past the burst
    buckets.take("k")
    buckets.take("k")
    with pytest.raises(RateLimited):
        buckets.take("k")


def test_the_entry_the_trusted_proxy_wrote_is_the_address_even_when_it_is_the_only_one():
    """One proxy in front, a client that sends no X-Forwarded-For of its own: the header holds one
    entry, the proxy's, and that is the client (read as absent, every client counted as the
    proxy's own address and shared one day). An entry that is no address is cut to 64 characters,
    whatever its length (a key held in memory)."""
    from adapters.api.rate_limit import client_address, forwarded

    assert forwarded(["203.0.113.7"], 1) == "203.0.113.7"
    assert forwarded(["198.51.100.1, 203.0.113.7"], 2) == "198.51.100.1"
    assert forwarded(["203.0.113.7"], 2) is None
    assert client_address("10.0.0.2", ["203.0.113.7"], 1) == "203.0.113.7"
    assert client_address("10.0.0.2", ["x" * 10_000], 1) == "x" * 64


def test_a_key_s_spending_comes_back_only_when_its_command_recorded_nothing():
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=1 / DAY_S, burst=2, clock=clock)
    with buckets.spending("k"):  # recorded nothing: given back
        pass
    with buckets.spending("k") as spent:
        spent.recorded = True
    with buckets.spending("k") as spent:
        spent.recorded = True
    with pytest.raises(RateLimited), buckets.spending("k"):  # two recorded: the burst is spent
        pass


def test_a_spending_of_several_tokens_gives_all_of_them_back_into_a_bucket_not_full():
    """A rerun's copy bytes: a refused rerun of 4 GB must not cost its user 3 of them."""
    buckets = TokenBuckets(rate_per_s=1 / DAY_S, burst=10, clock=FakeClock())
    buckets.take("k", 3)  # 7 left
    with buckets.spending("k", 4):  # 3 left while it runs; it records nothing: 7 again
        pass
    buckets.take("k", 7)
    with pytest.raises(RateLimited):
        buckets.take("k", 1)


def test_an_ipv4_client_counts_as_itself_however_its_address_is_written_and_ipv6_by_its_64():
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: counted by its /64, every IPv4
    client on the Internet would share one limit."""
    from adapters.api.rate_limit import client_address

    assert client_address("::ffff:203.0.113.7", [], 0) == "203.0.113.7"
    assert client_address("::ffff:203.0.113.7", [], 0) != client_address("::ffff:203.0.113.8", [], 0)
    assert client_address("2001:db8:1:2:aaaa::1", [], 0) == client_address("2001:db8:1:2:bbbb::9", [], 0)
    assert client_address("2001:db8:1:2:aaaa::1", [], 0) == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1", [], 0) != client_address("2001:db8:1:2::1", [], 0)


@pytest.mark.parametrize("rate", [1e-320, 1e-300, 5e-324])
def test_a_rate_too_slow_for_its_wait_to_be_a_number_still_answers_a_retry_after(rate: float) -> None:
    """A setting of ``PALETTE_RATE_*_PER_S`` that small made the wait infinite (or 300 digits long):
    math.ceil raised OverflowError where the 429's header was made, a 500 in its place."""
    buckets = TokenBuckets(rate, 1)
    buckets.take("k")
    with pytest.raises(RateLimited) as refused:
        buckets.take("k")
    header = refused.value.retry_after_header
    assert header.isdigit() and 1 <= int(header) <= MAX_RETRY_AFTER_S


@pytest.mark.parametrize("rate", [1e-320, 1e-300])
def test_a_rate_too_slow_for_its_wait_says_the_same_capped_wait_in_the_answer(rate: float) -> None:
    """The 429's message (str of RateLimited) said the uncapped wait: 'retry after infs', or 300
    digits, beside a Retry-After of a year."""
    buckets = TokenBuckets(rate, 1)
    buckets.take("k")
    with pytest.raises(RateLimited) as refused:
        buckets.take("k")
    assert str(refused.value) == f"rate limited; retry after {MAX_RETRY_AFTER_S:.2f}s"
    assert refused.value.retry_after_s == MAX_RETRY_AFTER_S
