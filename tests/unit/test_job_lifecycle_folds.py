"""A deleted job leaves every read model; an expired one stays listed; the rows a fold changes are
the ones it names to be read and written."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from application.services import PaletteApplication
from domain.contracts.envelope import EventEnvelope
from domain.job import Job
from projections.memory import MemoryReadStore
from projections.models import READ_MODELS
from projections.rebuild import fold_log, iter_envelopes

AT = datetime(2026, 11, 1, tzinfo=UTC)


def _job_events(job_id: uuid.UUID, user_id: uuid.UUID, items: int, last: list[tuple[str, dict[str, Any]]],
                first_position: int) -> list[EventEnvelope]:
    steps: list[tuple[str, dict[str, Any]]] = [
        ("JobCreated", {"user_id": str(user_id), "preset": "interior", "item_count": items}),
        ("UploadConfirmed", {}), ("JobQueued", {"concepts": {}, "protect": [], "rule_id": None}),
        ("JobCanceled", {"reason": "test"}), *last]
    return [EventEnvelope(id=first_position + n, stream_id=job_id, stream_type="Job", version=n + 1, type=kind,
                          timestamp=AT, data=data) for n, (kind, data) in enumerate(steps)]


def test_a_deleted_job_leaves_jobs_log_and_job_items_log_and_an_expired_one_stays():
    user = uuid.uuid4()
    deleted, expired, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store = MemoryReadStore()
    store.apply([*_job_events(deleted, user, 3, [("JobDeleted", {"item_count": 3})], 1),
                 *_job_events(expired, user, 2, [("ObjectsExpired", {"retention_days": 30})], 100),
                 *_job_events(kept, user, 1, [], 200)])
    jobs, items = store.table("jobs_log"), store.table("job_items_log")
    assert set(jobs) == {(expired,), (kept,)}
    assert sorted(k for k in items) == sorted([(expired, 0), (expired, 1), (kept, 0)])
    assert jobs[(expired,)]["status"] == "canceled"


@given(items=st.integers(1, 6), results=st.dictionaries(st.integers(0, 5), st.sampled_from(["done", "failed"])))
def test_a_job_canceled_part_way_and_deleted_leaves_no_row_of_any_item(items, results):
    """The aggregate's own events, stored and folded: every item's row goes, those without a
    result too (a job canceled after some of its items)."""
    job = Job.create(uuid.uuid4(), uuid.uuid4(), "interior", items, AT)
    job.confirm_upload(AT)
    job.execute({}, [], None, AT)
    for idx, status in results.items():
        if idx < items:
            job.record_result(idx, status, "o", "p", "e", f"k{idx}", AT)
    if not job.status.terminal:
        job.cancel("user", AT)
    job.delete(AT)
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.save(job)
    store = MemoryReadStore()
    store.apply(list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None)))
    assert (store.table("jobs_log"), store.table("job_items_log")) == ({}, {})


def test_a_finished_job_names_its_rule_its_finish_and_its_failed_item_without_keys():
    job, rule = uuid.uuid4(), uuid.uuid4()
    done = datetime(2026, 11, 2, tzinfo=UTC)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("JobCreated", {"user_id": str(uuid.uuid4()), "preset": "interior", "item_count": 1}),
        ("UploadConfirmed", {}), ("JobQueued", {"concepts": {}, "protect": [], "rule_id": str(rule)}),
        ("JobStarted", {}),
        ("ItemCompleted", {"idx": 0, "status": "failed", "output_key": "", "preview_key": "", "error": "boom"}),
        ("JobFinished", {"status": "failed"})]
    store = MemoryReadStore()
    store.apply([EventEnvelope(id=n + 1, stream_id=job, stream_type="Job", version=n + 1, type=kind,
                               timestamp=done if kind == "JobFinished" else AT, data=data)
                 for n, (kind, data) in enumerate(steps)])
    row = store.table("jobs_log")[(job,)]
    assert (row["status"], row["rule_id"], row["done_items"], row["failed_items"]) == ("failed", str(rule), 0, 1)
    assert (row["created_at"], row["finished_at"], row["updated_at"], row["version"]) == (AT, done, done, 6)
    item = store.table("job_items_log")[(job, 0)]
    assert (item["status"], item["output_key"], item["preview_key"], item["error"]) == ("failed", None, None, "boom")


@given(items=st.integers(1, 4), results=st.lists(st.sampled_from(["done", "failed"]), max_size=4),
       deleted=st.booleans())
def test_every_row_a_fold_changes_is_one_its_model_names_for_the_event(items, results, deleted):
    """PostgreSQL reads and writes only the keys ``keys_for`` names (a delete included): a row a
    fold changed beyond them would stay as it was there, while the memory store changes it."""
    job, user, rule = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ids = str(job)
    steps: list[tuple[uuid.UUID, str, str, dict[str, Any]]] = [
        (user, "User", "Registered", {"plan": "free"}), (user, "User", "CreditsGranted", {"amount": 9}),
        (user, "User", "CreditsReserved", {"amount": items, "job_id": ids}),
        (rule, "Rule", "RuleCreated", {"user_id": str(user), "name": "r", "preset_id": "interior", "concepts": {},
                                       "protect": []}),
        (rule, "Rule", "RuleDeleted", {}),
        (job, "Job", "JobCreated", {"user_id": str(user), "preset": "interior", "item_count": items}),
        (job, "Job", "JobQueued", {"concepts": {}, "protect": [], "rule_id": str(rule)}),
        *[(job, "Job", "ItemCompleted", {"idx": i, "status": status, "output_key": "o" if status == "done" else "",
                                         "preview_key": "", "error": "" if status == "done" else "x"})
          for i, status in enumerate(results[:items])],
        (job, "Job", "JobFinished", {"status": "done"}),
        (user, "User", "CreditsSettled", {"spent": 1, "refunded": items - 1, "job_id": ids}),
        *([(job, "Job", "JobDeleted", {"item_count": items})] if deleted else []),
        (user, "User", "Erased", {})]
    versions: dict[uuid.UUID, int] = {}
    events = []
    for n, (stream, kind, event_type, data) in enumerate(steps):
        versions[stream] = versions.get(stream, 0) + 1
        events.append(EventEnvelope(id=n + 1, stream_id=stream, stream_type=kind, version=versions[stream],
                                    type=event_type, timestamp=AT, data=data))
    for model in READ_MODELS.values():
        rows: dict[Any, Any] = {}
        for e in events:
            if e.stream_type == model.stream_type:
                changed, _ = model.evolve(rows, e)
                assert set(changed) <= set(model.keys_for(e)), (model.name, e.type)
                rows.update(changed)


def test_the_reference_fold_stops_a_stream_at_its_first_event_that_cannot_be_folded_and_only_that_stream():
    """As the live projector parks it: the stream keeps what it had before that event, its later
    events are not folded, and the other streams fold on."""
    broken, healthy, user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def item(idx: int) -> dict[str, Any]:
        return {"idx": idx, "status": "done", "output_key": "o", "preview_key": "p", "error": ""}

    steps = [(broken, "JobCreated", {"user_id": str(user), "preset": "interior", "item_count": 1}),
             (healthy, "JobCreated", {"user_id": str(user), "preset": "interior", "item_count": 1}),
             (broken, "ItemCompleted", item(5)),  # no item 5: the fold raises
             (broken, "ItemCompleted", item(0)),
             (healthy, "ItemCompleted", item(0))]
    versions: dict[uuid.UUID, int] = {}
    events = []
    for n, (stream, kind, data) in enumerate(steps):
        versions[stream] = versions.get(stream, 0) + 1
        events.append(EventEnvelope(id=n + 1, stream_id=stream, stream_type="Job", version=versions[stream],
                                    type=kind, timestamp=AT, data=data))
    rows, _, tracking, count, failed = fold_log(READ_MODELS["job_items_log"], events)
    assert (failed, tracking, count) == ({broken}, {broken: 1, healthy: 2}, 5)
    assert (rows[(broken, 0)]["status"], rows[(healthy, 0)]["status"]) == ("pending", "done")
