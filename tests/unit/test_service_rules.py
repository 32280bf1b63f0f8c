"""The use cases' own checks, beyond the aggregates': what a client or a worker sends is bounded
and placed, and what a user sees adds up. Real application code over an in-memory event store."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import pytest

from application.executors import DirectExecutor
from application.services import (
    RULE_NAME_FIELD,
    InputsMissing,
    InputsTooLarge,
    PaletteApplication,
    PaletteService,
)
from domain.contracts.keys import MAX_INPUT_BYTES, input_key, output_key, preview_key
from domain.errors import InvalidState, NotFound, RuleSlotsFull, ValidationFailed
from domain.job import JobStatus
from domain.plans import DEFAULT_PLANS
from domain.presets import normalise_edits
from domain.rule import Rule
from projections.models import READ_MODELS
from projections.rebuild import fold_log
from projections.replay import Replayer
from tests.keys import process_keys
from tests.simulation import Ids, StepClock

EDITS = {"wall": {"action": "recolor", "value": "#3366aa"}}


class SizedUploads:
    """The object store port, with each input's size as the test sets it."""

    def __init__(self) -> None:
        self.sizes_by_key: dict[str, int] = {}
        self.deleted: list[str] = []

    def sizes(self, keys: Any) -> dict[str, int]:
        return {k: self.sizes_by_key[k] for k in keys if k in self.sizes_by_key}

    async def sizes_async(self, keys: Any) -> dict[str, int]:
        return self.sizes(keys)

    def delete(self, keys: Any) -> None:
        for k in keys:
            self.sizes_by_key.pop(k, None)
            self.deleted.append(k)


def palette(store: SizedUploads | None = None) -> tuple[PaletteService, UUID]:
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    service = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), store=store, **process_keys())
    return service, service.register("rules-device").value[0]


def running_job(service: PaletteService, user_id: UUID, items: int = 2) -> UUID:
    job_id = service.create_job(user_id, "interior", items).value
    service.confirm_upload(user_id, job_id)
    service.execute_job(user_id, job_id, EDITS)
    return job_id


def test_a_device_hash_takes_200_characters_and_no_more():
    service, _ = palette()
    assert service.register("d" * 200).value[1] is True
    with pytest.raises(ValidationFailed, match=r"1\.\.200"):
        service.register("d" * 201)
    with pytest.raises(ValidationFailed):
        service.register("")


def test_what_a_user_sees_adds_up_and_names_the_plans_limits():
    service, user_id = palette()
    running_job(service, user_id, items=3)
    view = service.get_user(user_id)
    free = DEFAULT_PLANS["free"]
    assert (view.credits, view.reserved, view.spent, view.granted) == (
        free.initial_credits - 3, 3, 0, free.initial_credits)
    assert (view.rule_slots_max, view.max_concurrency) == (free.max_rule_slots, free.max_concurrency)
    assert free.max_rule_slots != free.max_concurrency  # else a swap of the two would pass


@pytest.mark.parametrize("bad", [
    "outputs/{u}/{j}/../../../inputs/{u}/{j}/0.jpg",  # climbs out of the job's prefix
    "outputs/{u}/{j}/./0.png",
    "outputs/{u}/{j}//0.png",
    "outputs/{u}/{j}/0\x01.png",
    "outputs/{u}/{j}/0\x7f.png",
    "inputs/{u}/{j}/0.jpg",  # another prefix of the same job
    "outputs/{u}/{other}/0.png",  # another job's
    "outputs/{u}/{j}",  # the prefix itself, no object
])
def test_a_result_naming_an_object_outside_its_jobs_prefix_is_refused_and_records_nothing(bad: str):
    service, user_id = palette()
    job_id = running_job(service, user_id)
    other = running_job(service, service.register("another-device").value[0])
    key = bad.format(u=user_id, j=job_id, other=other)
    before = service.app.recorder.max_notification_id()
    for output, preview in ((key, ""), ("", key.replace("outputs/", "previews/", 1))):
        with pytest.raises(ValidationFailed, match="must lie under"):
            service.record_item_result(job_id, 0, "done", f"k-{output}-{preview}", output, preview)
    assert service.app.recorder.max_notification_id() == before


