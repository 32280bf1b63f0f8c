"""User aggregate: given events, when a command, then new events (or a refusal)."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from domain.errors import ConcurrencyLimit, InsufficientCredits, RuleSlotsFull, ValidationFailed
from domain.plans import DEFAULT_PLANS, Plan
from domain.user import MAX_GRANT, MAX_GRANT_REASON, MAX_GRANTED, User, check_grant, user_id_for_device_key

AT = datetime(2026, 1, 1, tzinfo=UTC)
FREE, PRO = DEFAULT_PLANS["free"], DEFAULT_PLANS["pro"]
KEY = "hmac-sha256:" + "ab" * 32  # a device key, as the application derives it


def new_events(user: User) -> list[str]:
    return [type(e).__name__ for e in user.collect_events()]


def registered(plan=FREE) -> User:
    user = User.register(KEY, plan, AT)
    user.collect_events()
    return user


def test_registration_grants_the_plans_initial_credits():
    user = User.register(KEY, FREE, AT)
    assert new_events(user) == ["Registered", "CreditsGranted"]
    assert (user.balance, user.granted, user.plan) == (50, 50, "free")
    assert user.id == user_id_for_device_key(KEY)


@given(credits=st.integers(0, 1_000))
@example(credits=0)
@example(credits=1)
def test_registration_grants_any_positive_initial_credits_and_records_no_grant_of_none(credits):
    user = User.register(KEY, Plan("custom", credits, 1, 2), AT)
    assert new_events(user) == ["Registered"] + ["CreditsGranted"] * (credits > 0)
    assert (user.balance, user.granted) == (credits, credits)


def test_registration_stores_the_device_key_and_the_aggregate_keeps_none():
    user = User.register(KEY, FREE, AT)
    registered_event = user.collect_events()[0]
    assert isinstance(registered_event, User.Registered) and registered_event.device_key == KEY
    assert KEY not in str(vars(user))


@pytest.mark.parametrize("raw", ["", "device-1", "hmac-sha256:"])
def test_registration_refuses_anything_but_a_device_key(raw):
    with pytest.raises(ValidationFailed):
        User.register(raw, FREE, AT)


def test_event_timestamps_come_from_the_command():
    user = User.register(KEY, FREE, AT)
    assert {e.timestamp for e in user.collect_events()} == {AT}


def test_reserve_moves_credits_from_balance_to_the_job():
    user, job = registered(), uuid4()
    user.reserve(job, 10, FREE, AT)
    assert new_events(user) == ["CreditsReserved"]
    assert (user.balance, user.reserved, user.active_jobs) == (40, 10, 1)


def test_reserve_twice_for_one_job_records_nothing():
    user, job = registered(), uuid4()
    user.reserve(job, 10, FREE, AT)
    user.collect_events()
    user.reserve(job, 10, FREE, AT)
    assert new_events(user) == []


def test_reserve_beyond_balance_is_refused():
    user = registered()
    with pytest.raises(InsufficientCredits):
        user.reserve(uuid4(), 51, FREE, AT)
    assert new_events(user) == []


def test_reserve_beyond_the_plans_concurrency_is_refused():
    user = registered()
    user.reserve(uuid4(), 1, FREE, AT)
    with pytest.raises(ConcurrencyLimit):
        user.reserve(uuid4(), 1, FREE, AT)


def test_pro_plan_runs_four_jobs_at_once():
    user = registered(PRO)
    for _ in range(4):
        user.reserve(uuid4(), 1, PRO, AT)
    with pytest.raises(ConcurrencyLimit):
        user.reserve(uuid4(), 1, PRO, AT)


def test_settle_keeps_the_spent_part_and_refunds_the_rest():
    user, job = registered(), uuid4()
    user.reserve(job, 10, FREE, AT)
    user.collect_events()
    user.settle(job, 7, AT)
    [event] = user.collect_events()
    assert isinstance(event, User.CreditsSettled)
    assert (event.spent, event.refunded) == (7, 3)
    assert (user.balance, user.spent, user.reserved, user.active_jobs) == (43, 7, 0, 0)


def test_a_reservation_is_settled_only_once():
    user, job = registered(), uuid4()
    user.reserve(job, 10, FREE, AT)
    user.settle(job, 10, AT)
    user.collect_events()
    user.settle(job, 0, AT)
    assert new_events(user) == []
    assert user.balance == 40


def test_settling_more_than_reserved_is_refused():
    user, job = registered(), uuid4()
    user.reserve(job, 2, FREE, AT)
    with pytest.raises(ValidationFailed):
        user.settle(job, 3, AT)


def test_grant_must_be_positive():
    with pytest.raises(ValidationFailed):
        registered().grant(0, "promo", AT)


def test_rule_slots_are_bounded_by_the_plan():
    user = registered()
    user.take_rule_slot(uuid4(), FREE, AT)
    user.take_rule_slot(uuid4(), FREE, AT)
    with pytest.raises(RuleSlotsFull):
        user.take_rule_slot(uuid4(), FREE, AT)


def test_freeing_a_slot_makes_room_and_freeing_twice_records_nothing():
    user, rule = registered(), uuid4()
    user.take_rule_slot(rule, FREE, AT)
    user.free_rule_slot(rule, AT)
    user.collect_events()
    user.free_rule_slot(rule, AT)
    assert new_events(user) == []
    assert user.rule_ids == set()


def test_changing_to_the_same_plan_records_nothing():
    user = registered()
    user.change_plan(FREE, AT)
    assert new_events(user) == []
    user.change_plan(PRO, AT)
    assert new_events(user) == ["PlanChanged"]
    assert user.plan == "pro"


def test_erasure_waits_for_jobs_holding_credits_then_is_recorded_once():
    from domain.errors import InvalidState

    user = registered()
    job = uuid4()
    user.reserve(job, 3, FREE, AT)
    user.collect_events()
    with pytest.raises(InvalidState):
        user.erase(AT)
    user.settle(job, 1, AT)
    assert user.erase(AT) is True and user.erase(AT) is False
    assert new_events(user) == ["CreditsSettled", "Erased"]
    assert user.erased and user.spent == 1


def test_each_generation_of_a_device_is_another_user_and_the_key_is_stored_as_sealed():
    ids = {user_id_for_device_key(KEY, g) for g in range(4)}
    assert len(ids) == 4 and user_id_for_device_key(KEY) == user_id_for_device_key(KEY, 0)
    seen = []
    user = User.register(KEY, FREE, AT, generation=2, seal=lambda uid, v: seen.append((uid, v)) or "sealed:x")
    assert user.id == user_id_for_device_key(KEY, 2) and seen == [(user.id, KEY)]
    assert user.collect_events()[0].device_key == "sealed:x"


def test_a_reservation_may_take_the_whole_balance():
    user = registered()
    user.reserve(uuid4(), 50, FREE, AT)
    assert (user.balance, user.reserved) == (0, 50)


def test_the_concurrency_limit_is_answered_before_the_balance():
    user = registered()
    user.reserve(uuid4(), 50, FREE, AT)
    with pytest.raises(ConcurrencyLimit):  # over both: the client is told about the job it must finish
        user.reserve(uuid4(), 1, FREE, AT)


def test_a_reservation_of_nothing_and_a_negative_spend_are_refused():
    user, job = registered(), uuid4()
    with pytest.raises(ValidationFailed):
        user.reserve(uuid4(), 0, FREE, AT)
    user.reserve(job, 3, FREE, AT)
    with pytest.raises(ValidationFailed):  # would refund more than was reserved
        user.settle(job, -1, AT)
    assert (user.balance, user.reserved, user.spent) == (47, 3, 0)


def test_taking_a_rule_slot_already_held_records_nothing_even_with_every_slot_taken():
    user, first = registered(), uuid4()
    user.take_rule_slot(first, FREE, AT)
    user.take_rule_slot(uuid4(), FREE, AT)
    user.collect_events()
    user.take_rule_slot(first, FREE, AT)
    assert new_events(user) == []


def test_user_ids_are_the_stored_ones():
    # The ids every stream was stored under: a change of namespace or form re-keys every user.
    assert str(user_id_for_device_key(KEY)) == "df72349f-79de-573f-ab6a-ccb3954334c5"
    assert str(user_id_for_device_key(KEY, 1)) == "c12d1473-c20c-5b71-b71f-a6717c91c76f"


def test_the_default_plans_are_architectures_table():
    assert [(p.name, p.initial_credits, p.max_concurrency, p.max_rule_slots) for p in DEFAULT_PLANS.values()] == [
        ("free", 50, 1, 2), ("pro", 1000, 4, 20)]


def test_a_grant_records_its_id_and_credits_the_balance():
    user, grant_id = registered(), uuid4()
    assert user.grant(100, "goodwill", AT, grant_id) is True
    [event] = user.collect_events()
    assert isinstance(event, User.CreditsGranted)
    assert (event.amount, event.reason, event.grant_id) == (100, "goodwill", grant_id)
    assert (user.balance, user.granted, user.grant_ids) == (FREE.initial_credits + 100, FREE.initial_credits + 100,
                                                            {grant_id})


def test_a_grant_whose_id_was_recorded_records_nothing_even_with_another_amount():
    user, grant_id = registered(), uuid4()
    user.grant(100, "goodwill", AT, grant_id)
    user.collect_events()
    assert user.grant(100, "goodwill", AT, grant_id) is False
    assert user.grant(5, "a retry typed again", AT, grant_id) is False
    assert new_events(user) == [] and user.balance == FREE.initial_credits + 100


def test_grants_without_an_id_are_each_recorded():
    user = registered()
    user.grant(3, "promo", AT)
    user.grant(3, "promo", AT)
    assert new_events(user) == ["CreditsGranted", "CreditsGranted"] and user.grant_ids == set()


@pytest.mark.parametrize(("amount", "reason"), [
    (0, "goodwill"), (-1, "goodwill"), (MAX_GRANT + 1, "goodwill"), (1, ""), (1, "x" * (MAX_GRANT_REASON + 1)),
    (1, "nul \x00 inside"), (1, "escape \x1b[31m"), (1, "lone \ud800"),
])
def test_an_operators_grant_out_of_bounds_is_refused(amount, reason):
    with pytest.raises(ValidationFailed):
        check_grant(amount, reason)


def test_an_operators_grant_at_its_bounds_is_recorded():
    user = registered()
    for amount, reason in [(MAX_GRANT, "y" * MAX_GRANT_REASON), (1, "é\tok")]:
        check_grant(amount, reason)
        assert user.grant(amount, reason, AT, uuid4())
    assert new_events(user) == ["CreditsGranted", "CreditsGranted"]


@pytest.mark.parametrize("amount", [0, -1])
def test_a_grant_of_no_credits_is_refused_and_records_nothing(amount):
    user = registered()
    with pytest.raises(ValidationFailed):
        user.grant(amount, "goodwill", AT, uuid4())
    assert new_events(user) == [] and user.grant_ids == set()


def test_a_plan_may_start_with_more_credits_than_an_operator_may_grant():
    """The sign-up credits are the plan's, not an operator's grant: a plan of a billion (the
    benchmark's) registered users until the operators' bound was put on every grant."""
    rich = Plan("rich", 1_000_000_000, 1, 2)
    assert registered(rich).balance == 1_000_000_000


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 1000)), max_size=30))
def test_any_sequence_of_grants_with_repeated_ids_credits_each_distinct_grant_once(grants):
    """Given grants drawn from a few ids (each id's first amount is the one that counts), when
    each is made, retries included, then the balance is the sign-up credits plus the distinct
    grants, one CreditsGranted each, and the credit invariant holds."""
    ids = [uuid4() for _ in range(6)]
    user, first = registered(), {}
    for n, amount in grants:
        user.grant(amount, "goodwill", AT, ids[n])
        first.setdefault(n, amount)
        assert user.granted == user.balance + user.reserved + user.spent
    assert user.balance == FREE.initial_credits + sum(first.values())
    assert new_events(user) == ["CreditsGranted"] * len(first) and user.grant_ids == {ids[n] for n in first}


def test_changing_to_the_plan_the_user_is_on_records_nothing():
    user = registered(PRO)
    user.change_plan(PRO, AT)
    assert new_events(user) == []
    user.change_plan(FREE, AT)
    assert new_events(user) == ["PlanChanged"] and user.plan == "free"


def test_a_grant_past_what_a_user_may_be_granted_in_all_is_refused_and_records_nothing():
    """The read models keep the credit buckets as 32-bit integers: ~2,148 grants of a million to
    one user would have stopped that user's row in the users model."""
    user = registered(Plan("rich", MAX_GRANTED - 10, 1, 2))
    assert user.grant(10, "the last ones", AT, uuid4())
    user.collect_events()
    with pytest.raises(ValidationFailed, match="at most"):
        user.grant(1, "one more", AT, uuid4())
    assert new_events(user) == [] and user.granted == MAX_GRANTED
