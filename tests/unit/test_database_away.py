"""A database that does not answer (restarted, failing over, a pool wait run out) is a 503
``UNAVAILABLE`` with ``Retry-After``, worth a retry, not a 500 ``INTERNAL`` (which the README calls a
bug); the log says so at most every WARN_EVERY_S (adapters.api.unavailable), with how many were answered so, and
without a password the driver's message quoted. Any other error stays a 500."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from eventsourcing.persistence import DatabaseError as StoreDatabaseError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from fastapi.testclient import TestClient

from adapters.api import unavailable
from adapters.api.app import create_app
from adapters.objects import delete_keys
from adapters.s3_listing import ListingFailed
from adapters.settings import Settings
from application.executors import OutcomeUnknown
from domain.job import JobStatus


class FailingService:
    """Every registration meets ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.sealer = SimpleNamespace(evict=lambda _u: None)
        self.user_views = None

    async def register_async(self, _device_hash: str) -> Any:
        raise self.error


def _client(error: BaseException) -> TestClient:
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None, service=FailingService(error))
    return TestClient(create_app(container), raise_server_exceptions=False)  # type: ignore[arg-type]


def _outcome_unknown() -> BaseException:
    try:
        raise OutcomeUnknown("a conflict that may be this save's own lost answer could not be told") \
            from StoreDatabaseError("a strange answer")
    except OutcomeUnknown as e:
        return e


def _register(api: TestClient) -> Any:
    return api.post("/auth/anon", json={"device_hash": "device-away-0001"})


@pytest.mark.parametrize("error", [
    psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    StoreOperationalError("connection failed: Connection refused"),
    # A save's outcome that could not be told (its conflict may be its own lost answer), whatever
    # the check met: the client tries again, with its Idempotency-Key.
    _outcome_unknown(),
])
def test_a_database_that_does_not_answer_is_a_503_to_retry(error: BaseException) -> None:
    answer = _register(_client(error))
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "UNAVAILABLE" and answer.json()["success"] is False
    assert answer.headers["Retry-After"] == "1"


def test_any_other_error_is_still_a_500() -> None:
    answer = _register(_client(psycopg.ProgrammingError("syntax error at or near \"SELEC\"")))
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "INTERNAL"


def test_an_outage_is_said_once_in_a_while_not_per_request(caplog: pytest.LogCaptureFixture) -> None:
    api = _client(psycopg.OperationalError('connection to "postgresql://palette:s3cr3t@db/palette" failed'))
    with caplog.at_level(logging.WARNING, logger="palette.api"):
        answers = [_register(api).status_code for _ in range(5)]
    assert answers == [503] * 5
    said = [r.getMessage() for r in caplog.records if r.name == "palette.api"]
    assert len(said) == 1 and "did not answer" in said[0], said
    assert "s3cr3t" not in said[0] and "***" in said[0]
    assert api.app.state.database_away.count == 5  # type: ignore[attr-defined]


