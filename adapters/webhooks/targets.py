"""Where a webhook may go, and one POST to it.

A target's host is kept in its ASCII form: an international name becomes its IDNA A-labels
(``bücher.de`` -> ``xn--bcher-kva.de``, lower-case), which go in the Host header and the TLS name;
a host with no such form (an empty label, a label over 63 characters, a name over 253, a character
no host may hold) is refused. In production a target must be ``https`` and every address its host
is or resolves to public: not loopback, private, link-local (the cloud metadata address
169.254.169.254 among them), site-local, shared, reserved or multicast, IPv4 inside IPv6 judged as
the IPv4 address it reaches; checked at registration and again before each attempt (DNS
changes; the lookup within the attempt's 10 s), and the attempt connects to the very address
checked (no second lookup to rebind).
Development allows any address, so tests listen on 127.0.0.1. An attempt takes at most 10 s in
all, follows no redirect (a 3xx is a failure) and reads at most 4 KiB of the answer; whatever it
raises is its failure, recorded and retried like any other.

httpx's timeouts bound each socket operation, so a receiver answering a byte every few seconds
would hold a sender for as long as it liked; the sender's sockets cut every operation to what is
left of the attempt's deadline (``_Deadlined``), and an attempt past it is a timeout.
"""

from __future__ import annotations

import email.utils
import http.cookiejar
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpcore
import httpx

MAX_URL_LENGTH = 2048
TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 4096
WAIT_CODES = (429, 503)  # the answers whose Retry-After is read (Too Many Requests, Service Unavailable)
GONE = 410  # the receiver says the endpoint is gone for good: it is disabled at once
_SECONDS = re.compile(r"[0-9]{1,10}")
MAX_RETRY_AFTER = 64  # characters: an HTTP date is 29; a longer value is no Retry-After
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
            ipaddress.ip_address("100.100.100.200")}

