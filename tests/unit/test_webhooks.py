"""Webhooks without I/O: signatures as the standardwebhooks package verifies them, the retry
schedule and its jitter, which addresses production refuses, and what one attempt does with a
target (no redirect followed, 4 KiB of answer, the checked address pinned)."""

from __future__ import annotations

import base64
import ipaddress
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from adapters.settings import SettingsError, load_settings
from adapters.webhooks import targets
from adapters.webhooks.events import payload
from adapters.webhooks.retries import DEFAULT_SCHEDULE, parse_schedule, retry_delay
from adapters.webhooks.sender import proven_reserve
from adapters.webhooks.signing import message_id, new_secret, signed_headers
from domain.job import Job

BODY = b'{"type":"job.queued","timestamp":"2026-12-01T00:00:00+00:00","data":{}}'


def now() -> int:
    return int(datetime.now(UTC).timestamp())


# -- signing ---------------------------------------------------------------------------------------
def test_a_secret_is_whsec_and_the_base64_of_24_random_bytes():
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert new_secret() != secret


def test_the_standardwebhooks_package_verifies_a_signed_message():
    secret = new_secret()
    headers = signed_headers([secret], "msg_abc_1", now(), BODY)
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_a_changed_body_or_another_secret_fails_verification():
    secret = new_secret()
    headers = signed_headers([secret], "msg_abc_1", now(), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"queued", b"canceled"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_during_a_rotation_both_secrets_sign_and_either_verifies():
    old, new = new_secret(), new_secret()
    headers = signed_headers([new, old], "msg_abc_2", now(), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers)


def test_the_message_id_is_the_events_stream_and_version():
    stream = uuid4()
    assert message_id(stream, 3) == message_id(stream, 3) == f"msg_{stream.hex}_3"
    assert message_id(stream, 4) != message_id(stream, 3)


def test_an_item_payload_carries_the_job_at_that_version_and_the_item():
    at = datetime(2026, 12, 1, tzinfo=UTC)
    job = Job.create(uuid4(), uuid4(), "interior", 2, at)
    job.confirm_upload(at)
    job.execute({"wall": {"action": "recolor", "value": "#3366aa"}}, [], None, at)
    job.record_result(1, "failed", "", "", "decode failed", "k1", at)
    body = json.loads(payload("item.completed", at, job, 1))
    assert body["type"] == "item.completed" and body["timestamp"] == at.isoformat()
    assert body["data"]["item"] == {"idx": 1, "status": "failed", "error": "decode failed"}
    assert body["data"]["status"] == "running"
    assert body["data"]["progress"] == {"done": 0, "failed": 1, "total": 2}
    job.record_result(0, "done", "out/0", "preview/0", "", "k0", at)
    assert json.loads(payload("item.completed", at, job, 0))["data"]["item"] == {"idx": 0, "status": "done",
                                                                             "error": None}


# -- retries ---------------------------------------------------------------------------------------
def test_a_schedule_reads_units():
    assert parse_schedule("250ms, 5s,5m,2h,1d") == (0.25, 5.0, 300.0, 7200.0, 86400.0)


@pytest.mark.parametrize("text", ["", "5", "5x", "-5s", "5s,,5m", "1e3s", ",".join(["1s"] * 31)])
def test_a_bad_schedule_is_refused(text):
    with pytest.raises(ValueError):
        parse_schedule(text)


@pytest.mark.parametrize("text", ["3651d", "5s," + "9" * 20 + "d", "1" + "0" * 400 + "s"])
def test_a_step_past_ten_years_is_refused(text):
    # PostgreSQL adds a failed attempt's delay to now(): one out of a timestamp's range (or
    # infinite, "1000...0s" read as a float) failed the statement recording the attempt, and the
    # delivery went out again after every lease, every 30 s, for good.
    with pytest.raises(ValueError, match="ten years"):
        parse_schedule(text)
    assert parse_schedule("3650d") == (3650 * 86400.0,)


def test_a_schedule_may_hold_thirty_retries_and_no_more():
    assert len(parse_schedule(",".join(["1s"] * 30))) == 30


def test_the_default_schedule_retries_for_about_three_days():
    hours = sum(parse_schedule(DEFAULT_SCHEDULE)) / 3600
    assert 60 <= hours <= 80


NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("value", "wait"), [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0),
    ("Sun, 06 Dec 2026 12:02:00 GMT", 120.0),  # the IMF-fixdate of RFC 9110
    ("Sunday, 06-Dec-26 12:02:00 GMT", 120.0),  # the obsolete RFC 850 form
    ("Sun Dec  6 12:02:00 2026", 120.0),  # asctime, no zone: GMT
    (" " * 61 + "120", 120.0),  # 64 characters: the longest value read
])
def test_a_retry_after_is_read_as_seconds_or_an_http_date(value, wait):
    assert targets.retry_after_s(value, NOW) == wait


