"""Job aggregate: the state machine and idempotent item results, as given/when/then."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from domain.errors import InvalidState, ValidationFailed
from domain.job import Job, JobStatus, ResultOutcome

AT = datetime(2026, 1, 1, tzinfo=UTC)
EDITS = {"wall": {"action": "recolor", "value": "#aabbcc"}}


def new_events(job: Job) -> list[str]:
    return [type(e).__name__ for e in job.collect_events()]


def job_in(status: str, items: int = 3) -> Job:
    job = Job.create(uuid4(), uuid4(), "interior", items, AT)
    if status in ("uploaded", "queued", "running"):
        job.confirm_upload(AT)
    if status in ("queued", "running"):
        job.execute(EDITS, [], None, AT)
    if status == "running":
        job.record_result(0, "done", "o", "p", "", "k0", AT)
    job.collect_events()
    return job


def test_created_job_confirms_upload():
    job = job_in("created")
    job.confirm_upload(AT)
    assert new_events(job) == ["UploadConfirmed"]
    assert job.status == JobStatus.UPLOADED


def test_confirming_twice_records_nothing():
    job = job_in("uploaded")
    job.confirm_upload(AT)
    assert new_events(job) == []


@pytest.mark.parametrize("status", ["queued", "running", "done", "failed"])
def test_confirming_a_job_executed_since_records_nothing(status):
    """A retried confirm whose answer was lost, after the job was executed (and begun or finished)."""
    job = _job_that_is(status)
    job.confirm_upload(AT)
    assert new_events(job) == [] and job.status == status


@pytest.mark.parametrize("status", ["canceled created", "canceled uploaded", "canceled running"])
def test_confirming_a_canceled_job_is_refused(status):
    job = _job_that_is(status)
    with pytest.raises(InvalidState):
        job.confirm_upload(AT)
    assert new_events(job) == []


def test_execute_before_confirm_is_refused():
    with pytest.raises(InvalidState):
        job_in("created").execute(EDITS, [], None, AT)


def test_execute_queues_the_edits():
    job = job_in("uploaded")
    job.execute(EDITS, ["sofa"], None, AT)
    assert new_events(job) == ["JobQueued"]
    assert (job.status, job.concepts, job.protect) == (JobStatus.QUEUED, EDITS, ["sofa"])


def test_execute_again_with_the_same_edits_records_nothing():
    job = job_in("queued")
    job.execute(EDITS, [], None, AT)
    assert new_events(job) == []


@pytest.mark.parametrize("results", [["done"], ["done", "done", "failed"], ["failed", "failed", "failed"]],
                         ids=["running", "done", "failed"])
def test_execute_again_with_the_same_edits_after_results_records_nothing(results):
    """A retried execute whose answer was lost, after the worker's first (or last) result."""
    job = job_in("queued")
    for idx, status in enumerate(results):
        job.record_result(idx, status, "", "", "", f"k{idx}", AT)
    job.collect_events()
    job.execute(EDITS, [], None, AT)
    assert new_events(job) == []


@pytest.mark.parametrize("status", ["running", "canceled"])
def test_execute_after_queueing_with_other_edits_or_once_canceled_is_refused(status):
    job = job_in("queued" if status == "canceled" else status)
    if status == "canceled":
        job.cancel("user", AT)
        job.collect_events()
        edits = EDITS
    else:
        edits = {"lamp": {"action": "remove", "value": ""}}
    with pytest.raises(InvalidState):
        job.execute(edits, [], None, AT)
    assert new_events(job) == []


def test_first_result_starts_the_job():
    job = job_in("queued")
    result = job.record_result(0, "done", "o", "p", "", "k0", AT)
    assert new_events(job) == ["JobStarted", "ItemCompleted"]
    assert result.outcome == ResultOutcome.RECORDED
    assert job.status == JobStatus.RUNNING


def test_last_result_finishes_done_when_any_item_succeeded():
    job = job_in("running", items=2)
    result = job.record_result(1, "failed", "", "", "bad input", "k1", AT)
    assert new_events(job) == ["ItemCompleted", "JobFinished"]
    assert result.finished == JobStatus.DONE == job.status


def test_job_fails_when_every_item_failed():
    job = job_in("queued", items=2)
    job.record_result(0, "failed", "", "", "x", "k0", AT)
    result = job.record_result(1, "failed", "", "", "y", "k1", AT)
    assert result.finished == JobStatus.FAILED == job.status


