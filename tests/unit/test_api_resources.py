"""The API's bounded helpers without I/O: presigned GET URLs equal boto3's, /health's cached
checks, event stream slots per user, callback auth modes, counts in request bodies, and the
recent writes a read waits for."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from unittest import mock
from uuid import uuid4

import botocore.auth
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters.api.consistency import EXPIRED_PER_RECORD, STREAMS_PER_USER, WRITE_TTL_S, LastWrites
from adapters.api.envelope import STATUS_BY_CODE, fail
from adapters.api.held_responses import SlotStream, StreamSlots
from adapters.api.rate_limit import RateLimited
from adapters.api.routes_users import CachedCheck, health, readyz
from adapters.api.schemas import AnonCreate, CallbackCreate, JobCreate, JobExecute, RuleCreate, RuleUpdate
from adapters.s3_signing import GetUrls
from adapters.settings import Settings
from domain.contracts.callback import sign_callback, verify_callback
from infra.s3 import s3_client


# -- presigned GET URLs -------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.com",
                                      "https://s3.example.com:443", "http://store:80/base", "http://[::1]:9000",
                                      "http://S3.Example.COM:9000", "https://S3.EXAMPLE.com:443"])
@pytest.mark.parametrize("key", ["outputs/u/j/0_result.png", "previews/a b/c~d+e%f_thumb.jpg", "outputs/ü/0.png",
                                 "masks/u/j/0_a=b&c?d#e;f:g@h$i,j!k*l'm(n)o[p]q.png"])
def test_presigned_get_urls_are_the_very_ones_boto3_makes(endpoint: str, key: str) -> None:
    settings = Settings(s3_endpoint=endpoint, s3_access_key="AKID/x+y", s3_secret_key="secret/+=",
                        s3_region="eu-west-1", s3_bucket="palette-images")
    now = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=now.replace(tzinfo=None)):
        expected = s3_client(settings).generate_presigned_url(
            "get_object", Params={"Bucket": "palette-images", "Key": key}, ExpiresIn=900)
    assert GetUrls(settings, now).url(key) == expected


@pytest.mark.parametrize("hours", [-5, 2])
def test_a_presigned_url_is_dated_in_utc_whatever_zone_its_time_was_given_in(hours: int) -> None:
    """A clock's time in another zone names the same instant: the URL's date and scope are UTC's,
    else a link would be valid hours past (or before) its 15 minutes."""
    settings = Settings(s3_endpoint="http://127.0.0.1:8333", s3_access_key="AKID", s3_secret_key="secret",
                        s3_region="eu-west-1", s3_bucket="palette-images")
    utc = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    zoned = utc.astimezone(timezone(timedelta(hours=hours)))
    url = GetUrls(settings, zoned).url("outputs/u/j/0_result.png")
    assert "X-Amz-Date=20261231T235959Z" in url and "%2F20261231%2Feu-west-1%2Fs3%2F" in url
    assert url == GetUrls(settings, utc).url("outputs/u/j/0_result.png")


# -- /health's checks ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_health_calls_costs_one_check_per_ttl() -> None:
    calls: list[int] = []
    clock = Clock()
    check = CachedCheck(lambda: calls.append(1) is None, ttl_s=1.0, timeout_s=5.0, clock=clock)

    async def flood() -> list[bool]:
        return list(await asyncio.gather(*(check() for _ in range(100))))

    assert asyncio.run(flood()) == [True] * 100 and len(calls) == 1
    clock.now = 0.9
    assert asyncio.run(flood()) == [True] * 100 and len(calls) == 1
    clock.now = 1.1
    assert asyncio.run(flood()) == [True] * 100 and len(calls) == 2


def test_a_hung_dependency_reads_as_failing_and_holds_one_thread() -> None:
    release = threading.Event()
    started: list[int] = []
    clock = Clock()

    def hangs() -> bool:
        started.append(1)
        release.wait(10)
        return True

    check = CachedCheck(hangs, ttl_s=1.0, timeout_s=0.05, clock=clock)

    async def scenario() -> tuple[list[bool], list[bool], bool]:
        first = list(await asyncio.gather(*(check() for _ in range(20))))
        clock.now = 5.0  # the cached "failing" is stale: callers join the check still running
        second = list(await asyncio.gather(*(check() for _ in range(20))))
        release.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if check._running is None:
                break
        return first, second, await check()

    first, second, after = asyncio.run(scenario())
    assert first == second == [False] * 20
    assert len(started) == 1  # one thread for all of them
    assert after is True  # its answer is used once it comes


def test_a_check_that_raises_reads_as_failing() -> None:
    def boom() -> bool:
        raise RuntimeError("down")

    assert asyncio.run(CachedCheck(boom)()) is False


def test_a_failing_dependency_reads_as_failing_for_as_long_as_its_answer_is_cached() -> None:
    answers = iter([False, True])
    clock = Clock()
    check = CachedCheck(lambda: next(answers), ttl_s=1.0, timeout_s=5.0, clock=clock)
    assert asyncio.run(check()) is False
    clock.now = 0.9
    assert asyncio.run(check()) is False  # the cached answer, whatever it is
    clock.now = 1.1
    assert asyncio.run(check()) is True


def test_a_hung_dependency_is_answered_at_once_as_failing_until_its_cached_answer_ages() -> None:
    """Callers after the first timed-out one are told "failing" from the cache, not held the
    timeout again each (a flood of /health during an outage would each wait HEALTH_TIMEOUT_S)."""
    release = threading.Event()
    clock = Clock()
    check = CachedCheck(lambda: release.wait(10), ttl_s=1.0, timeout_s=0.05, clock=clock)

    async def scenario() -> tuple[bool, bool]:
        first = await check()
        check.timeout_s = 30.0  # a caller held on the running check would now wait past the deadline below
        clock.now = 0.5
        try:
            async with asyncio.timeout(2.0):
                second = await check()
        finally:
            release.set()
        return first, second

    assert asyncio.run(scenario()) == (False, False)


def _with_checks(**good: bool) -> Any:
    """A request whose app holds these dependency checks (what /health and /readyz make once)."""
    def check(answer: bool) -> Any:
        async def call() -> bool:
            return answer
        return call
    state = SimpleNamespace(health_checks={name: check(answer) for name, answer in good.items()})
    return SimpleNamespace(app=SimpleNamespace(state=state))


def test_health_and_readiness_name_a_failing_dependency_whichever_it_is() -> None:
    for failing in ("postgres", "broker", "s3"):
        request = _with_checks(**{name: name != failing for name in ("postgres", "broker", "s3")})
        shown = json.loads(asyncio.run(health(None, request)).body)["data"]
        assert shown == {"status": "degraded", "dependencies": {
            name: "failing" if name == failing else "ok" for name in ("postgres", "broker", "s3")}}
        ready = asyncio.run(readyz(None, request))
        assert ready.status_code == 503 and json.loads(ready.body) == {"status": "not ready", "failing": [failing]}
    both = asyncio.run(readyz(None, _with_checks(postgres=False, broker=True, s3=False)))
    assert json.loads(both.body) == {"status": "not ready", "failing": ["postgres", "s3"]}  # each named
    request = _with_checks(postgres=True, broker=True, s3=True)
    assert json.loads(asyncio.run(health(None, request)).body)["data"]["status"] == "ok"
    assert asyncio.run(readyz(None, request)).status_code == 200


def test_me_of_a_user_erased_before_this_process_refused_the_token_is_an_invalid_token() -> None:
    """Another API process erased the user a moment ago: the token is refused here once the
    tombstones are read again; meanwhile /me must not answer 404 as if the route were gone."""
    from adapters.api.envelope import ApiError
    from adapters.api.routes_users import me
    from domain.errors import NotFound

    async def get_user_async(user_id: Any) -> Any:
        raise NotFound("user not found")

    service = SimpleNamespace(get_user_async=get_user_async)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(container=SimpleNamespace(service=service))))
    with pytest.raises(ApiError) as refused:
        asyncio.run(me(uuid4(), request))
    assert refused.value.code == "AUTH_INVALID" and STATUS_BY_CODE[refused.value.code] == 401


# -- event stream slots -------------------------------------------------------------------------
def test_stream_slots_cap_each_user_and_come_back_once() -> None:
    slots = StreamSlots(per_user=2)
    alice, bob = uuid4(), uuid4()
    give_backs = [slots.take(alice), slots.take(alice)]
    with pytest.raises(RateLimited) as refused:
        slots.take(alice)
    assert int(refused.value.retry_after_header) >= 1
    slots.take(bob)  # per user
    give_backs[0]()
    give_backs[0]()  # twice is once
    assert slots.open_streams(alice) == 1
    slots.take(alice)
    give_backs[1]()
    assert slots.open_streams(alice) == 1


def test_stream_slots_cap_the_process_too() -> None:
    slots = StreamSlots(per_user=2, total=3)
    users = [uuid4() for _ in range(4)]
    give_backs = [slots.take(u) for u in users[:3]]
    with pytest.raises(RateLimited):
        slots.take(users[3])  # a user with none open, the process full
    give_backs[1]()
    give_backs[1]()  # twice is once
    slots.take(users[3])
    with pytest.raises(RateLimited):
        slots.take(users[0])


def test_stream_slots_cap_each_client_address_whatever_its_users() -> None:
    slots = StreamSlots(per_user=2, total=10, per_address=3)
    users = [uuid4() for _ in range(3)]
    give_backs = [slots.take(users[0], "198.51.100.7"), slots.take(users[0], "198.51.100.7"),
                  slots.take(users[1], "198.51.100.7")]
    with pytest.raises(RateLimited):
        slots.take(users[2], "198.51.100.7")  # a fresh user from a full address
    slots.take(users[2], "203.0.113.9")  # another address: room
    assert slots.open_streams("198.51.100.7") == 3
    give_backs[2]()
    slots.take(users[2], "198.51.100.7")
    with pytest.raises(RateLimited):
        slots.take(users[0], "203.0.113.9")  # a refused user at its own cap keeps it, wherever it is
    for give_back in give_backs[:2]:
        give_back()
    assert slots.open_streams(users[0]) == 0 and slots.open_streams("198.51.100.7") == 1


def test_slots_given_back_leave_no_trace_of_their_users_or_addresses() -> None:
    """The counts are kept for users and addresses with a stream open only: a process serving
    a million users in turn holds no entry for each."""
    slots = StreamSlots(per_user=2, total=10, per_address=3)
    for i in range(1000):
        slots.take(uuid4(), f"198.51.100.{i % 250}")()
    assert slots._open == {}


def test_a_stream_that_ends_gives_its_slot_back() -> None:
    """A job's stream that reaches its end (the job done): its slot comes back for the next one,
    else a user following a job at a time would be refused streams after ``per_user`` jobs."""
    slots, user = StreamSlots(per_user=1), uuid4()
    sent: list[dict[str, Any]] = []

    async def events() -> Any:
        yield b"id: 1\n\n"

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(SlotStream(events(), slots.take(user))({"type": "http", "asgi": {"spec_version": "2.4"}},
                                                       receive, send))
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert slots.open_streams(user) == 0
    slots.take(user)


def test_a_stream_that_fails_midway_gives_its_slot_back() -> None:
    """A replay or an event stream whose read fails (the event store gone): the slot comes back
    all the same, else its user would be refused streams for the life of the process."""
    slots, user = StreamSlots(per_user=1), uuid4()

    async def events() -> Any:
        yield b"id: 1\n\n"
        raise RuntimeError("the event store went away")

    async def scenario() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never goes
            return {}

        async def send(message: dict[str, Any]) -> None:
            pass

        await SlotStream(events(), slots.take(user))({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)

    with pytest.raises(Exception, match="went away"):
        asyncio.run(scenario())
    assert slots.open_streams(user) == 0
    slots.take(user)


# -- callback auth ------------------------------------------------------------------------------
SECRET = "s" * 48


@pytest.mark.parametrize("allow_shared_secret", [True, False])
def test_a_signature_offered_is_the_whole_proof(allow_shared_secret: bool) -> None:
    now, job, body = int(time.time()), str(uuid4()), b"{}"
    kw: dict[str, Any] = {"allow_shared_secret": allow_shared_secret}
    good = sign_callback(SECRET, now, job, body, "n1")
    assert verify_callback(SECRET, now, job, body, timestamp=str(now), signature=good, nonce="n1", **kw)
    assert verify_callback(SECRET, now, job, body, shared_secret=SECRET, timestamp=str(now), signature=good,
                           nonce="n1", **kw)
    for bad in ({"signature": "x"}, {"signature": ""}, {"timestamp": str(now)},
                {"signature": "sha256=" + "0" * 64, "timestamp": str(now)}, {"signature": "é", "timestamp": str(now)}):
        assert not verify_callback(SECRET, now, job, body, shared_secret=SECRET, **bad, **kw), bad
    assert verify_callback(SECRET, now, job, body, shared_secret=SECRET, **kw) is allow_shared_secret


# -- counts in request bodies -------------------------------------------------------------------
@pytest.mark.parametrize("count", ['"3"', "true", "3.0", '"0x3"', "[3]"])
def test_a_count_of_another_json_type_is_refused_not_read_as_a_number(count: str) -> None:
    """An item count or index is a JSON integer: pydantic's lax mode read "3" and 3.0 as 3 and
    true as 1 (a job of 3 items made from a string)."""
    with pytest.raises(ValidationError):
        JobCreate.model_validate_json(f'{{"preset": "interior", "item_count": {count}}}')
    with pytest.raises(ValidationError):
        CallbackCreate.model_validate_json(f'{{"idx": {count}, "status": "done", "idempotency_key": "k"}}')
    assert JobCreate.model_validate_json('{"preset": "interior", "item_count": 3}').item_count == 3
    assert CallbackCreate.model_validate_json('{"idx": 3, "status": "done", "idempotency_key": "k"}').idx == 3


# -- bounds on what a client sends -----------------------------------------------------------------
def _concepts(n: int, name_len: int = 4, value_len: int = 4) -> dict[str, dict[str, str]]:
    return {f"{i:0{name_len}d}": {"action": "tone", "value": "v" * value_len} for i in range(n)}


def _names(n: int, length: int = 4) -> list[str]:
    return [f"{i:0{length}d}" for i in range(n)]


RULE = {"name": "r", "preset_id": "interior", "concepts": _concepts(1)}
CALLBACK = {"idx": 0, "status": "done", "idempotency_key": "k"}
# Each body at its documented bound (accepted), then one past it (refused): the README's limits.
BOUNDED: list[tuple[type, dict[str, Any], dict[str, Any]]] = [
    (RuleCreate, {**RULE, "concepts": _concepts(32)}, {**RULE, "concepts": _concepts(33)}),
    (RuleCreate, {**RULE, "protect": _names(32)}, {**RULE, "protect": _names(33)}),
    (RuleCreate, {**RULE, "name": "n" * 80}, {**RULE, "name": "n" * 81}),
    (RuleCreate, {**RULE, "preset_id": "p" * 32}, {**RULE, "preset_id": "p" * 33}),
    (RuleCreate, {**RULE, "concepts": _concepts(1, name_len=64)}, {**RULE, "concepts": _concepts(1, name_len=65)}),
    (RuleCreate, {**RULE, "concepts": _concepts(1, value_len=32)}, {**RULE, "concepts": _concepts(1, value_len=33)}),
    (RuleUpdate, {"name": "r", "concepts": _concepts(32)}, {"name": "r", "concepts": _concepts(33)}),
    (JobExecute, {"concepts": _concepts(32)}, {"concepts": _concepts(33)}),
    (JobExecute, {"protect": _names(32)}, {"protect": _names(33)}),
    (JobExecute, {"protect": _names(1, 64)}, {"protect": _names(1, 65)}),
    (JobCreate, {"preset": "p" * 32, "item_count": 200}, {"preset": "p" * 33, "item_count": 1}),
    (JobCreate, {"preset": "interior", "item_count": 200}, {"preset": "interior", "item_count": 201}),
    (CallbackCreate, {**CALLBACK, "idx": 199}, {**CALLBACK, "idx": 200}),
    (CallbackCreate, {**CALLBACK, "idempotency_key": "k" * 120}, {**CALLBACK, "idempotency_key": "k" * 121}),
    (CallbackCreate, {**CALLBACK, "error": "e" * 2000}, {**CALLBACK, "error": "e" * 2001}),
    (CallbackCreate, {**CALLBACK, "output_key": "o" * 300}, {**CALLBACK, "output_key": "o" * 301}),
    (AnonCreate, {"device_hash": "d" * 200}, {"device_hash": "d" * 201}),
    (AnonCreate, {"device_hash": "device-0:a.b_c"}, {"device_hash": "device 0/../a"}),
]


@pytest.mark.parametrize(("model", "at_bound", "past_bound"), BOUNDED,
                         ids=[f"{m.__name__}-{i}" for i, (m, _, _) in enumerate(BOUNDED)])
def test_every_count_and_length_a_client_sends_is_bounded(model: type, at_bound: dict[str, Any],
                                                          past_bound: dict[str, Any]) -> None:
    model.model_validate(at_bound)
    with pytest.raises(ValidationError):
        model.model_validate(past_bound)


@pytest.mark.parametrize(("model", "body"), [(RuleCreate, RULE), (JobCreate, {"preset": "interior", "item_count": 1}),
                                             (JobExecute, {}), (CallbackCreate, CALLBACK),
                                             (AnonCreate, {"device_hash": "device-01"})])
def test_a_field_no_request_has_is_refused_not_ignored(model: type, body: dict[str, Any]) -> None:
    model.model_validate(body)
    with pytest.raises(ValidationError, match="extra"):
        model.model_validate({**body, "user_id": "someone else's"})


@pytest.mark.parametrize("text", ["a\x00b", "\ud800", "a\x1bb", "\ufffe"])
def test_text_postgresql_cannot_store_is_refused_in_concept_names_and_values(text: str) -> None:
    with pytest.raises(ValidationError):
        JobExecute.model_validate({"concepts": {text: {"action": "remove"}}})
    with pytest.raises(ValidationError):
        JobExecute.model_validate({"concepts": {"wall": {"action": "tone", "value": text}}})
    with pytest.raises(ValidationError):
        JobExecute.model_validate({"protect": [text]})


# -- error codes ----------------------------------------------------------------------------------
def test_every_error_the_domain_raises_has_its_own_status_and_an_unknown_code_is_a_client_error() -> None:
    import application.services
    import domain.errors

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    assert application.services  # its errors (InputsMissing, InputsTooLarge...) are subclasses too
    codes = {e.code for e in subclasses(domain.errors.DomainError)} - {"DOMAIN_ERROR"}
    assert codes and codes <= set(STATUS_BY_CODE), codes - set(STATUS_BY_CODE)
    refused = fail("A_CODE_NO_TABLE_HAS", "x")
    assert refused.status_code == 400 and json.loads(refused.body)["error"]["code"] == "A_CODE_NO_TABLE_HAS"


def test_an_error_message_goes_out_readable_and_short_whatever_input_it_quotes() -> None:
    refused = fail("VALIDATION_FAILED", "name: " + "\ud800\x00\x1b" + "x" * 10_000)
    message = json.loads(refused.body)["error"]["message"]
    assert message.startswith("name: ") and message.isprintable() and len(message) <= 600


# -- read-your-writes: the recent writes a read waits for ------------------------------------------
def test_a_users_recent_writes_keep_each_streams_highest_version_and_only_the_newest_streams() -> None:
    writes, user, first = LastWrites(), uuid4(), uuid4()
    writes.record(user, "jobs_log", first, 5)
    writes.record(user, "jobs_log", first, 3)  # an older write's answer, arriving late
    writes.record(user, "jobs_log", first, None)  # a command that wrote nothing
    assert writes.recent(user, "jobs_log") == {first: 5} and writes.recent(user, "rules") == {}
    newer = [uuid4() for _ in range(STREAMS_PER_USER)]
    for stream in newer:
        writes.record(user, "jobs_log", stream, 1)
    assert writes.recent(user, "jobs_log") == dict.fromkeys(newer, 1)


def test_a_stream_written_again_is_among_the_newest_and_outlives_those_written_since_before() -> None:
    writes, user, again = LastWrites(), uuid4(), uuid4()
    writes.record(user, "jobs_log", again, 1)
    others = [uuid4() for _ in range(STREAMS_PER_USER)]
    for stream in others[:-1]:
        writes.record(user, "jobs_log", stream, 1)
    writes.record(user, "jobs_log", again, 2)  # its newest write: the one a read must wait for
    writes.record(user, "jobs_log", others[-1], 1)
    recent = writes.recent(user, "jobs_log")
    assert recent[again] == 2 and others[0] not in recent and len(recent) == STREAMS_PER_USER


def test_the_user_forgotten_first_is_the_one_who_wrote_least_recently() -> None:
    writes = LastWrites(max_users=2)
    early, idle, late = uuid4(), uuid4(), uuid4()
    for user in (early, idle, early, late):
        writes.record(user, "rules", user, 1)
    assert (writes.recent(early, "rules"), writes.recent(idle, "rules"), writes.recent(late, "rules")) == (
        {early: 1}, {}, {late: 1})


def test_a_write_is_remembered_for_its_time_to_live_and_a_writer_gone_quiet_is_forgotten() -> None:
    clock = Clock()
    writes, quiet, busy, old, new = LastWrites(clock=clock), uuid4(), uuid4(), uuid4(), uuid4()
    writes.record(quiet, "jobs_log", old, 3)
    writes.record(busy, "rules", old, 1)
    clock.now = WRITE_TTL_S / 2
    writes.record(busy, "rules", new, 2)
    clock.now = WRITE_TTL_S - 0.001
    assert writes.recent(quiet, "jobs_log") == {old: 3}  # a projector this far behind still waited for
    clock.now = WRITE_TTL_S
    assert writes.recent(busy, "rules") == {new: 2}  # the older write went, the newer stays
    writes.record(busy, "jobs_log", new, 1)
    assert list(writes._data) == [busy]  # the quiet writer's last write expired: nothing of it is held
    clock.now = 2 * WRITE_TTL_S
    writes.record(uuid4(), "rules", new, 1)
    assert len(writes._data) == 1


def test_a_writer_is_kept_while_its_newest_write_is_fresh_whichever_model_or_stream_took_it() -> None:
    """A writer goes only once its newest write has expired: not with its oldest model's, nor with
    the stream last written first (a stream written again is the newest however early it began)."""
    clock = Clock()
    writes, user, rewritten, once, job = LastWrites(clock=clock), uuid4(), uuid4(), uuid4(), uuid4()
    writes.record(user, "rules", rewritten, 1)
    writes.record(user, "jobs_log", job, 1)
    clock.now = 10.0
    writes.record(user, "rules", once, 1)
    clock.now = 20.0
    writes.record(user, "rules", rewritten, 2)
    clock.now = WRITE_TTL_S + 15  # the job's write and the rule written once expired; the rewrite not
    writes.record(uuid4(), "rules", uuid4(), 1)  # another writer: the stale ones are swept
    assert writes.recent(user, "rules") == {rewritten: 2}
    assert writes.recent(user, "jobs_log") == {}


def test_a_record_drops_a_bounded_number_of_stale_writers_and_records_drain_them_all() -> None:
    """After a quiet spell every writer may be stale at once: one record must not sweep them all
    under the lock (on the event loop), and records still drop them faster than they add."""
    clock = Clock()
    writes = LastWrites(clock=clock)
    for _ in range(3 * EXPIRED_PER_RECORD):
        writes.record(uuid4(), "rules", uuid4(), 1)
    clock.now = WRITE_TTL_S
    fresh = [uuid4() for _ in range(3)]
    writes.record(fresh[0], "rules", uuid4(), 1)
    assert len(writes._data) == 3 * EXPIRED_PER_RECORD - EXPIRED_PER_RECORD + 1
    for user in fresh[1:]:
        writes.record(user, "rules", uuid4(), 1)
    assert list(writes._data) == fresh


def test_a_write_a_read_saw_folded_is_forgotten_unless_written_again_since() -> None:
    writes, user, folded, rewritten, behind = LastWrites(), uuid4(), uuid4(), uuid4(), uuid4()
    for stream in (folded, rewritten, behind):
        writes.record(user, "rules", stream, 2)
    seen = writes.recent(user, "rules")
    writes.record(user, "rules", rewritten, 3)  # while the read ran
    writes.folded(user, "rules", {s: v for s, v in seen.items() if s != behind})
    assert writes.recent(user, "rules") == {rewritten: 3, behind: 2}
    writes.folded(user, "rules", {rewritten: 3, behind: 5})
    assert writes.recent(user, "rules") == {} and user not in writes._data  # an idle user costs nothing


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=8) | st.from_regex(r"\A[ +\-]?[0-9][0-9_.e]*[ ]?\Z"))
def test_a_query_number_is_read_only_from_its_ascii_decimal_digits(text: str) -> None:
    """QueryInt against a regular expression: pydantic's lax int reads "5.0", "+5", " 5 " and
    "5_0" as 5 and 50, and Python's str.isdigit takes "\u0661" and "\u00b2" for digits."""
    import re

    from pydantic import TypeAdapter

    from adapters.api.schemas import QueryInt

    plain = re.fullmatch(r"[0-9]+", text) is not None
    try:
        got = TypeAdapter(QueryInt).validate_python(text)
    except ValidationError:
        assert not plain, text
    else:
        assert plain and got == sum(10 ** i * (ord(c) - 48) for i, c in enumerate(reversed(text))), text