@pytest.mark.parametrize("value", [None, "", "-5", "1.5", "²", "12345678901", "soon", "120, 30", "\x00", "12\x00",
                                   "\x1b[31m", "\ud800", "1" * 65536, "Sun, 06 Dec 2026 12:02:00 GMT\x00" * 2048,
                                   "Sun, 06 Dec 2026 11:59:00 GMT", "Mon, 01 Jan 0001 00:00:00 GMT",
                                   "Sun, 06 Dec 2026 25:61:00 GMT", " " * 62 + "120"])
def test_a_retry_after_absent_unreadable_or_past_asks_for_no_wait(value):
    assert targets.retry_after_s(value, NOW) is None


def test_a_bad_schedule_setting_names_the_setting(tmp_path):
    with pytest.raises(SettingsError, match="PALETTE_WEBHOOK_RETRY_SCHEDULE"):
        load_settings(data_dir=tmp_path, webhook_retry_schedule="soon")


@given(st.integers(min_value=-2, max_value=12), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_a_retry_waits_its_step_within_20_percent_and_none_past_the_end(failures, draw):
    schedule = parse_schedule("5s,5m,30m,2h")
    delay = retry_delay(schedule, failures, lambda: draw)
    if 1 <= failures <= len(schedule):
        step = schedule[failures - 1]
        assert delay is not None and 0.8 * step <= delay <= 1.2 * step
    else:
        assert delay is None


def test_jitter_spreads_retries_that_failed_together():
    schedule = parse_schedule("5m")
    assert retry_delay(schedule, 1, lambda: 0.0) == pytest.approx(240)
    assert retry_delay(schedule, 1, lambda: 0.999999) == pytest.approx(360, abs=0.01)


# -- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("169.254.10.10", "link-local"), ("fe80::1", "link-local"), ("::ffff:127.0.0.1", "loopback"),
    ("fc00::5", "private"), ("100.64.0.1", "non-public"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "private"),  # noqa: S104 - an address refused, not bound
])
def test_production_refuses_non_public_addresses(address, reason):
    assert targets.refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::6810:85e5", "8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert targets.refusal(ipaddress.ip_address(address)) is None


def resolving_to(*addresses: str) -> targets.Resolver:
    return lambda host, port: list(addresses)


def test_a_name_with_one_private_address_among_public_ones_is_refused():
    with pytest.raises(targets.TargetRefused, match=r"hooks\.example resolves to a private address"):
        targets.check("https://hooks.example/in", True, resolving_to("93.184.216.34", "10.0.0.7"))


@pytest.mark.parametrize(("url", "why"), [
    ("http://hooks.example/in", "must be https"), ("ftp://hooks.example/", "must be https"),
    ("https:///nohost", "with a host"), ("https://user:pw@hooks.example/", "credentials"),
    ("https://:pw@hooks.example/", "credentials"),
    ("https://hooks.example/" + "a" * 2048, "longer than 2048"), ("https://[::1/", "not a URL"),
    ("https://hooks.example:0/in", "port must be"),
])
def test_production_refuses_urls_that_are_not_https_to_a_host(url, why):
    with pytest.raises(targets.TargetRefused, match=why):
        targets.check(url, True, resolving_to("93.184.216.34"))


def test_development_allows_loopback_without_resolving():
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("development does not resolve")

    assert targets.check("http://127.0.0.1:9/in", False, no_dns).address is None


def test_a_body_is_read_only_up_to_the_cap():
    pulled = []

    def chunks() -> Iterator[bytes]:
        for i in range(100):
            pulled.append(i)
            yield b"x" * 1000

    assert len(targets.capped(chunks(), 4096)) == 4096
    assert len(pulled) == 5


