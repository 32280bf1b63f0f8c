"""Webhook hosts without I/O: a host is kept in its IDNA ASCII form (an international name is
accepted, then sent with an ASCII Host header and TLS name) or refused at registration; no URL
makes an attempt raise (a failed attempt instead, recorded like any); and production refuses
reserved, site-local and IPv4-compatible addresses, written as literals or resolved to."""

from __future__ import annotations

import base64
import ipaddress
import sys
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from adapters.webhooks import store, targets
from adapters.webhooks.sender import HOLD_MAX_S, PRUNE_PAGE, WebhookSender
from tests.unit.test_webhooks import Target

BODY = b'{"type":"job.queued"}'
LONG_LABEL = "a" * 64
FULL_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


class Resolving:
    """A resolver answering ``addresses`` for any name, keeping the names it was asked."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return list(self.addresses)


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} is an address literal: nothing to resolve")


# -- the ASCII form of a host ----------------------------------------------------------------------
@pytest.mark.parametrize(("host", "ascii"), [
    ("bücher.de", "xn--bcher-kva.de"), ("BÜCHER.de", "xn--bcher-kva.de"),
    ("ｅxample.com", "example.com"),  # noqa: RUF001 - a fullwidth e, mapped as browsers map it
    ("例え。テスト", "xn--r8jz45g.xn--zckzah"), ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("Hooks.Example", "hooks.example"), ("my_host.example", "my_host.example"), ("example.com.", "example.com."),
    ("127.0.0.1", "127.0.0.1"), ("2001:db8::1", "2001:db8::1"), ("a" * 63 + ".com", "a" * 63 + ".com"),
    (FULL_NAME + ".", FULL_NAME + "."),  # 253 characters and the root's dot: the longest name DNS takes
])
def test_a_host_is_kept_in_its_ascii_form(host, ascii):
    assert targets.ascii_host(host) == ascii


@pytest.mark.parametrize(("host", "why"), [
    (LONG_LABEL + ".example", "label longer than 63"), ("bü" + LONG_LABEL + ".de", "no IDNA form"),
    (".".join(["abcdefghi"] * 26), "longer than 253"), ("a..b", "empty label"), ("bü..de", "no IDNA form"),
    ("exa mple.com", "character"), ("exa%6dple.com", "character"), ("xn--zz.com", "invalid IDNA label"),
    ("bü cher.de", "no IDNA form"), ("2001:db8::zz", "not an IPv6 address"), ("fe80::1%eth0", "without a zone"),
    ("::a%\u0301x", "without a zone"), ("1.2.3.999", "not an IPv4"),
    ("127.1", "not an IPv4"), ("0x7f.1", "not an IPv4"), ("01.02.03.04", "not an IPv4"),
])
def test_a_host_with_no_ascii_form_is_refused(host, why):
    with pytest.raises(targets.TargetRefused, match=why):
        targets.ascii_host(host)


def test_without_the_idna_package_the_standard_librarys_codec_encodes(monkeypatch):
    monkeypatch.setitem(sys.modules, "idna", None)  # `import idna` raises ImportError
    assert targets.ascii_host("Bücher.de") == "xn--bcher-kva.de"
    assert targets.ascii_host("ｅxample.com") == "example.com"  # noqa: RUF001 - a fullwidth e
    with pytest.raises(targets.TargetRefused, match="no IDNA form"):
        targets.ascii_host("bü" + LONG_LABEL + ".de")


@pytest.mark.parametrize(("production", "url", "ascii"), [
    (False, "http://bücher.de:8080/hook?a=ü#x", "http://xn--bcher-kva.de:8080/hook?a=ü#x"),
    (False, "http://ｅxample.com/hook", "http://example.com/hook"),  # noqa: RUF001 - a fullwidth e
    (True, "https://BÜCHER.de/", "https://xn--bcher-kva.de/"),
    (False, "http://127.0.0.1:9/in", "http://127.0.0.1:9/in"), (False, "http://[::1]:9/in", "http://[::1]:9/in"),
    (False, "http://example.com/v1.0/..in/%2e?x=/../#/./", "http://example.com/v1.0/..in/%2e?x=/../#/./"),
])
def test_the_checked_url_carries_the_ascii_host_and_nothing_else_changes(production, url, ascii):
    target = targets.check(url, production, Resolving("93.184.216.34"))
    assert target.url == ascii and targets.normalised(url) == ascii


@pytest.mark.parametrize(("production", "url"), [
    (False, f"http://{LONG_LABEL}.example/hook"), (True, f"https://{LONG_LABEL}.example/hook"),
    (False, f"http://bü{LONG_LABEL}.de/hook"), (False, "http://a..b/hook"), (False, "http://exa\tmple.com/hook"),
    (False, "http://example.com/a\nb"),
    # Spaces and controls anywhere: urlsplit strips them at the ends, so the URL stored would not
    # be the one checked (a development sender then refused every delivery to it).
    (False, " http://example.com/hook"), (True, " https://example.com/hook"), (False, "http://example.com/hook "),
    (False, "http://example.com/a b"), (True, "https://example.com/a\xa0b"), (False, "http://example.com/\x85"),
    (False, "\u3000http://example.com/hook"),
    # Dot segments: httpx resolves them, so /a/../hook would be posted to /hook, not to what is listed.
    (False, "http://example.com/."), (False, "http://example.com/a/../hook"), (True, "https://example.com/./hook"),
    (False, "http://example.com/hook/.."),
])
def test_registration_refuses_a_url_whose_host_cannot_be_sent_to(production, url):
    with pytest.raises(targets.TargetRefused):
        targets.check(url, production, Resolving("93.184.216.34"))


@pytest.mark.parametrize("production", [False, True])
def test_a_url_whose_ascii_form_is_too_long_is_refused_at_registration(production):
    """The length is that of the URL stored and sent: an international host grows in IDNA, and the
    sender refuses every attempt to a URL over the limit (it checks the stored one again)."""
    host = ".".join(["\u00fc" * 20] * 8)
    url = f"https://{host}/" + "a" * (targets.MAX_URL_LENGTH - len(f"https://{host}/"))
    assert len(url) == targets.MAX_URL_LENGTH
    with pytest.raises(targets.TargetRefused, match="longer than"):
        targets.check(url, production, Resolving("93.184.216.34"))


@given(st.text(max_size=12), st.text(max_size=12))
def test_a_url_check_accepts_is_sent_as_it_reads(before, after):
    """Whatever surrounds a URL, one the check accepts parses back to itself: what is stored and
    listed is what is checked and sent."""
    try:
        target = targets.check(f"{before}http://example.com/{after}", False, no_dns)
    except targets.TargetRefused:
        return
    assert urlunsplit(urlsplit(target.url)) == target.url
    assert str(httpx.URL(target.url)).startswith("http://example.com/")


@given(st.text(min_size=1, max_size=80))
def test_a_url_check_accepts_is_one_httpx_sends_to_with_an_ascii_host(host):
    """Whatever the host, the URL is refused or httpx takes the checked URL as it is."""
    try:
        target = targets.check(f"http://{host}/hook", False, no_dns)
    except targets.TargetRefused:
        return
    assert target.host.isascii() and target.host == target.host.lower()
    sent = httpx.Request("POST", target.url)  # raises InvalidURL where httpx would not send
    assert sent.url.raw_host.decode("ascii") == target.host


def test_an_international_name_is_sent_to_the_checked_address_with_ascii_host_and_tls_name():
    receiver = Target(204)
    resolver = Resolving("93.184.216.34")
    outcome = targets.post(receiver.client(), "https://bücher.de:8443/in", BODY, {}, production=True,
                           resolver=resolver)
    assert outcome.ok, outcome
    sent = receiver.requests[0]
    assert resolver.asked == ["xn--bcher-kva.de"]
    assert (sent.url.host, sent.url.port) == ("93.184.216.34", 8443)
    assert sent.headers["host"] == "xn--bcher-kva.de:8443"
    assert sent.extensions["sni_hostname"] == "xn--bcher-kva.de"


def test_in_development_an_international_name_is_sent_to_in_ascii():
    receiver = Target(204)
    outcome = targets.post(receiver.client(), "http://ｅxample.com/in", BODY, {},  # noqa: RUF001
                           production=False)
    assert outcome.ok, outcome
    assert receiver.requests[0].url.host == "example.com"
    assert receiver.requests[0].headers["host"] == "example.com"



@pytest.mark.parametrize("production", [True, False])
@pytest.mark.parametrize("url", ["https://example.com/hook?", "https://example.com/hook#", "https://example.com/hook?#",
                                 "https://Example.com/hook?", "https://example.com/hook?a=1#"])
def test_a_url_with_an_empty_query_or_fragment_is_stored_as_it_is_sent(production, url):
    """The address a production attempt connects to is the checked URL rebuilt by urlsplit and
    urlunsplit, which drop an empty query or fragment: "/hook?" was stored and listed while
    "/hook" was sent (found by test_a_url_check_accepts_is_sent_as_it_reads, about 1 run in 70)."""
    receiver = Target(204)
    stored = targets.normalised(url)
    outcome = targets.post(receiver.client(), stored, BODY, {}, production=production,
                           resolver=Resolving("93.184.216.34"))
    assert outcome.ok, outcome
    assert receiver.requests[0].url.raw_path == httpx.URL(stored).raw_path
    assert urlunsplit(urlsplit(stored)) == stored

# -- an attempt never raises --------------------------------------------------------------------------
@pytest.mark.parametrize("url", [f"http://{LONG_LABEL}.example/hook", "http://a..b/hook", "http://exa\tmple.com/"])
def test_a_stored_url_nothing_can_send_to_is_a_refused_attempt_not_an_exception(url):
    receiver = Target(204)
    outcome = targets.post(receiver.client(), url, BODY, {}, production=False)
    assert not outcome.ok and outcome.status_code is None and outcome.error.startswith("refused:")
    assert receiver.requests == []


@pytest.mark.parametrize("error", [UnicodeEncodeError("ascii", "ü", 0, 1, "not ASCII"), ValueError("odd"),
                                   RuntimeError("unexpected"), httpx.InvalidURL("bad")])
def test_whatever_sending_raises_is_a_failed_attempt(error):
    outcome = targets.post(Target(error=error).client(), "http://127.0.0.1:9/in", BODY, {}, production=False)
    assert not outcome.ok and outcome.status_code is None
    assert outcome.error.startswith(type(error).__name__) and len(outcome.error) <= 250


class Finishing:
    """A pool whose connection is only handed to ``store.finish`` (patched to keep its arguments)."""

    def connection(self) -> Any:
        from contextlib import nullcontext
        return nullcontext(None)

    def close(self) -> None:
        return


def test_the_sender_records_an_attempt_that_raised_as_a_failure_on_the_retry_schedule(monkeypatch):
    finished: list[tuple[Any, ...]] = []
    monkeypatch.setattr(store, "finish", lambda *args: finished.append(args))

    raising = Target(error=UnicodeEncodeError("ascii", "bücher.de", 1, 2, "ordinal not in range(128)"))
    sender = WebhookSender(Finishing(), raising.client(), (5.0, 60.0), production=False,  # type: ignore[arg-type]
                           disable_after=3, disable_after_s=0.0, draw=lambda: 0.5)
    due = store.Due(uuid4(), "msg_x_1", BODY, 1, "http://bücher.de/hook", ("whsec_dGVzdA==",))
    sender._deliver(due)
    assert len(finished) == 1
    _, delivery_id, outcome, retry_in, disable_after, disable_after_s, lease, hold_s, tries = finished[0]
    assert delivery_id == due.id and lease is None and tries == due.tries and not outcome.gone
    # The endpoint is held for the schedule's step after its run of failures, its last past the end.
    assert [hold_s(n) for n in (1, 2, 3)] == pytest.approx([5.0, 60.0, 60.0])
    patient = WebhookSender(Finishing(), raising.client(), (5.0, 7200.0), production=False,  # type: ignore[arg-type]
                            disable_after=3, disable_after_s=0.0, draw=lambda: 0.5)
    assert patient._hold_s(2) == HOLD_MAX_S  # a recovered endpoint waits at most that long
    assert not outcome.ok and outcome.status_code is None and outcome.error.startswith("UnicodeEncodeError: ")
    assert retry_in == pytest.approx(60.0)  # the second try failed: the schedule's second step
    assert (disable_after, disable_after_s) == (3, 0.0)


@pytest.mark.parametrize(("step", "held"), [(600.0, 600.0), (5.0, 60.0)])
def test_a_retry_after_holds_the_endpoint_for_it_or_the_schedules_step_whichever_is_longer(monkeypatch, step, held):
    finished: list[tuple[Any, ...]] = []
    monkeypatch.setattr(store, "finish", lambda *args: finished.append(args))
    busy = Target(429, headers={"Retry-After": "60"})
    sender = WebhookSender(Finishing(), busy.client(), (step,), production=False,  # type: ignore[arg-type]
                           disable_after=3, disable_after_s=0.0, draw=lambda: 0.5)  # 0.5: no jitter
    sender._deliver(store.Due(uuid4(), "msg_x_1", BODY, 0, "http://127.0.0.1:9/in", ("whsec_dGVzdA==",)))
    hold_s = finished[0][7]
    assert hold_s(1) == pytest.approx(held)


def test_an_attempt_is_signed_with_every_key_of_its_delivery(monkeypatch):
    monkeypatch.setattr(store, "finish", lambda *args: None)
    receiver = Target(204)
    sender = WebhookSender(Finishing(), receiver.client(), (5.0,), production=False,  # type: ignore[arg-type]
                           disable_after=3, disable_after_s=0.0)
    old, new = "whsec_" + base64.b64encode(b"o" * 24).decode(), "whsec_" + base64.b64encode(b"n" * 24).decode()
    sender._deliver(store.Due(uuid4(), "msg_x_1", BODY, 0, "http://127.0.0.1:9/in", (new, old)))
    [request] = receiver.requests
    headers = dict(request.headers)
    for secret in (old, new):
        Webhook(secret).verify(request.content, headers)  # raises unless one signature is this secret's


def test_a_sender_forgets_a_user_whose_attempts_are_over(monkeypatch):
    """The attempts in flight are counted by user: a user with none left keeps no entry, else
    the count grew with every user the process ever delivered to."""
    monkeypatch.setattr(store, "finish", lambda *args: None)
    sender = WebhookSender(Finishing(), Target(204).client(), (5.0,), production=False,  # type: ignore[arg-type]
                           disable_after=3, disable_after_s=0.0)
    due = store.Due(uuid4(), "msg_x_1", BODY, 0, "http://127.0.0.1:9/in", ("whsec_dGVzdA==",), user_id=uuid4())
    sender._busy[due.user_id] += 1  # as run() counts a claimed delivery
    sender._deliver(due)
    assert dict(sender._busy) == {}


def test_the_sender_prunes_page_after_page_while_pages_come_back_full(monkeypatch):
    pruned: list[int] = []
    stop = threading.Event()
    polls = iter(range(5))

    def prune(conn: Any, keep_s: float, limit: int) -> int:
        pruned.append(limit)
        if len(pruned) == 3:
            stop.set()
        return limit if len(pruned) < 3 else limit - 1

    def claim(*args: Any, **kwargs: Any) -> list[store.Due]:
        if next(polls, None) is None:  # a bound on the loop, whatever prune does
            stop.set()
        return []

    monkeypatch.setattr(store, "prune", prune)
    monkeypatch.setattr(store, "claim", claim)
    sender = WebhookSender(Finishing(), Target(204).client(), (5.0,), production=False,  # type: ignore[arg-type]
                           disable_after=3, disable_after_s=0.0, poll_s=0.0)
    sender.run(stop)
    assert pruned == [PRUNE_PAGE] * 3  # two full pages, then the last, each at once


# -- addresses production refuses ------------------------------------------------------------------
@pytest.mark.parametrize(("address", "reason"), [
    ("::127.0.0.1", "loopback"), ("::10.0.0.1", "private"), ("::169.254.169.254", "metadata"),
    ("::8.8.8.8", "reserved"),  # IPv4-compatible: deprecated, refused even around a public address
    ("fec0::1", "site-local"), ("feff::1", "site-local"), ("240.0.0.1", "private"), ("100::1", "private"),
    ("4000::1", "reserved"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("::", "private"), ("::1", "loopback"),
])
def test_production_refuses_reserved_site_local_and_ipv4_compatible_addresses(address, reason):
    assert targets.refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808", "2606:4700::6810:85e5"])
def test_public_ipv4_inside_ipv6_and_public_ipv6_are_allowed(address):
    assert targets.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("host", "reason"), [
    ("[::127.0.0.1]", "loopback"), ("[fec0::1]", "site-local"), ("[::8.8.8.8]", "reserved"),
    ("[4000::1]", "reserved"), ("[::ffff:169.254.169.254]", "metadata"),
])
def test_a_literal_host_is_judged_as_written_without_resolving(host, reason):
    with pytest.raises(targets.TargetRefused, match=f"is a {reason} address"):
        targets.check(f"https://{host}/in", True, no_dns)


@pytest.mark.parametrize(("address", "reason"), [("::127.0.0.1", "loopback"), ("fec0::1", "site-local"),
                                                 ("4000::1", "reserved"), ("fe80::1%eth0", "link-local")])
def test_a_name_resolving_to_such_an_address_is_refused_alike(address, reason):
    with pytest.raises(targets.TargetRefused, match=f"hooks.example resolves to a {reason} address"):
        targets.check("https://hooks.example/in", True, Resolving("93.184.216.34", address))


def test_a_name_that_resolves_to_no_address_is_refused():
    resolver = Resolving()
    with pytest.raises(targets.TargetRefused, match=r"^hooks\.example does not resolve$"):
        targets.check("https://hooks.example/in", True, resolver)
    assert resolver.asked == ["hooks.example"]


def test_a_public_literal_host_is_connected_to_as_written():
    assert targets.check("https://[2606:4700::6810:85e5]/in", True, no_dns).address == "2606:4700::6810:85e5"


def test_a_host_whose_dns_never_answers_is_refused_in_time_and_holds_at_most_two_threads_a_user() -> None:
    """Names that never resolve (until released, after): each check ends at its deadline with a
    422's error, the queued ones too; a user whose two checks still hold their threads gets a 429
    for a third, and another user's check goes through on the threads left."""
    import asyncio
    import threading

    from adapters.api.rate_limit import RateLimited
    from adapters.api.routes_webhooks import UrlChecks
    from domain.errors import ValidationFailed

    released = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        if host.startswith("silent"):
            released.wait(30)
        return ["127.0.0.1"] if host.startswith("inside") else ["93.184.216.34"]

    checks = UrlChecks(threads=4, per_user=2, timeout_s=0.3, resolver=resolver)
    crowd, attacker, other = [uuid4() for _ in range(6)], uuid4(), uuid4()

    async def crowd_checks() -> list[BaseException | None]:  # 6 on 4 threads: 2 queued, dropped at the deadline
        return await asyncio.gather(*(checks.check(u, "https://silent.example/hook", True, f"203.0.113.{i}")
                                      for i, u in enumerate(crowd)), return_exceptions=True)

    try:
        queued = asyncio.run(crowd_checks())
        released.set()  # the four threads free again
        assert all(isinstance(o, ValidationFailed) and "did not resolve within 0.3 s" in str(o) for o in queued), queued
        released.clear()

        async def one_user() -> list[BaseException | None]:
            held = await asyncio.gather(*(checks.check(attacker, "https://silent.example/x", True) for _ in range(2)),
                                        return_exceptions=True)  # timed out, their threads still stuck
            third = await asyncio.gather(checks.check(attacker, "https://silent.example/y", True),
                                         return_exceptions=True)
            fine = await asyncio.gather(checks.check(other, "https://fine.example/hook", True), return_exceptions=True)
            inside = await asyncio.gather(checks.check(other, "https://inside.example/hook", True),
                                          return_exceptions=True)
            return [*held, *third, *fine, *inside]

        outcomes = asyncio.run(one_user())
        assert [type(o).__name__ for o in outcomes] == ["ValidationFailed", "ValidationFailed", "RateLimited",
                                                        "NoneType", "ValidationFailed"], outcomes
        assert isinstance(outcomes[2], RateLimited)
    finally:
        released.set()
        checks.pool.shutdown(wait=True)


