"""What decides between parking an event and restarting the process: stored bytes that do not
decode become an envelope the folds refuse (never an exception in the relay or the sweep), and
only a failure of the database itself counts as transient."""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime

import psycopg
import pytest
from eventsourcing.persistence import OperationalError as StoreOperationalError
from hypothesis import given
from hypothesis import strategies as st
from psycopg import errors

from domain.contracts.envelope import EventEnvelope, decode
from projections import store
from projections.batch import Plan, fold, merge_gaps, plan
from projections.models import READ_MODELS
from projections.store import BatchResult, add_result, describe, is_transient, storable
from projections.stored_events import UNREADABLE, from_notification, stored_message

AT = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Stored:
    id: int
    originator_id: uuid.UUID
    originator_version: int
    topic: str
    state: bytes


class NoTranscoder:
    def decode(self, data: bytes) -> dict[str, object]:
        raise ValueError("not a state this transcoder wrote")


def _message(n: Stored) -> bytes:
    """The envelope's JSON as the relay and replay write it from the stored columns."""
    return stored_message(n.id, str(n.originator_id), n.originator_version, n.topic, n.state, NoTranscoder())[0]


def test_an_undecodable_stored_event_becomes_an_envelope_every_fold_parks() -> None:
    for state in (b"{not json", b"\x00\x01", b'{"no_timestamp": 1}', b'{"timestamp": "yesterday"}',
                  b'{"timestamp": "2026-01-01T00:00:00"}',  # no offset: no consumer could take its envelope
                  # A typed value beside a field holding a malformed one: the field is read too.
                  b'{"timestamp": "2026-01-01T00:00:00+00:00", "k": {"_type_": "x", "_data_": "y", '
                  b'"e": {"_type_": "uuid_hex", "_data_": 1}}}'):
        n = Stored(7, uuid.uuid4(), 1, "domain.job:Job.JobCreated", state)
        env = from_notification(n, NoTranscoder())
        assert UNREADABLE in env.data and env.type == "JobCreated"
        assert decode(_message(n)).data == env.data  # the relay's path too
        model = READ_MODELS["jobs_log"]
        p = plan(model, [env], {}, set())
        folded = fold(model, {}, p.todo, p.held, set())
        assert [status for _, _, status in folded.parks] == ["parked"] and folded.applied == 0


def test_only_a_failing_database_is_transient() -> None:
    assert is_transient(StoreOperationalError("pool timed out"))
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert is_transient(errors.SerializationFailure())  # 40001
    assert is_transient(errors.AdminShutdown())  # 57P01
    assert is_transient(errors.LockNotAvailable())  # 55P03
    assert not is_transient(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))
    assert not is_transient(errors.ProgramLimitExceeded())  # 54000: this row will never fit
    assert not is_transient(KeyError("preset"))


def test_an_error_message_quoting_the_bad_value_can_be_stored() -> None:
    text = describe(ValueError("bad name 'x\x00y\ud800'"))
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate left
    assert storable("x" * 5000).__len__() == 2000


def test_a_state_nested_deeper_than_orjson_writes_is_published_as_read() -> None:
    """orjson reads 1,024 levels but writes 255: such a state leaves as ``json`` writes it (before,
    the relay stopped on it, again at every restart)."""
    deep: object = 7
    for _ in range(300):
        deep = [deep]
    n = Stored(7, uuid.uuid4(), 1, "domain.job:Job.JobCreated",
               json.dumps({"timestamp": "2026-01-01T00:00:00+00:00", "k": {"deep": deep}}).encode())
    env = from_notification(n, NoTranscoder())
    assert env.data == {"k": {"deep": deep}} and decode(_message(n)) == env


# -- what a delivery holds: copies, stale redeliveries, holes -------------------------------------
def _rule_event(stream: uuid.UUID, version: int) -> EventEnvelope:
    return EventEnvelope(id=1000 + version, stream_id=stream, stream_type="Rule", version=version,
                         type="RuleUpdated", timestamp=AT, data={})


