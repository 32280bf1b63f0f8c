"""What decides between parking an event and restarting the process: stored bytes that do not
decode become an envelope the folds refuse (never an exception in the relay or the sweep), and
only a failure of the database itself counts as transient."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import psycopg
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg import errors

from domain.contracts.envelope import decode
from projections.batch import fold, plan
from projections.models import READ_MODELS
from projections.store import describe, is_transient, storable
from projections.stored_events import UNREADABLE, encode_notification, from_notification


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


def test_an_undecodable_stored_event_becomes_an_envelope_every_fold_parks() -> None:
    for state in (b"{not json", b"\x00\x01", b'{"no_timestamp": 1}', b'{"timestamp": "yesterday"}',
                  b'{"timestamp": "2026-01-01T00:00:00"}',  # no offset: no consumer could take its envelope
                  # A typed value beside a field holding a malformed one: the field is read too.
                  b'{"timestamp": "2026-01-01T00:00:00+00:00", "k": {"_type_": "x", "_data_": "y", '
                  b'"e": {"_type_": "uuid_hex", "_data_": 1}}}'):
        n = Stored(7, uuid.uuid4(), 1, "domain.job:Job.JobCreated", state)
        env = from_notification(n, NoTranscoder())
        assert UNREADABLE in env.data and env.type == "JobCreated"
        assert decode(encode_notification(n, NoTranscoder())).data == env.data  # the relay's path too
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
    assert env.data == {"k": {"deep": deep}} and decode(encode_notification(n, NoTranscoder())) == env