Resolver = Callable[[str, int], list[str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValueError):
    """A URL webhooks may not be sent to; the message says why."""


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise TargetRefused(f"{host} does not resolve ({e})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """The IPv4 address inside ``address`` (mapped, 6to4, Teredo, NAT64, IPv4-compatible) and
    whether it is IPv4-compatible (``::a.b.c.d``, deprecated); None: no IPv4 inside."""
    inside = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
    if inside is None and address in NAT64:
        inside = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if inside is not None:
        return inside, False
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d, but not :: or ::1
        return ipaddress.IPv4Address(int(address)), True
    return None


def refusal(address: Address) -> str | None:
    """Why production refuses to send to ``address`` (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 inside IPv6 reaches that IPv4 address: judged as it. IPv4-compatible addresses
        # are deprecated (RFC 4291) and reserved: refused even around a public IPv4 address.
        embedded = _embedded(address)
        if embedded is not None:
            inside, compatible = embedded
            return refusal(inside) or ("reserved" if compatible else None)
        if address.is_site_local:
            return "site-local"
    if address in METADATA:
        return "metadata"
    for reason, hit in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                        ("private", address.is_private), ("multicast", address.is_multicast),
                        ("reserved", address.is_reserved)):
        if hit:
            return reason
    return None if address.is_global else "non-public"


MAX_LABEL = 63
MAX_NAME = 253
_ASCII_LABEL = re.compile(r"[a-z0-9_-]+")  # letters, digits, hyphens; underscores as DNS allows
# Controls (C0, DEL, C1) and spaces of any kind: urlsplit strips some at either end, so the URL
# stored and listed would not be the one checked and sent; inside, they are sent percent-encoded.
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


def _idna(host: str) -> str:
    """``host`` in IDNA A-labels: the ``idna`` package (IDNA 2008 after UTS #46's mapping, as
    browsers do: a fullwidth letter is its ASCII one), else the standard library's codec (IDNA 2003)."""
    try:
        import idna
    except ImportError:  # httpx depends on idna: only a stripped install lacks it
        return host.encode("idna").decode("ascii")
    return idna.encode(host, uts46=True).decode("ascii")


def ascii_host(host: str) -> str:
    """The ASCII, lower-case form of a host name or address (``bücher.de`` ->
    ``xn--bcher-kva.de``); raises TargetRefused for a host with none."""
    if ":" in host:  # an IPv6 literal (urlsplit took it from between brackets), kept as written
        return _ipv6_literal(host)
    name = _a_labels(host).lower()
    labels = name.removesuffix(".").split(".")
    if len(name.removesuffix(".")) > MAX_NAME:
        raise TargetRefused(f"the host is longer than {MAX_NAME} characters")
    for label in labels:
        _check_label(label, host)
    if labels[-1].isdigit():  # no top-level name is numeric: an IPv4 address, written in full
        _check_ipv4(name.removesuffix("."), host)
    return name


def _ipv6_literal(host: str) -> str:
    """An IPv6 address as its lower-case self; one with a zone names this machine's interface, no target."""
    try:
        if "%" in host:
            raise ValueError("a zone")
        ipaddress.IPv6Address(host)
    except ValueError:
        raise TargetRefused(f"{host!r} is not an IPv6 address without a zone") from None
    return host.lower()


def _a_labels(host: str) -> str:
    """An international host name in IDNA A-labels; an ASCII one as written."""
    if host.isascii():
        return host
    try:
        return _idna(host)
    except (UnicodeError, ValueError) as e:  # idna.IDNAError is a UnicodeError
        raise TargetRefused(f"the host {host!r} has no IDNA form ({str(e)[:100]})") from None


def _check_label(label: str, host: str) -> None:
    """One label of ``host`` as DNS takes it: not empty, at most 63 characters, LDH, an A-label decodable."""
    if not label:
        raise TargetRefused(f"the host {host!r} has an empty label")
    if len(label) > MAX_LABEL:
        raise TargetRefused(f"the host {host!r} has a label longer than {MAX_LABEL} characters")
    if _ASCII_LABEL.fullmatch(label) is None:
        raise TargetRefused(f"the host {host!r} holds a character no host name may")
    if label.startswith("xn--"):
        try:
            _idna(label)
        except (UnicodeError, ValueError):
            raise TargetRefused(f"the host {host!r} has an invalid IDNA label") from None


def _check_ipv4(address: str, host: str) -> None:
    """A numeric host is an IPv4 address in full (``10.1`` is not one here, though inet_aton takes it)."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise TargetRefused(f"{host!r} is not an IPv4 address") from None


@dataclass(frozen=True)
class Target:
    """A checked URL and, in production, the address to connect to."""

    url: str
    host: str
    address: str | None


def check(url: str, production: bool, resolver: Resolver = resolve) -> Target:
    """The target of ``url``, its host in ASCII (``Target.url`` is ``url`` with that host, as
    urlunsplit writes it: an empty query or fragment dropped); raises TargetRefused with the reason."""
    parts, port = _sendable_parts(url)
    host = ascii_host(_hostname(parts, port, production))
    url = _stored_url(parts, host)
    if not production:
        return Target(url, host, None)
    return Target(url, host, _public_addresses(host, port, resolver)[0])


def _sendable_parts(url: str) -> tuple[SplitResult, int]:
    """A URL that can be sent as stored, in parts, and the port it connects to."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if _UNSENDABLE.search(url):
        raise TargetRefused("the URL must not hold spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise TargetRefused(f"not a URL ({e})") from None
    return parts, port


def _hostname(parts: SplitResult, port: int, production: bool) -> str:
    """The URL's host as written, once its port, scheme, credentials and path are a webhook's."""
    if port == 0:
        raise TargetRefused("the URL's port must be 1..65535")
    allowed = ("https",) if production else ("http", "https")
    if parts.scheme not in allowed or not parts.hostname:
        raise TargetRefused(f"the URL must be {' or '.join(allowed)} with a host")
    if parts.username or parts.password:
        raise TargetRefused("the URL must not carry credentials")
    if {".", ".."} & set(parts.path.split("/")):  # the client drops them: it would post elsewhere than listed
        raise TargetRefused("the URL's path must not hold . or .. segments (write it resolved)")
    return parts.hostname


def _stored_url(parts: SplitResult, host: str) -> str:
    """The URL with its host in ASCII, as stored, listed and sent."""
    # Always rebuilt as urlunsplit writes it (an empty query or fragment dropped): a production
    # attempt connects to this URL rebuilt so (_pinned), and "/hook?" was stored but "/hook" sent.
    url = urlunsplit(parts._replace(netloc=_netloc(host, parts.port)))
    if len(url) > MAX_URL_LENGTH:  # an international host grows in IDNA: the stored URL is checked again
        raise TargetRefused(f"the URL is longer than {MAX_URL_LENGTH} characters with its host in ASCII")
    return url


def _public_addresses(host: str, port: int, resolver: Resolver) -> list[str]:
    """The addresses to connect to, all public: a literal as written, a name every address it resolves to."""
    try:
        ipaddress.ip_address(host)
        addresses, verb = [host], "is"
    except ValueError:
        addresses, verb = resolver(host, port), "resolves to"
    if not addresses:
        raise TargetRefused(f"{host} does not resolve")
    for text in addresses:
        reason = refusal(ipaddress.ip_address(text.split("%")[0]))
        if reason is not None:
            raise TargetRefused(f"{host} {verb} a {reason} address")
    return addresses


def _netloc(host: str, port: int | None) -> str:
    """A URL's host and port: an IPv6 address between brackets."""
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


def normalised(url: str) -> str:
    """``url`` with its host in ASCII, as ``check`` makes it: what is stored, and sent to."""
    return check(url, production=False).url


def capped(chunks: Iterable[bytes], limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """At most ``limit`` bytes of a body, reading no chunk past the one that reaches it."""
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def answer_head(answer: bytes) -> str:
    """What is kept of an answer: its text, at most MAX_RESPONSE_BYTES in UTF-8 (a byte that is
    not UTF-8 reads as U+FFFD, three bytes: 4 KiB of them decoded whole were 12 KiB kept)."""
    text = answer[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")
    return text.encode()[:MAX_RESPONSE_BYTES].decode("utf-8", "ignore")


# The monotonic time the attempt in this thread must end by (None: no attempt, no deadline).
_deadline: ContextVar[float | None] = ContextVar("webhook_attempt_deadline", default=None)


@contextmanager
def ending_by(deadline: float) -> Iterator[None]:
    """Every operation on the sender's sockets in this thread, in this block, ends by ``deadline``
    (``time.monotonic``)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """An operation's ``timeout`` cut to what is left of the attempt; raises ``late`` when nothing is."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:  # a socket timeout of 0 would make it non-blocking, not late
        raise late("the attempt's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlinedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self.stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlinedStream(self.stream.start_tls(ssl_context, server_hostname,
                                                      _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class _Deadlined(httpcore.NetworkBackend):
    """httpcore's sockets, each operation bounded by the attempt's deadline as well as its own timeout."""

    def __init__(self) -> None:
        self.backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlinedStream(self.backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code (None: no answer) or an error, the answer's head, and
    the wait a 429 or 503 answer asked for (its Retry-After, in seconds; None: none asked)."""

    status_code: int | None
    error: str
    body: str
    duration_ms: int
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == GONE


def _pinned(target: Target) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL to connect to the checked address, the Host header and TLS name that keep the name."""
    if target.address is None:
        return target.url, {}, {}
    parts = urlsplit(target.url)
    return (urlunsplit(parts._replace(netloc=_netloc(target.address, parts.port))),
            {"host": _netloc(target.host, parts.port)}, {"sni_hostname": target.host})  # host: ASCII (check)


def post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], production: bool,
         resolver: Resolver = resolve) -> Outcome:
    """One attempt, over within TIMEOUT_S of its start (with the client of ``client()``); never
    raises (refused, unreachable, slow, dripping, rude, a URL httpx will not send to: a failure)."""
    started = time.monotonic()

    def done(status: int | None, error: str, answer: bytes = b"", wait: float | None = None) -> Outcome:
        return Outcome(status, error, answer_head(answer), int((time.monotonic() - started) * 1000), wait)

    try:
        target = check(url, production, _within(resolver, started + TIMEOUT_S))
        address, extra_headers, extensions = _pinned(target)
        with ending_by(started + TIMEOUT_S), client.stream(
                "POST", address, content=body, headers={**headers, **extra_headers},
                extensions=extensions) as response:
            answer = capped(response.iter_raw(MAX_RESPONSE_BYTES))
            asked = response.headers.get("retry-after") if response.status_code in WAIT_CODES else None
            return done(response.status_code, "", answer, retry_after_s(asked, time.time()))
    except TargetRefused as e:
        return done(None, f"refused: {e}")
    except httpx.TimeoutException:
        return done(None, "timeout")
    except Exception as e:  # noqa: BLE001 - whatever one attempt raises is that attempt's failure
        return done(None, failure(e))


def retry_after_s(value: str | None, now: float) -> float | None:
    """The seconds a Retry-After header asks to wait from ``now`` (Unix time): a number of seconds
    or an HTTP date (RFC 9110); None when there is none, it cannot be read (over 64 characters, a
    control character in it), or its date is past."""
    if value is None or len(value) > MAX_RETRY_AFTER:
        return None
    value = value.strip()
    if not (value.isascii() and value.isprintable()):  # parsedate reads past NULs and control characters
        return None
    if _SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        wait = when.replace(tzinfo=when.tzinfo or UTC).timestamp() - now  # an HTTP date is GMT
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return wait if wait > 0 else None


def _within(resolver: Resolver, deadline: float) -> Resolver:
    """``resolver`` on a thread of its own, given up at ``deadline`` (``time.monotonic``) as a
    timeout: a name whose DNS answers late, or never, held the attempt for the resolver's whole
    timeout (tens of seconds), past its 10 s and past its lease (the delivery then went out twice
    at once). The thread abandoned ends with the lookup."""

    def resolve_by(host: str, port: int) -> list[str]:
        answer: Future[list[str]] = Future()

        def lookup() -> None:
            try:
                answer.set_result(resolver(host, port))
            except BaseException as e:  # noqa: BLE001 - handed to the attempt, which judges it
                answer.set_exception(e)

        threading.Thread(target=lookup, name="webhook-lookup", daemon=True).start()
        try:
            return answer.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise httpx.ConnectTimeout(f"{host} did not resolve within the attempt's deadline") from None

    return resolve_by


def failure(error: Exception) -> str:
    """An attempt's error as recorded: its type and the head of its message."""
    return f"{type(error).__name__}: {str(error)[:200]}"


class _Transport(httpx.HTTPTransport):
    """httpx's transport over a pool of deadlined sockets (httpx takes no network backend: the
    pool it made is replaced by the same one with ours)."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Deadlined())


def client(production: bool) -> httpx.Client:
    """The sender's HTTP client: 10 s timeouts, each attempt within 10 s in all (``post``), no
    redirects, no environment proxies. In production no connection is kept: the pool is keyed by
    the address connected to, and a connection made (and its certificate checked) for one name
    must not carry a request for another name there. No cookie is kept either: the client is
    every user's, a receiver's Set-Cookie went on to every endpoint on its host (cookies ignore
    the port), and one setting new ones on each answer grew the process without end. httpx's
    line per request is not logged: a user's URL may carry a token."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0 if production else 32)
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(timeout=httpx.Timeout(TIMEOUT_S), follow_redirects=False, trust_env=False,
                        cookies=no_cookies, transport=_Transport(limits))