@given(st.integers(0, 5), st.lists(st.integers(1, 12), max_size=20))
def test_a_batch_folds_only_the_unbroken_run_after_what_was_folded_and_names_the_hole(
        tracked: int, delivered: list[int]) -> None:
    """Whatever order, copies and stale versions a delivery holds, what is planned is the
    versions right after ``tracked`` up to the first missing one, each once and in order; every
    other copy counts as skipped, and a hole names the range to read from the log."""
    stream = uuid.uuid4()
    p = plan(READ_MODELS["rules"], [_rule_event(stream, v) for v in delivered], {stream: tracked}, set())
    new = {v for v in delivered if v > tracked}
    run = []
    while tracked + len(run) + 1 in new:
        run.append(tracked + len(run) + 1)
    assert [e.version for e in p.todo] == run
    assert p.skipped == len(delivered) - len(new)
    assert p.gaps == ({stream: (tracked, max(new))} if len(run) < len(new) else {})


def test_the_range_read_for_a_hole_covers_what_every_model_misses_of_the_stream() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    plans = [Plan(gaps={a: (2, 5)}), Plan(gaps={a: (0, 3), b: (1, 2)}), Plan(gaps={a: (1, 7)})]
    assert merge_gaps(plans) == {a: (0, 7), b: (1, 2)}  # the lowest start of one, the highest end of another


class _RefusingOne:
    """The rules model, whose fold refuses one event (a poison event)."""

    def __init__(self, stream: uuid.UUID, version: int) -> None:
        self.poison = (stream, version)
        self.model = READ_MODELS["rules"]

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def apply(self, rows: object, e: EventEnvelope) -> list[object]:
        if (e.stream_id, e.version) == self.poison:
            raise ValueError("poison")
        return []


def test_a_refused_event_is_parked_and_its_streams_later_events_and_a_parked_streams_are_held_unfolded() -> None:
    poisoned, fine, parked_before = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    model = _RefusingOne(poisoned, 2)
    delivered = [_rule_event(s, v) for s in (poisoned, fine, parked_before) for v in (1, 2, 3)]
    p = plan(model, delivered, {}, {parked_before})  # type: ignore[arg-type]
    assert [(e.stream_id, e.version) for e in p.held] == [(parked_before, v) for v in (1, 2, 3)]
    out = fold(model, {}, p.todo, p.held, {parked_before})  # type: ignore[arg-type]
    assert out.advanced == {poisoned: 1, fine: 3} and out.applied == 4
    assert [(e.stream_id, e.version, status) for e, _, status in out.parks] == [
        *((parked_before, v, "held") for v in (1, 2, 3)), (poisoned, 2, "parked"), (poisoned, 3, "held")]


def test_results_added_up_count_every_field() -> None:
    total = BatchResult(applied=1, skipped=2, parked=3, filled=4, per_model={"users": 1, "rules": 2})
    add_result(total, BatchResult(applied=10, skipped=20, parked=30, filled=40,
                                  per_model={"users": 5, "jobs_log": 7}))
    assert total == BatchResult(applied=11, skipped=22, parked=33, filled=44,
                                per_model={"users": 6, "rules": 2, "jobs_log": 7})
    # a field added to BatchResult is added here, and to add_result
    assert {f.name for f in fields(BatchResult)} == {"applied", "skipped", "parked", "filled",
                                                      "per_model"}


class _RecordingConn:
    """A connection that only records what is sent through it (a park would be)."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def transaction(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def execute(self, query: object, params: object = None) -> None:
        self.sent.append(query)


def test_a_database_failing_while_a_refused_batch_is_applied_event_by_event_parks_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch and its model's share are refused (a poison event); applied one by one, the
    database fails: that raises (the projector restarts and tries again) rather than park events
    the database, not their fold, could not take."""
    def failing(conn: object, envelopes: list[EventEnvelope], *args: object, **kwargs: object) -> BatchResult:
        raise ValueError("poison") if len(envelopes) > 1 else errors.SerializationFailure()

    monkeypatch.setattr(store, "apply_batch", failing)
    conn, stream = _RecordingConn(), uuid.uuid4()
    with pytest.raises(errors.SerializationFailure):
        store.apply_isolating(conn, [_rule_event(stream, 1), _rule_event(stream, 2)],  # type: ignore[arg-type]
                              models=[READ_MODELS["rules"]])
    assert conn.sent == []