@pytest.mark.parametrize("error", [
    psycopg.errors.ProgramLimitExceeded("index row size 3016 exceeds btree version 4 maximum 2704"),
    psycopg.errors.StatementTooComplex("stack depth limit exceeded"),
    psycopg.errors.SqlRoutineException("function result type must be specified"),
    psycopg.errors.InvalidPassword('password authentication failed for user "palette"'),
])
def test_an_operational_error_a_retry_cannot_mend_is_a_500_with_its_traceback(
        error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    for raised in (error, _wrapped(error)):
        with caplog.at_level(logging.ERROR, logger="palette.api"):
            answer = _register(_client(raised))
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "INTERNAL", answer.text
        assert any(r.exc_info for r in caplog.records if r.name == "palette.api")
        caplog.clear()


def _wrapped(error: BaseException) -> BaseException:
    """As eventsourcing raises it: its OperationalError from the driver's."""
    try:
        raise StoreOperationalError(str(error)) from error
    except StoreOperationalError as e:
        return e


def test_a_request_with_an_idempotency_key_meets_the_database_first_and_is_a_503_too() -> None:
    """IdempotencyKeys claims the key before the app runs, outside its exception handlers: an
    outage was a bare 500 (no envelope, a traceback) for exactly the requests that retry safely."""
    import contextlib
    from datetime import UTC, datetime
    from uuid import uuid4

    from adapters.api.envelope import fail
    from adapters.api.idempotency import IdempotencyKeys

    class Away:
        @contextlib.asynccontextmanager
        async def connection(self) -> Any:
            raise psycopg.OperationalError("connection failed: Connection refused")
            yield

    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    app = create_app(SimpleNamespace(settings=settings, read_pool=None,  # type: ignore[arg-type]
                                     service=FailingService(RuntimeError("not reached"))))
    token = app.state.tokens.issue(uuid4(), datetime.now(UTC))
    api = TestClient(IdempotencyKeys(app, Away(), app.state.verified_tokens, fail), raise_server_exceptions=False)
    answer = api.post("/jobs", headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k1"},
                      json={"preset": "interior", "item_count": 1})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "UNAVAILABLE", answer.text
    assert answer.headers["Retry-After"] == "1"


def _disk_full() -> BaseException:
    error = psycopg.errors.DiskFull('could not extend file "base/16384/16389": No space left on device\n'
                                   "HINT:  Check free disk space.")
    try:
        raise OutcomeUnknown("a save whose outcome could not be told") from StoreOperationalError(str(error))
    except OutcomeUnknown as e:
        e.__cause__.__cause__ = error  # type: ignore[union-attr]
        return e


@pytest.mark.parametrize("error", [
    psycopg.errors.DiskFull('could not extend file "base/16384/16389": No space left on device'),
    _disk_full(),
])
def test_a_database_whose_disk_is_full_is_a_503_that_says_so(error: BaseException) -> None:
    """PostgreSQL refusing a write on a full disk answered at once: the 503 says the disk is full,
    not that the database did not answer in time (found filling the data directory's disk)."""
    answer = _register(_client(error))
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == {"code": "UNAVAILABLE", "message": unavailable.OUT_OF_SPACE}


class AwayOnRead(FailingService):
    """A service whose event store does not answer: an erasure fails before its tombstone."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.executor = SimpleNamespace(read=self._read)

    def _read(self, _user_id: Any) -> Any:
        raise self.error


def test_an_erasure_the_database_cut_short_before_its_tombstone_may_be_asked_again() -> None:
    """DELETE /me answered 503 (nothing recorded, not even the tombstone) refused that user's
    tokens in this process for their whole lifetime: the retry the 503 invites was a 401, and the
    user was neither erased nor able to ask again."""
    error = psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None, service=AwayOnRead(error), s3=None)
    api = TestClient(create_app(container), raise_server_exceptions=False)  # type: ignore[arg-type]
    token = api.app.state.tokens.issue(uuid4(), datetime.now(UTC))  # type: ignore[attr-defined]
    answers = [api.delete("/me", headers={"Authorization": f"Bearer {token}"}) for _ in range(2)]
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]


class StoreAway(FailingService):
    """A service whose object store fails every confirm-upload with ``error``."""

    async def confirm_upload_async(self, _user_id: Any, _job_id: Any) -> Any:
        raise self.error


def _confirm(error: BaseException) -> Any:
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None, service=StoreAway(error))
    api = TestClient(create_app(container), raise_server_exceptions=False)  # type: ignore[arg-type]
    token = api.app.state.tokens.issue(uuid4(), datetime.now(UTC))  # type: ignore[attr-defined]
    return api.post(f"/jobs/{uuid4()}/confirm-upload", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("error", [
    ListingFailed("S3 LIST in bucket 'b' failed (ConnectionRefusedError: refused)", retriable=True),
    ListingFailed("S3 LIST in bucket 'b' answered 503 SlowDown", 503, "SlowDown", retriable=True),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:8333/b"),
    ClientError({"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                "DeleteObjects"),
])
def test_an_object_store_that_does_not_answer_is_a_503_to_retry_not_a_bug(error: BaseException) -> None:
    """An S3 outage (unreachable, 5xx) was a 500 INTERNAL, which the README calls a bug, with a
    traceback logged per request."""
    answer = _confirm(error)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "UNAVAILABLE" and answer.headers["Retry-After"] == "1"


@pytest.mark.parametrize("error", [
    ListingFailed("S3 LIST in bucket 'b' answered 403 AccessDenied", 403, "AccessDenied"),
    ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListObjectsV2"),
])
def test_an_object_store_that_refuses_us_is_still_a_500(error: BaseException) -> None:
    assert _confirm(error).status_code == 500


def _not_deleted(code: str) -> OSError:
    """What deleting a key raises when S3's DeleteObjects answers ``code`` for it."""
    s3 = SimpleNamespace(delete_objects=lambda **_: {"Errors": [{"Key": "inputs/u/j/0.jpg", "Code": code}]})
    with pytest.raises(OSError) as e:
        delete_keys(s3, "b", ["inputs/u/j/0.jpg"])
    return e.value


@pytest.mark.parametrize(("code", "status"), [("InternalError", 503), ("SlowDown", 503), ("AccessDenied", 500)])
def test_a_key_the_object_store_failed_to_delete_is_a_503_one_it_refused_a_500(code: str, status: int) -> None:
    """S3 says a failure of its own per key inside a DeleteObjects' 200 (DELETE /jobs, DELETE /me):
    an outage that still answers was a 500 INTERNAL, a bug, with a traceback per request."""
    assert _confirm(_not_deleted(code)).status_code == status


@dataclasses.dataclass
class JobStarted:
    """A job's stored event as a stream shows it (its fields, less the stream's bookkeeping)."""

    originator_version: int
    timestamp: str


class AwayMidStream(FailingService):
    """A job running, whose events are read once, then the database goes (``error``)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.reads = 0
        self.app = SimpleNamespace(events=SimpleNamespace(get=self._events))

    async def get_job_async(self, _user_id: Any, _job_id: Any) -> Any:
        return SimpleNamespace(status=JobStatus.RUNNING, version=1)

    def _events(self, _job_id: Any, gt: int) -> list[Any]:
        self.reads += 1
        if self.reads > 1:
            raise self.error
        return [JobStarted(originator_version=2, timestamp="2026-01-01T00:00:00+00:00")]


@pytest.mark.parametrize("error", [
    psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
    _wrapped(psycopg.errors.AdminShutdown("terminating connection due to administrator command")),
])
def test_a_job_event_stream_the_database_leaves_midway_ends_as_at_its_cut_off_not_with_a_traceback(
        error: BaseException) -> None:
    """Its 200 already sent, the error escaped the stream: "Caught handled exception, but response
    already started", a traceback in the log per open stream (256 a process) at each outage. The
    stream now ends, as at SSE_MAX_S: its client resumes with Last-Event-ID."""
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None, service=AwayMidStream(error))
    api = TestClient(create_app(container))  # type: ignore[arg-type]
    token = api.app.state.tokens.issue(uuid4(), datetime.now(UTC))  # type: ignore[attr-defined]
    answer = api.get(f"/jobs/{uuid4()}/events", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.text.startswith("id: 2\nevent: JobStarted\n"), answer.text
    assert api.app.state.database_away.count == 1  # type: ignore[attr-defined]
    assert api.app.state.stream_slots._open == {}  # type: ignore[attr-defined]  # its slot given back


def test_answers_sent_without_their_key_kept_are_not_logged_as_503s(caplog: pytest.LogCaptureFixture) -> None:
    """An Idempotency-Key's answer the database could not keep still reaches its client (its real
    status): the log said "N request(s) answered 503 so far" of them, sending an operator to look
    for 503s that were never answered."""
    from adapters.api.envelope import fail
    from adapters.api.idempotency import IdempotencyKeys

    keys = IdempotencyKeys(None, None, None, fail)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger=unavailable.log.name):
        keys.unsettled.note(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert "answered 503" not in caplog.text, caplog.text
    assert "1 answer(s) sent without their key kept so far" in caplog.text, caplog.text
