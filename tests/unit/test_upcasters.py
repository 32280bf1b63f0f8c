"""The storage contract of each aggregate's events: a stored event of every past version reads
back, through the aggregate and through the envelope, at its class's current version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from application.services import PaletteApplication
from domain.job import Job, JobStatus
from domain.user import REDACTED_DEVICE_KEY, User
from projections.stored_events import from_notification, from_stored, versioned_events

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
    cases = {"domain.job:Job.JobQueued": 2, "domain.user:User.Registered": 2,
             "domain.user:User.CreditsGranted": 2}  # the cases below
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


def test_credits_granted_v1_reads_back_with_no_grant_id_and_counts_in_the_balance() -> None:
    """A grant stored before grants had ids (CreditsGranted v1: amount and reason only)."""
    app, user_id = in_memory(), uuid4()
    store(app, user_id, [
        ("domain.user:User.Registered", {"originator_topic": "domain.user:User", "device_key": "hmac-sha256:0a",
                                         "plan": "free", "class_version": 2}),
        ("domain.user:User.CreditsGranted", {"amount": 50, "reason": "signup"}),
        ("domain.user:User.CreditsGranted", {"amount": 7, "reason": "goodwill", "class_version": 1}),
    ])
    user = app.repository.get(user_id)
    assert isinstance(user, User) and (user.balance, user.granted, user.grant_ids) == (57, 57, set())
    granted = from_notification(app.recorder.select_notifications(start=3, limit=1)[0], app.mapper.transcoder)
    assert granted.type == "CreditsGranted"
    assert granted.data == {"amount": 7, "reason": "goodwill", "grant_id": None, "class_version": 2}


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


# Any text JSON can hold as UTF-8 (no lone surrogate: the transcoder could not store one).
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
# A concept's edit: {action, value} as normalise_edits gives it, or any other text keys.
EDIT = st.dictionaries(TEXT.filter(lambda k: k != "_type_"), TEXT, max_size=3)
V1_STATES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "domain.job:Job.JobQueued": st.fixed_dictionaries({
        "concepts": st.dictionaries(TEXT, EDIT, max_size=3), "protect": st.lists(TEXT, max_size=3),
        "rule_id": st.none() | st.uuids(), "output_template": TEXT}),
    "domain.user:User.Registered": st.fixed_dictionaries({
        "originator_topic": st.just("domain.user:User"), "device_hash": TEXT, "plan": TEXT}),
    "domain.user:User.CreditsGranted": st.fixed_dictionaries({"amount": st.integers(1, 10**6), "reason": TEXT}),
}


def at_v2(topic: str, v1: dict[str, Any]) -> dict[str, Any]:
    """The oracle: what each v1 state holds at v2, written out here, not through the upcasters."""
    if topic == "domain.job:Job.JobQueued":
        return {k: v for k, v in v1.items() if k != "output_template"}
    if topic == "domain.user:User.CreditsGranted":
        return {**v1, "grant_id": None}
    return {"originator_topic": v1["originator_topic"], "plan": v1["plan"], "device_key": REDACTED_DEVICE_KEY}


def plain(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@given(data=st.data(), explicit=st.booleans(), at=st.datetimes(timezones=st.just(UTC)))
@settings(max_examples=200, deadline=None)
def test_both_upcast_paths_agree_with_the_oracle_on_any_v1_state(data: st.DataObject, explicit: bool,
                                                                 at: datetime) -> None:
    """A stored v1 state of every versioned event, read by the mapper (what aggregates fold) and
    as an envelope (the relay, catch-up, replay), field by field: both are the oracle's v2 state."""
    topic = data.draw(st.sampled_from(sorted(V1_STATES)))
    assert set(V1_STATES) == set(versioned_events()) and all(c.class_version == 2 for c in versioned_events().values())
    v1 = data.draw(V1_STATES[topic])
    app, stream = in_memory(), uuid4()
    stored_state = {"timestamp": at, **v1, **({"class_version": 1} if explicit else {})}
    stored = StoredEvent(stream, 1, topic, app.mapper.transcoder.encode(stored_state))
    expected = at_v2(topic, v1)
    event: Any = app.mapper.to_domain_event(stored)
    by_mapper = {k: plain(v) for k, v in vars(event).items() if k not in ("originator_id", "originator_version",
                                                                            "timestamp")}
    assert (by_mapper, event.timestamp) == (plain(expected), at)
    envelope = from_stored(7, stream, 1, topic, stored.state, app.mapper.transcoder)
    assert envelope.timestamp == at and envelope.data.pop("class_version") == 2
    expected.pop("originator_topic", None)  # the envelope's stream_type says it
    assert envelope.data == plain(expected)