@settings(max_examples=300, deadline=None)
@given(text=st.none() | st.text(max_size=24) | st.from_regex(r"\A[ +\-]?[0-9][0-9_.e]{0,22}[ ]?\Z"),
       version=st.integers(0, 10**6))
@example(text="1" * 20, version=5).via("the longest id")
@example(text="1" * 21, version=5).via("one digit too many")
@example(text="\u0663", version=5).via("a digit str.isdigit takes that is not ASCII")
@example(text="7", version=3).via("past the job's last event")
@example(text="", version=3).via("empty: the start")
def test_a_last_event_id_is_read_only_from_its_ascii_decimal_digits(text: str | None, version: int) -> None:
    """events_after_id against a regular expression (only e2e tests read it before): at most 20
    ASCII digits, else a 422; a resumed stream never waits past the job's last event; no id (or an
    empty one) is the start."""
    import re

    from adapters.api.routes_jobs import events_after_id
    from domain.errors import ValidationFailed

    plain = text is not None and re.fullmatch(r"[0-9]{1,20}", text) is not None
    try:
        got = events_after_id(text, version)
    except ValidationFailed:
        assert text and not plain, text
    else:
        if not text:
            assert got == 0
        else:
            assert plain, text
            assert got == min(sum(10 ** i * (ord(c) - 48) for i, c in enumerate(reversed(text))), version), text