def test_a_result_naming_its_own_output_and_preview_is_recorded():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=1)
    result = service.record_item_result(job_id, 0, "done", "k0", output_key(user_id, job_id, 0),
                                        preview_key(user_id, job_id, 0)).value
    assert result.finished == JobStatus.DONE


@pytest.mark.parametrize(("size", "accepted"), [(MAX_INPUT_BYTES, True), (MAX_INPUT_BYTES + 1, False)])
def test_an_input_of_the_largest_size_is_accepted_and_one_a_byte_larger_is_deleted_and_refused(
        size: int, accepted: bool):
    store = SizedUploads()
    service, user_id = palette(store)
    job_id = service.create_job(user_id, "interior", 2).value
    keys = [input_key(user_id, job_id, i) for i in range(2)]
    store.sizes_by_key.update({keys[0]: 10, keys[1]: size})
    if accepted:
        assert service.confirm_upload(user_id, job_id).value == "uploaded"
        assert store.deleted == []
        return
    with pytest.raises(InputsTooLarge) as refused:
        service.confirm_upload(user_id, job_id)
    assert (refused.value.code, refused.value.too_large) == ("INPUT_TOO_LARGE", [1])
    assert store.deleted == [keys[1]]  # the same link takes a smaller photo while it lives
    assert service.get_job(user_id, job_id).status == JobStatus.CREATED


def test_confirming_before_every_input_is_uploaded_names_the_missing_ones_and_changes_nothing():
    store = SizedUploads()
    service, user_id = palette(store)
    job_id = service.create_job(user_id, "interior", 3).value
    store.sizes_by_key[input_key(user_id, job_id, 1)] = 10
    with pytest.raises(InputsMissing) as refused:
        service.confirm_upload(user_id, job_id)
    assert refused.value.missing == [0, 2]
    assert service.get_job(user_id, job_id).status == JobStatus.CREATED


def test_erasing_a_user_mid_job_keeps_the_credits_of_the_items_done_spent_and_refunds_only_the_rest():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=3)
    service.record_item_result(job_id, 0, "done", "k0", output_key(user_id, job_id, 0))
    service.record_item_result(job_id, 1, "failed", "k1", error="bad photo")
    granted = service.get_user(user_id).granted
    assert service.erase_user(user_id) is True
    user: Any = service.executor.read(user_id)
    assert (user.spent, user.reserved, user.balance) == (1, 0, granted - 1)
    assert service.get_job(user_id, job_id).status == JobStatus.CANCELED
    with pytest.raises(NotFound):  # erased: no one's to see any more
        service.get_user(user_id)


@pytest.mark.parametrize("count", [0, 201, 2.0, "2"])
def test_a_job_of_a_count_not_a_whole_number_from_1_to_200_is_refused_and_reserves_nothing(count: Any):
    service, user_id = palette()
    service.grant_credits(user_id, 200, "enough for 201 items")
    before = service.app.recorder.max_notification_id()
    with pytest.raises(ValidationFailed, match="item_count"):
        service.create_job(user_id, "interior", count)
    assert service.app.recorder.max_notification_id() == before


@pytest.mark.parametrize(("amount", "reason"), [(1_000_001, "goodwill"), (10**9, "goodwill"), (1, ""),
                                               (1, "x" * 201), (1, "nul \x00 inside")])
def test_an_operators_grant_out_of_bounds_is_refused_by_the_service_and_records_nothing(amount: int, reason: str):
    """The service checks an operator's grant (domain.user.check_grant), not only the CLI's
    arguments: User.grant refuses only no credits, a plan's sign-up credits being no such grant."""
    service, user_id = palette()
    before = service.app.recorder.max_notification_id()
    with pytest.raises(ValidationFailed, match="grant"):
        service.grant_credits(user_id, amount, reason, uuid4())
    assert service.app.recorder.max_notification_id() == before
    at_the_bounds = service.grant_credits(user_id, 1_000_000, "x" * 200, uuid4())
    assert at_the_bounds.value == DEFAULT_PLANS["free"].initial_credits + 1_000_000