def test_a_repeated_key_returns_the_original_outcome_and_records_nothing():
    job = job_in("running")
    result = job.record_result(2, "failed", "", "", "late", "k0", AT)
    assert new_events(job) == []
    assert (result.outcome, result.idx, result.item_status) == (ResultOutcome.DUPLICATE, 0, "done")


@pytest.mark.parametrize("first", ["done", "failed"])
@pytest.mark.parametrize("second", ["done", "failed"])
def test_a_second_result_for_an_item_under_another_key_changes_nothing_and_answers_the_first(first, second):
    job = job_in("queued")
    job.record_result(1, first, "o", "p", "e", "k1", AT)
    job.collect_events()
    result = job.record_result(1, second, "o2", "p2", "e2", "other", AT)
    assert new_events(job) == []
    assert (result.outcome, result.idx, result.item_status) == (ResultOutcome.ALREADY_RECORDED, 1, first)


def test_canceled_job_ignores_late_item_result():
    job = job_in("running")
    job.cancel("user", AT)
    job.collect_events()
    result = job.record_result(1, "done", "o", "p", "", "k1", AT)
    assert new_events(job) == []
    assert result.outcome == ResultOutcome.IGNORED_CANCELED


def test_results_before_execute_are_refused():
    with pytest.raises(InvalidState):
        job_in("uploaded").record_result(0, "done", "o", "p", "", "k", AT)


def test_result_index_out_of_range_is_refused():
    with pytest.raises(ValidationFailed):
        job_in("queued").record_result(3, "done", "o", "p", "", "k", AT)


def test_cancel_twice_records_one_event():
    job = job_in("queued")
    assert job.cancel("user", AT) is True
    assert job.cancel("user", AT) is False
    assert new_events(job) == ["JobCanceled"]


@pytest.mark.parametrize("terminal", ["done", "failed"])
def test_finished_job_cannot_be_canceled(terminal):
    job = job_in("queued", items=1)
    job.record_result(0, terminal, "o", "p", "e", "k", AT)
    with pytest.raises(InvalidState):
        job.cancel("user", AT)
    assert job.status == JobStatus(terminal)


def _job_that_is(status: str) -> Job:
    if status in ("done", "failed"):
        job = job_in("queued", items=1)
        job.record_result(0, status, "o", "p", "e", "k", AT)
    elif status.startswith("canceled"):
        job = job_in(status.split(" ", 1)[1])
        job.cancel("user", AT)
    else:
        job = job_in(status)
    job.collect_events()
    return job


@pytest.mark.parametrize(("status", "outcome"), [
    ("created", True), ("uploaded", True), ("canceled created", False), ("canceled uploaded", False),
    ("canceled running", False), ("queued", InvalidState), ("running", InvalidState), ("done", InvalidState),
    ("failed", InvalidState)])
def test_the_retention_sweeps_cancel_cancels_only_a_job_never_executed(status, outcome):
    """Its True is the sweeper's leave to delete the job's objects: never for a job executed,
    however it ended (one canceled by its user after an item was done is paid for)."""
    job = _job_that_is(status)
    before = job.status
    if outcome is InvalidState:
        with pytest.raises(InvalidState):
            job.cancel_unstarted("retention", AT)
        assert job.status == before and new_events(job) == []
    else:
        assert job.cancel_unstarted("retention", AT) is outcome
        assert job.status == JobStatus.CANCELED and new_events(job) == (["JobCanceled"] if outcome else [])


@pytest.mark.parametrize("count", [0, 201])
def test_item_count_is_bounded(count):
    with pytest.raises(ValidationFailed):
        Job.create(uuid4(), uuid4(), "interior", count, AT)


@pytest.mark.parametrize("status", ["created", "uploaded", "queued", "running"])
def test_an_unfinished_job_cannot_be_deleted(status):
    job = job_in(status)
    with pytest.raises(InvalidState):
        job.delete(AT)
    assert new_events(job) == [] and not job.deleted


def test_a_terminal_job_is_deleted_once_and_then_takes_no_command():
    job = job_in("queued", items=2)
    job.cancel("changed my mind", AT)
    job.collect_events()
    assert job.delete(AT) is True
    assert new_events(job) == ["JobDeleted"] and job.deleted and job.objects_deleted
    assert job.delete(AT) is False and new_events(job) == []  # idempotent
    assert job.expire(30, AT) is False and new_events(job) == []  # nothing left to expire
    with pytest.raises(InvalidState):
        job.execute(EDITS, [], None, AT)


