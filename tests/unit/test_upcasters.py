"""The storage contract of each aggregate's events: a stored event of every past version reads
back, through the aggregate and through the envelope, at its class's current version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from application.services import PaletteApplication
from domain.job import Job, JobStatus
from domain.user import REDACTED_DEVICE_KEY, User
from projections.stored_events import from_notification, versioned_events

AT = datetime(2026, 1, 1, tzinfo=UTC)


def in_memory() -> PaletteApplication:
    return PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def job_v1_queued(job_id: UUID, user_id: UUID) -> list[tuple[str, dict[str, Any]]]:
    """A job queued by the code that still stored ``output_template`` (JobQueued v1)."""
    return [
        ("domain.job:Job.JobCreated", {"originator_topic": "domain.job:Job", "user_id": user_id,
                                       "preset": "interior", "item_count": 2}),
        ("domain.job:Job.UploadConfirmed", {}),
        ("domain.job:Job.JobQueued", {"concepts": {"wall": {"action": "recolor", "value": "#5b7f95"}},
                                      "protect": ["sofa"], "rule_id": None, "output_template": "{name}-v1"}),
    ]


def user_v1_registered(user_id: UUID) -> list[tuple[str, dict[str, Any]]]:
    """A user registered before device keys (Registered v1 held the raw device hash)."""
    return [("domain.user:User.Registered", {"originator_topic": "domain.user:User",
                                             "device_hash": "raw-device-hash-0001", "plan": "pro"})]


def store(app: PaletteApplication, stream: UUID, events: list[tuple[str, dict[str, Any]]]) -> None:
    encode = app.mapper.transcoder.encode
    app.recorder.insert_events([StoredEvent(stream, n, topic, encode({"timestamp": AT, **state}))
                                for n, (topic, state) in enumerate(events, 1)])


def test_every_versioned_event_has_an_upcaster_per_step_and_a_case_here() -> None:
    cases = {"domain.job:Job.JobQueued": 2, "domain.user:User.Registered": 2}  # the cases below
    found = {topic: cls.class_version for topic, cls in versioned_events().items()}
    assert found == cases
    for topic, cls in versioned_events().items():
        for version in range(1, cls.class_version):
            assert callable(getattr(cls, f"upcast_v{version}_v{version + 1}")), topic


def test_job_queued_v1_reads_back_without_its_output_template() -> None:
    app, job_id, user_id = in_memory(), uuid4(), uuid4()
    store(app, job_id, job_v1_queued(job_id, user_id))
    job = app.repository.get(job_id)
    assert isinstance(job, Job)
    assert (job.status, job.protect, job.concepts["wall"]["value"]) == (JobStatus.QUEUED, ["sofa"], "#5b7f95")
    queued = from_notification(app.recorder.select_notifications(start=3, limit=1)[0], app.mapper.transcoder)
    assert queued.type == "JobQueued"
    assert queued.data == {"concepts": {"wall": {"action": "recolor", "value": "#5b7f95"}}, "protect": ["sofa"],
                           "rule_id": None, "class_version": 2}


def test_user_registered_v1_reads_back_with_the_raw_hash_redacted() -> None:
    app, user_id = in_memory(), uuid4()
    store(app, user_id, user_v1_registered(user_id))
    user = app.repository.get(user_id)
    assert isinstance(user, User) and user.plan == "pro"
    registered = from_notification(app.recorder.select_notifications(start=1, limit=1)[0], app.mapper.transcoder)
    assert registered.data == {"plan": "pro", "device_key": REDACTED_DEVICE_KEY, "class_version": 2}


@pytest.mark.parametrize("topic", sorted(versioned_events()))
def test_an_event_at_its_current_version_is_left_as_it_is(topic: str) -> None:
    from projections.stored_events import upcast_state

    state = {"class_version": versioned_events()[topic].class_version, "anything": 1}
    assert upcast_state(topic, dict(state)) == state


def test_the_stored_topics_are_the_event_classes_and_never_the_bases_eventsourcing_makes() -> None:
    from domain.contracts.streams import STREAMS, stream_topics
    from projections.parquet import event_schemas
    from projections.replay import event_topics

    every = {t for kind in STREAMS for t in stream_topics(kind)}
    assert not {t for t in every if t.rsplit(".", 1)[1] in ("Event", "Created")}  # never stored
    assert "domain.job:Job.JobCreated" in every and "domain.user:User.Registered" in every
    assert every == {t for topics in event_topics().values() for t in topics} == set(event_schemas())
    assert set(versioned_events()) <= every