def test_an_idempotency_key_reused_for_a_job_of_another_size_or_preset_is_refused():
    service, user_id = palette()
    job_id = uuid4()
    service.create_job(user_id, "interior", 3, job_id)
    for preset, count in (("interior", 4), ("seller", 3)):
        with pytest.raises(ValidationFailed, match="reused"):
            service.create_job(user_id, preset, count, job_id)
    assert service.get_user(user_id).reserved == 3


def test_a_job_is_rerun_only_once_finished_and_while_its_photos_are_kept():
    service, user_id = palette()
    service.change_plan(user_id, "pro")  # two jobs at once
    source = running_job(service, user_id, items=1)
    with pytest.raises(InvalidState, match="wait for it to finish"):
        service.executor.execute(service.rerun_job_command(user_id, source))
    service.record_item_result(source, 0, "done", "k0", output_key(user_id, source, 0))
    service.executor.execute(service.expire_job_command(source, 30))
    before = service.app.recorder.max_notification_id()
    with pytest.raises(InvalidState, match="retention"):
        service.executor.execute(service.rerun_job_command(user_id, source))
    assert service.app.recorder.max_notification_id() == before
    assert service.get_user(user_id).reserved == 0


def test_a_deleted_job_is_not_found_to_its_owner_as_another_users_job_is():
    service, user_id = palette()
    job_id = service.create_job(user_id, "interior", 1).value
    service.cancel_job(user_id, job_id)
    assert service.executor.execute(service.delete_job_command(user_id, job_id)).value is True
    with pytest.raises(NotFound):
        service.get_job(user_id, job_id)
    with pytest.raises(NotFound):
        service.cancel_job(user_id, job_id)
    other = service.register("another-device").value[0]
    with pytest.raises(NotFound):
        service.executor.execute(service.delete_job_command(other, job_id))


def test_a_rule_fills_in_only_what_the_request_leaves_out_and_only_its_owners_job_of_its_preset():
    service, user_id = palette()
    rule_id = service.create_rule(user_id, "Kitchen", "interior",
                                  {"wall": {"action": "recolor", "value": "#111111"},
                                   "floor": {"action": "texture", "value": "wood"}}, ["sofa"]).value
    seller_rule = service.create_rule(user_id, "Shop", "seller", {"product": {"action": "tone", "value": "warm"}}).value
    other = service.register("another-device").value[0]
    others_rule = service.create_rule(other, "Theirs", "interior", EDITS).value

    def uploaded() -> UUID:
        job_id = service.create_job(user_id, "interior", 1).value
        service.confirm_upload(user_id, job_id)
        return job_id

    job_id = uploaded()
    with pytest.raises(ValidationFailed, match="rule is for preset 'seller', job is 'interior'"):
        service.execute_job(user_id, job_id, None, rule_id=seller_rule)
    with pytest.raises(NotFound):
        service.execute_job(user_id, job_id, None, rule_id=others_rule)
    service.execute_job(user_id, job_id, {"wall": {"action": "recolor", "value": "#222222"}}, ["lamp"], rule_id)
    job = service.get_job(user_id, job_id)
    assert job.concepts == {"wall": {"action": "recolor", "value": "#222222"},
                            "floor": {"action": "texture", "value": "wood"}}
    assert job.protect == ["lamp"]
    service.cancel_job(user_id, job_id)
    job_id = uploaded()
    service.execute_job(user_id, job_id, None, None, rule_id)
    assert service.get_job(user_id, job_id).protect == ["sofa"]
    service.cancel_job(user_id, job_id)
    job_id = uploaded()
    sofa = {"sofa": {"action": "recolor", "value": "#333333"}}
    with pytest.raises(ValidationFailed, match="'sofa' cannot be both edited and protected"):
        service.execute_job(user_id, job_id, sofa, None, rule_id)  # the rule protects it
    service.execute_job(user_id, job_id, sofa, [], rule_id)  # the body's protect, even empty, stands for the rule's
    assert (service.get_job(user_id, job_id).protect, service.get_job(user_id, job_id).concepts["sofa"]) == (
        [], sofa["sofa"])