def test_the_users_of_one_client_address_hold_at_most_four_url_check_threads() -> None:
    """Many users from one address (registering them is cheap: 20 at once) whose names never
    resolve took every thread, and every other client's registration failed its check (a 422 at
    the deadline): an address holds at most ``per_address``, a 429 beyond, and another address's
    check goes through on the threads left."""
    import asyncio
    import threading

    from adapters.api.routes_webhooks import UrlChecks

    released = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        if host.startswith("silent"):
            released.wait(30)
        return ["93.184.216.34"]

    checks = UrlChecks(threads=8, per_user=2, per_address=4, timeout_s=0.3, resolver=resolver)

    async def crowd_then_other() -> list[BaseException | None]:
        crowd = await asyncio.gather(*(checks.check(uuid4(), "https://silent.example/hook", True, "203.0.113.7")
                                       for _ in range(8)), return_exceptions=True)
        other = await asyncio.gather(checks.check(uuid4(), "https://fine.example/hook", True, "198.51.100.9"),
                                     return_exceptions=True)
        return [*crowd, *other]

    try:
        outcomes = asyncio.run(crowd_then_other())
        assert [type(o).__name__ for o in outcomes] == ["ValidationFailed"] * 4 + ["RateLimited"] * 4 + ["NoneType"], \
            outcomes
    finally:
        released.set()
        checks.pool.shutdown(wait=True)