def test_expiry_removes_a_terminal_jobs_objects_once_and_keeps_the_job():
    unfinished = job_in("running")
    assert unfinished.expire(30, AT) is False and new_events(unfinished) == []
    job = job_in("queued", items=1)
    job.record_result(0, "done", "o", "p", "", "k-last", AT)
    job.collect_events()
    assert job.expire(30, AT) is True
    assert new_events(job) == ["ObjectsExpired"] and job.objects_deleted and not job.deleted
    assert job.expire(30, AT) is False and new_events(job) == []


def test_an_event_decided_with_an_earlier_time_than_the_streams_last_is_stamped_at_that_last():
    # A result decided again after another API process wrote the job first keeps the time its
    # command was made: it must not land before that write ("as of" reads a stream's prefix).
    later = AT.replace(hour=12)
    job = Job.create(uuid4(), uuid4(), "interior", 3, AT)
    job.confirm_upload(later)
    job.execute(EDITS, [], None, AT)  # made before the confirmation was written
    job.record_result(0, "failed", "", "", "x", "k0", later.replace(hour=13))
    assert [(type(e).__name__, e.timestamp.hour) for e in job.collect_events()] == [
        ("JobCreated", 0), ("UploadConfirmed", 12), ("JobQueued", 12), ("JobStarted", 13), ("ItemCompleted", 13)]


@pytest.mark.parametrize("count", [1, 200])
def test_item_count_takes_its_bounds(count):
    assert Job.create(uuid4(), uuid4(), "interior", count, AT).item_count == count


def test_each_item_keeps_only_the_fields_of_its_status():
    job = job_in("queued", items=2)
    job.record_result(0, "done", "out/0.jpg", "prev/0.jpg", "ignored", "k0", AT)
    job.record_result(1, "failed", "out/1.jpg", "prev/1.jpg", "x" * 600, "k1", AT)
    done, failed = job.items[0], job.items[1]
    assert (done.status, done.output_key, done.preview_key, done.error) == ("done", "out/0.jpg", "prev/0.jpg", "")
    assert (failed.status, failed.output_key, failed.preview_key, failed.error) == ("failed", "", "", "x" * 500)


@pytest.mark.parametrize("other", [
    {"protect": ["sofa"]}, {"rule_id": uuid4()}, {"concepts": {"lamp": {"action": "remove", "value": ""}}},
])
def test_executing_a_queued_job_again_with_other_edits_is_refused(other):
    rule_id = uuid4()
    job = Job.create(uuid4(), uuid4(), "interior", 1, AT)
    job.confirm_upload(AT)
    job.execute(EDITS, [], rule_id, AT)
    assert job.rule_id == rule_id and job.concepts == EDITS
    job.collect_events()
    again = {"concepts": EDITS, "protect": [], "rule_id": rule_id, **other}
    with pytest.raises(InvalidState):  # not "already queued" with the first edits kept silently
        job.execute(again["concepts"], again["protect"], again["rule_id"], AT)
    assert new_events(job) == []


@pytest.mark.parametrize(("idx", "status", "key"), [
    (-1, "done", "k"), (1, "weird", "k"), (1, "done", ""),
    *((1, other, "k") for other in ("pending", "queued", "running", "canceled", "Done", "done "))])
def test_a_result_with_a_bad_index_status_or_key_is_refused(idx, status, key):
    job = job_in("running")
    with pytest.raises(ValidationFailed):
        job.record_result(idx, status, "", "", "", key, AT)
    assert new_events(job) == []


def test_a_canceled_job_answers_a_repeated_key_as_a_duplicate_and_another_as_ignored():
    job = job_in("running")  # item 0 recorded under k0
    job.cancel("user", AT)
    job.collect_events()
    assert job.record_result(0, "done", "o", "p", "", "k0", AT).outcome == ResultOutcome.DUPLICATE
    assert job.record_result(0, "failed", "", "", "", "other", AT).outcome == ResultOutcome.IGNORED_CANCELED
    assert new_events(job) == []


def test_a_cancel_reason_is_kept_to_200_characters():
    job = job_in("queued")
    job.cancel("r" * 300, AT)
    [event] = job.collect_events()
    assert isinstance(event, Job.JobCanceled) and event.reason == "r" * 200


def test_a_canceled_jobs_objects_expire_too():
    job = job_in("running")
    job.cancel("user", AT)
    job.collect_events()
    assert job.expire(30, AT) is True and new_events(job) == ["ObjectsExpired"]