class Endless(httpx.SyncByteStream):
    """An answer of ``limit`` chunks (None: it never ends), counting the chunks read from it."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.limit is None or self.pulled < self.limit:
            self.pulled += 1
            yield b"y" * 1000


class Target:
    """An httpx transport standing in for the receiver: what it got, what it answers."""

    def __init__(self, status: int = 200, error: Exception | None = None, stream: httpx.SyncByteStream | None = None,
                 **answer: Any) -> None:
        self.status = status
        self.error = error
        self.stream = stream or Endless(limit=1)  # as on the wire: a stream, read by the client
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, stream=self.stream, **self.answer)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self), follow_redirects=False)




def test_an_attempt_reads_4_kib_of_an_endless_answer():
    answer = Endless()
    outcome = targets.post(Target(200, stream=answer).client(), "http://127.0.0.1:9/in", BODY, {}, production=False)
    assert outcome.ok and outcome.body == "y" * 4096
    assert answer.pulled == 5


class Bytes(httpx.SyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data


@pytest.mark.parametrize("answer", [b"\xff" * 5000, "\u00e9".encode() * 3000, b"ab" + "\u20ac".encode() * 2000])
def test_what_is_kept_of_an_answer_is_at_most_4_kib_of_utf8(answer):
    outcome = targets.post(Target(500, stream=Bytes(answer)).client(), "http://127.0.0.1:9/in", BODY, {},
                           production=False)
    kept = outcome.body.encode()
    assert len(kept) <= targets.MAX_RESPONSE_BYTES
    assert len(kept) > targets.MAX_RESPONSE_BYTES - 4  # only a split character is left out
    assert answer.decode("utf-8", "replace").encode().startswith(kept)


def test_a_lookup_that_does_not_answer_within_the_attempts_deadline_is_a_timeout(monkeypatch):
    monkeypatch.setattr(targets, "TIMEOUT_S", 0.1)
    answered = threading.Event()

    def late(host: str, port: int) -> list[str]:  # a name server that answers well past the attempt's end
        answered.wait(5)
        return ["93.184.216.34"]

    target = Target(200)
    try:
        outcome = targets.post(target.client(), "https://hooks.example/in", BODY, {}, production=True, resolver=late)
    finally:
        answered.set()
    assert (outcome.ok, outcome.error, target.requests) == (False, "timeout", [])


def test_a_redirect_is_a_failure_and_not_followed():
    target = Target(302, headers={"location": "http://169.254.169.254/"})
    outcome = targets.post(target.client(), "http://127.0.0.1:9/in", BODY, {}, production=False)
    assert (outcome.ok, outcome.status_code, len(target.requests)) == (False, 302, 1)


@pytest.mark.parametrize(("status", "delivered"), [(199, False), (200, True), (299, True), (300, False),
                                                  (304, False)])
def test_only_a_2xx_answer_is_a_delivery(status, delivered):
    outcome = targets.post(Target(status).client(), "http://127.0.0.1:9/in", BODY, {}, production=False)
    assert (outcome.ok, outcome.status_code) == (delivered, status)


@pytest.mark.parametrize(("workers", "reserved"), [(1, 0), (2, 1), (3, 1), (4, 1), (7, 1), (8, 2), (16, 4)])
def test_a_quarter_of_the_senders_threads_and_at_least_one_are_kept_for_proven_endpoints(workers, reserved):
    assert proven_reserve(workers) == reserved


@pytest.mark.parametrize(("error", "said"), [(httpx.ReadTimeout("slow"), "timeout"),
                                             (httpx.ConnectError("refused"), "ConnectError")])
def test_timeouts_and_connection_errors_are_failures_without_a_status(error, said):
    outcome = targets.post(Target(error=error).client(), "http://127.0.0.1:9/in", BODY, {}, production=False)
    assert not outcome.ok and outcome.status_code is None and said in outcome.error


def test_production_checks_the_address_at_send_time_and_connects_to_the_one_checked():
    target = Target(204)
    outcome = targets.post(target.client(), "https://hooks.example:8443/in?a=1", BODY, {}, production=True,
                           resolver=resolving_to("93.184.216.34"))
    assert outcome.ok
    sent = target.requests[0]
    assert (sent.url.host, sent.url.port, sent.url.path, sent.url.query) == ("93.184.216.34", 8443, "/in", b"a=1")
    assert sent.headers["host"] == "hooks.example:8443"
    assert sent.extensions["sni_hostname"] == "hooks.example"


def test_a_name_that_now_resolves_to_loopback_is_not_sent_to():
    target = Target(200)
    outcome = targets.post(target.client(), "https://hooks.example/in", BODY, {}, production=True,
                           resolver=resolving_to("127.0.0.1"))
    assert not outcome.ok and outcome.error.startswith("refused:") and target.requests == []


def test_ipv4_inside_ipv6_is_judged_as_the_ipv4_address_it_reaches():
    import ipaddress

    from adapters.webhooks.targets import refusal

    for inside, reason in (("64:ff9b::a9fe:a9fe", "metadata"), ("2002:a9fe:a9fe::1", "metadata"),
                           ("64:ff9b::a00:1", "private"), ("::ffff:127.0.0.1", "loopback"),
                           ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private")):  # Teredo to 10.0.0.1
        assert refusal(ipaddress.ip_address(inside)) == reason, inside
    assert refusal(ipaddress.ip_address("2001:4860:4860::8888")) is None