@pytest.mark.parametrize("results", [
    ("done", "failed", "failed"), ("failed", "failed", "failed"), ("done", "done", "done"),
])
def test_a_finished_job_spends_a_credit_per_item_done_and_refunds_every_failed_one(results: tuple[str, ...]):
    service, user_id = palette()
    job_id = running_job(service, user_id, items=len(results))
    before = service.get_user(user_id)
    finished = [
        service.record_item_result(job_id, i, status, f"k{i}", error="bad" if status == "failed" else "",
                                   output_key=output_key(user_id, job_id, i) if status == "done" else "").value.finished
        for i, status in enumerate(results)
    ]
    assert finished[:-1] == [None] * (len(results) - 1)
    done = results.count("done")
    after = service.get_user(user_id)
    assert (after.spent, after.reserved, after.credits) == (done, 0, before.credits + len(results) - done)
    assert service.get_job(user_id, job_id).status == (JobStatus.DONE if done else JobStatus.FAILED)


def test_canceling_a_running_job_spends_the_items_done_and_refunds_the_rest_once():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=3)
    service.record_item_result(job_id, 0, "done", "k0", output_key(user_id, job_id, 0))
    credits = service.get_user(user_id).credits
    assert service.cancel_job(user_id, job_id).value is True
    assert service.cancel_job(user_id, job_id).value is False
    after = service.get_user(user_id)
    assert (after.spent, after.reserved, after.credits) == (1, 0, credits + 2)


def test_deleting_a_rule_frees_its_slot_for_another():
    service, user_id = palette()
    slots = DEFAULT_PLANS["free"].max_rule_slots
    rules = [service.create_rule(user_id, f"Rule {i}", "interior", EDITS).value for i in range(slots)]
    with pytest.raises(RuleSlotsFull):
        service.create_rule(user_id, "One too many", "interior", EDITS)
    service.delete_rule(user_id, rules[0])
    assert service.get_user(user_id).rule_slots_used == slots - 1
    service.create_rule(user_id, "In its place", "interior", EDITS)
    with pytest.raises(NotFound):
        service.get_rule(user_id, rules[0])
    with pytest.raises(NotFound):
        service.update_rule(user_id, rules[0], "Back", EDITS)
    job_id = service.create_job(user_id, "interior", 1).value
    service.confirm_upload(user_id, job_id)
    with pytest.raises(NotFound):  # its edits are gone with it
        service.execute_job(user_id, job_id, None, rule_id=rules[0])
    with pytest.raises(NotFound):
        service.get_rule(service.register("another-device").value[0], rules[1])


# U+2800, the blank Braille pattern, is a symbol (So) that prints no dot: the other blank "name"
# beside the Hangul fillers.
INVISIBLE = ["\u200b", "\u2060\ufeff", "\u0301", "\u202e\u2066", "\u3000\u00a0", " \u200b ", "\u3164",
             "\u2800", "\u2800\u200d\u2800"]


@pytest.mark.parametrize("bad", ["x" * 81, "   ", "", *INVISIBLE])
def test_a_rule_name_is_checked_in_clear_before_it_is_sealed_on_create_and_update(bad: str):
    """Too long, empty, or showing nothing (only spaces, invisible or combining characters)."""
    service, user_id = palette()
    rule_id = service.create_rule(user_id, "x" * 80, "interior", EDITS).value
    before = service.app.recorder.max_notification_id()
    with pytest.raises(ValidationFailed, match="rule name must"):
        service.create_rule(user_id, bad, "interior", EDITS)
    with pytest.raises(ValidationFailed, match="rule name must"):
        service.update_rule(user_id, rule_id, bad, EDITS)
    assert service.app.recorder.max_notification_id() == before
    assert service.rule_name(service.get_rule(user_id, rule_id).name) == "x" * 80


@pytest.mark.parametrize("blank", INVISIBLE)
def test_a_rule_name_with_a_character_that_shows_is_taken_whatever_blanks_it_holds(blank: str):
    service, user_id = palette()
    rule_id = service.create_rule(user_id, "Warm walls", "interior", EDITS).value
    for shown in ("e\u0301", f"{blank}x", "\U0001f3e0"):  # a mark on a letter, or with one that shows
        service.update_rule(user_id, rule_id, shown, EDITS)
        assert service.rule_name(service.get_rule(user_id, rule_id).name) == shown


