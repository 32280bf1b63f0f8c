"""The API's bounded helpers without I/O: presigned GET URLs equal boto3's, /health's cached
checks, event stream slots per user, callback auth modes, counts in request bodies, and the
recent writes a read waits for."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any
from unittest import mock
from uuid import uuid4

import botocore.auth
import pytest
from pydantic import ValidationError

from adapters.api.consistency import STREAMS_PER_USER, LastWrites
from adapters.api.held_responses import StreamSlots
from adapters.api.rate_limit import RateLimited
from adapters.api.routes_users import CachedCheck
from adapters.api.schemas import CallbackCreate, JobCreate
from adapters.s3_signing import GetUrls
from adapters.settings import Settings
from domain.contracts.callback import sign_callback, verify_callback
from infra.s3 import s3_client


# -- presigned GET URLs -------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.com",
                                      "https://s3.example.com:443", "http://store:80/base", "http://[::1]:9000"])
@pytest.mark.parametrize("key", ["outputs/u/j/0_result.png", "previews/a b/c~d+e%f_thumb.jpg", "outputs/ü/0.png"])
def test_presigned_get_urls_are_the_very_ones_boto3_makes(endpoint: str, key: str) -> None:
    settings = Settings(s3_endpoint=endpoint, s3_access_key="AKID/x+y", s3_secret_key="secret/+=",
                        s3_region="eu-west-1", s3_bucket="palette-images")
    now = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=now.replace(tzinfo=None)):
        expected = s3_client(settings).generate_presigned_url(
            "get_object", Params={"Bucket": "palette-images", "Key": key}, ExpiresIn=900)
    assert GetUrls(settings, now).url(key) == expected


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


def test_the_user_forgotten_first_is_the_one_who_wrote_least_recently() -> None:
    writes = LastWrites(max_users=2)
    early, idle, late = uuid4(), uuid4(), uuid4()
    for user in (early, idle, early, late):
        writes.record(user, "rules", user, 1)
    assert (writes.recent(early, "rules"), writes.recent(idle, "rules"), writes.recent(late, "rules")) == (
        {early: 1}, {}, {late: 1})