@pytest.mark.parametrize("name", ["\u0e1a\u0e49\u0e32\u0e19", "\u0915\u093f", "\u0628\u064e\u064a\u062a",
                                  "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u2764\ufe0f", "#\ufe0f\u20e3",
                                  "\ud55c\uae00", "\u1112\u1161\u11ab", "\u115f\u1161", "\u2800x"])
def test_a_rule_name_in_any_script_that_shows_is_taken(name: str):
    """Thai and Devanagari with their marks, Arabic with its vowels, emoji joined or with a
    variation selector, Hangul whole or in jamo (a filler before a vowel): each shows."""
    service, user_id = palette()
    rule_id = service.create_rule(user_id, name, "interior", EDITS).value
    assert service.rule_name(service.get_rule(user_id, rule_id).name) == name


@pytest.mark.parametrize("blank", INVISIBLE)
def test_a_stored_rule_whose_name_shows_nothing_still_folds_and_keeps_its_name_through_an_edit(blank: str):
    """Names stored before the check are folded as they are, and a PUT keeping one is no rename."""
    service, user_id = palette()
    rule_id = uuid4()
    edits, protect = normalise_edits("interior", EDITS, ())
    sealed = service.sealer.seal(user_id, RULE_NAME_FIELD, blank)
    service.app.save(Rule.create(rule_id, user_id, sealed, "interior", edits, protect, service.clock.now()))
    service.update_rule(user_id, rule_id, blank, {"wall": {"action": "tone", "value": "warm"}})
    rule = service.app.repository.get(rule_id)
    assert (service.rule_name(rule.name), rule.version, rule.concepts["wall"]["action"]) == (blank, 2, "tone")
    rows, _, tracking, _, failed = fold_log(READ_MODELS["rules"], Replayer(service.app).all())
    assert (failed, tracking[rule_id], service.rule_name(rows[(rule_id,)]["name"])) == (set(), 2, blank)


class StartsAJobAfterTheFirstRead(DirectExecutor):
    """The executor, with a job created by "another request" right after its first read."""

    def __init__(self, app: PaletteApplication) -> None:
        super().__init__(app)
        self.meanwhile: Any = None

    def read(self, aggregate_id: UUID) -> Any:
        aggregate = super().read(aggregate_id)
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return aggregate


def test_erasing_a_user_who_starts_a_job_after_the_reservations_were_read_reads_them_again_and_cancels_it():
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    executor = StartsAJobAfterTheFirstRead(app)
    service = PaletteService(app, executor, StepClock(), Ids(), **process_keys())
    user_id = service.register("erased-device").value[0]
    started: list[UUID] = []
    executor.meanwhile = lambda: started.append(service.create_job(user_id, "interior", 2).value)
    assert service.erase_user(user_id) is True
    user: Any = executor.read(user_id)
    assert (user.erased, user.reserved, user.spent, user.balance) == (True, 0, 0, user.granted)
    assert service.get_job(user_id, started[0]).status == JobStatus.CANCELED


def test_a_confirmed_upload_confirmed_again_from_an_event_loop_is_answered_without_looking_at_the_store():
    store = SizedUploads()
    service, user_id = palette(store)
    job_id = service.create_job(user_id, "interior", 1).value
    store.sizes_by_key[input_key(user_id, job_id, 0)] = 10
    assert asyncio.run(service.confirm_upload_async(user_id, job_id)).value == "uploaded"
    store.sizes_by_key.clear()  # the photo is the service's now: no check of the store again
    assert asyncio.run(service.confirm_upload_async(user_id, job_id)).value == "uploaded"
    assert store.deleted == []


def test_another_users_job_cannot_be_canceled_looked_up_for_deletion_or_rerun():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=2)
    other = service.register("another-device").value[0]
    with pytest.raises(NotFound):
        service.cancel_job(other, job_id)
    with pytest.raises(NotFound):
        asyncio.run(service.deleted_async(other, job_id))
    with pytest.raises(NotFound):
        asyncio.run(service.rerun_source_async(other, job_id))
    assert service.get_job(user_id, job_id).status == JobStatus.QUEUED
    assert service.get_user(user_id).reserved == 2


def test_an_unfinished_job_is_no_source_for_a_rerun_until_it_finishes():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=1)
    with pytest.raises(InvalidState, match="wait for it to finish"):
        asyncio.run(service.rerun_source_async(user_id, job_id))
    service.record_item_result(job_id, 0, "done", "k0", output_key(user_id, job_id, 0))
    source = asyncio.run(service.rerun_source_async(user_id, job_id))
    assert (source.item_count, source.concepts) == (1, ("wall",))


def test_a_refusal_carries_its_message_and_a_long_list_of_items_is_cut_to_the_first_20():
    store = SizedUploads()
    service, user_id = palette(store)
    job_id = service.create_job(user_id, "interior", 25).value
    with pytest.raises(InputsMissing) as refused:
        service.confirm_upload(user_id, job_id)
    assert refused.value.message == str(refused.value) == (
        "25 input(s) not uploaded yet: idx " + ", ".join(str(i) for i in range(20)) + " ...")


def test_a_finished_jobs_objects_expire_once_and_executing_it_again_points_to_a_rerun():
    service, user_id = palette()
    job_id = running_job(service, user_id, items=1)
    service.record_item_result(job_id, 0, "failed", "k0", error="bad photo")
    with pytest.raises(InvalidState, match="a rerun edits its photos again"):
        service.execute_job(user_id, job_id, {"wall": {"action": "recolor", "value": "#112233"}})
    version = service.app.recorder.max_notification_id()
    assert service.execute_job(user_id, job_id, EDITS).value == "failed"  # its own edits again: a lost answer's retry
    assert service.app.recorder.max_notification_id() == version
    assert service.executor.execute(service.expire_job_command(job_id, 30)).value is True
    assert service.executor.execute(service.expire_job_command(job_id, 30)).value is False


@pytest.mark.parametrize("since", ["edited", "deleted"])
@pytest.mark.parametrize("body", [(None, None), ({"floor": {"action": "texture", "value": "wood"}}, ["lamp"])])
def test_an_execute_retried_after_its_rule_changed_answers_the_jobs_status_and_other_edits_are_refused(
        since: str, body: tuple[Any, Any]):
    """A retry of an execute whose answer was lost is the same request, whatever became of its rule
    since (edited, or deleted, on another device): it answers the job's status and records nothing,
    read against the rule as the job was queued with it (it was a 409 'cannot execute a queued job',
    or a 404 'rule not found', for an execute that had been taken). Other edits are still refused."""
    service, user_id = palette()
    rule_id = service.create_rule(user_id, "Kitchen", "interior", EDITS, ["sofa"]).value
    concepts, protect = body
    for status in ("queued", "done"):
        job_id = service.create_job(user_id, "interior", 1).value
        service.confirm_upload(user_id, job_id)
        service.execute_job(user_id, job_id, concepts, protect, rule_id)
        if status == "done":
            service.record_item_result(job_id, 0, "done", f"k-{job_id}", output_key(user_id, job_id, 0))
        queued = service.get_job(user_id, job_id)
        if since == "edited":
            service.update_rule(user_id, rule_id, "Kitchen", {"wall": {"action": "tone", "value": "warm"}}, ["lamp"])
        else:
            service.delete_rule(user_id, rule_id)
        again = service.execute_job(user_id, job_id, concepts, protect, rule_id)
        assert (again.value, again.recorded) == (status, False)
        after = service.get_job(user_id, job_id)
        assert (after.concepts, after.protect, after.version) == (queued.concepts, queued.protect, queued.version)
        with pytest.raises(InvalidState):  # another request
            service.execute_job(user_id, job_id, {"wall": {"action": "tone", "value": "cool"}}, protect, rule_id)
        with pytest.raises(InvalidState):
            service.execute_job(user_id, job_id, concepts, ["plant"], rule_id)
        if status == "queued":
            service.cancel_job(user_id, job_id)  # frees the plan's one running job
        if since == "deleted":
            rule_id = service.create_rule(user_id, "Kitchen", "interior", EDITS, ["sofa"]).value
        else:
            service.update_rule(user_id, rule_id, "Kitchen", EDITS, ["sofa"])
