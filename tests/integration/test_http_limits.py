"""The API's HTTP server bounds each request's head (adapters.api.http_limits): a head over
64 KB is a 431 and the connection closes, one that has not arrived within its time is cut off,
and neither a body nor the next request on a kept-alive connection counts towards it. The peer
is the TCP peer, whatever forwarding headers say. The connections it holds are bounded, per
client address and in all, where the one idle longest makes room for a new one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from adapters.api import http_limits
from adapters.bootstrap import embedded_stack
from adapters.settings import load_settings
from tests.conftest import free_port
from tests.waiting import wait_until

BIG = 8 << 20  # /big answers this many bytes
MID = 48 << 10  # /mid answers this many: under the transport's high-water mark (64 KB), never paused


SERVED: list[str] = []  # the paths of the requests echo_app was given, in order
RELEASE = threading.Event()  # what /hold waits for


STREAM_ENDS: list[str] = []  # how each /stream ended: "disconnect" or "ran out"


async def stream(receive: Any, send: Any) -> None:
    """A chunk every 50 ms for up to 30 s, until told its client left (as the job events do)."""
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(600):
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        with contextlib.suppress(TimeoutError):
            if (await asyncio.wait_for(receive(), 0.05))["type"] == "http.disconnect":
                STREAM_ENDS.append("disconnect")
                return
    STREAM_ENDS.append("ran out")
    await send({"type": "http.response.body", "body": b""})


async def listening(receive: Any, send: Any) -> None:
    """A chunk every 50 ms for up to 30 s while it waits on ``receive``, with no timeout, for its
    client to leave (as Starlette's StreamingResponse does)."""
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})

    async def chunks() -> None:
        for _ in range(600):
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
            await asyncio.sleep(0.05)

    sending = asyncio.create_task(chunks())
    while (await receive())["type"] != "http.disconnect":
        pass
    sending.cancel()
    STREAM_ENDS.append("disconnect")


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    SERVED.append(scope["path"])
    if scope["path"] == "/stream":
        return await stream(receive, send)
    if scope["path"] == "/listen":
        return await listening(receive, send)
    while scope["path"] == "/hold" and not RELEASE.is_set():  # answered once the test lets it
        await asyncio.sleep(0.01)
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    # /peer: the client address the app sees; /big: BIG bytes; /mid: MID; anything else: the body's size.
    body = (scope["client"][0].encode() if scope["path"] == "/peer" else b"x" * BIG if scope["path"] == "/big"
            else b"x" * MID if scope["path"] == "/mid" else str(size).encode())
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server() -> Iterator[int]:
    with serving(http_limits.BoundedHttpToolsProtocol) as (port, _):
        yield port


@contextlib.contextmanager
def serving(protocol: type[http_limits.BoundedHttpToolsProtocol]) -> Iterator[tuple[int, uvicorn.Server]]:
    port = free_port()
    config = uvicorn.Config(echo_app, host="127.0.0.1", port=port, lifespan="off",
                            **{**http_limits.SERVER_OPTIONS, "http": protocol})
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:  # its own flag, set once it listens
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        threading.Event().wait(0.01)
    yield port, srv
    srv.should_exit = True
    thread.join(timeout=10)


def exchange(port: int, *parts: bytes) -> bytes:
    """Everything the server sends back until it closes or stays silent for 5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for part in parts:
            conn.sendall(part)
        got = b""
        try:
            while chunk := conn.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


def test_a_head_over_the_limit_is_a_431_and_the_connection_closes(server: int) -> None:
    pad = b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))  # ~80 KB, never finished
    answer = exchange(server, b"GET / HTTP/1.1\r\nhost: x\r\n", pad)
    assert answer.startswith(b"HTTP/1.1 431 ")
    whole = exchange(server, b"GET / HTTP/1.1\r\nhost: x\r\n" + pad + b"connection: close\r\n\r\n")
    assert whole.startswith(b"HTTP/1.1 431 ")


def test_a_431_is_as_long_as_it_says_and_a_client_library_reads_it(server: int) -> None:
    """The 431 said ``content-length: 31`` of its 30-byte body, then closed: a client waiting
    for the last byte read no answer at all (httpx: RemoteProtocolError, not the 431)."""
    answer = exchange(server, b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (70 << 10) + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    (length,) = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")]
    assert len(body) == length, (length, body)
    r = httpx.get(f"http://127.0.0.1:{server}/", headers={"x-pad": "a" * (70 << 10)}, timeout=5)
    assert r.status_code == 431 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == {"code": "HEADERS_TOO_LARGE", "message": "request headers are over 64 KB"}
    assert r.json()["meta"]["request_id"] == "-"  # README: no request reached the API


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nhost: x\r\nidempotency-key: a\x7fb\r\n\r\n",  # a DEL in a value
    b"GET / HTTP/1.1\r\nhost: x\r\nx-a: b\r\n folded\r\n\r\n",  # obs-fold
    b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
])
def test_a_request_http_does_not_allow_is_the_servers_400_and_the_connection_closes(
        server: int, request_bytes: bytes) -> None:
    """README: the server's own answers before a request reaches the API are the envelope, with a
    stable code, as the routes' (uvicorn's 400 was plain text)."""
    answer = exchange(server, request_bytes + b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json\r\n" in answer, answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1  # the request after it is never read
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (body["success"], body["error"]["code"]) == (False, "BAD_HTTP_REQUEST")


def test_a_body_and_the_next_request_do_not_count_towards_the_head(server: int) -> None:
    body = b"b" * 60_000
    request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    headers = b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))  # 40 KB: within
    last = b"GET / HTTP/1.1\r\nhost: x\r\n" + headers + b"connection: close\r\n\r\n"
    answer = exchange(server, request, request, last)
    assert answer.count(b"HTTP/1.1 200 ") == 3 and b"431" not in answer, answer[:300]


def test_a_body_over_the_head_limit_is_not_counted_while_it_is_still_arriving(server: int) -> None:
    """The body's bytes are the app's to bound: a request whose first 100 KB of body has come and
    whose rest has not is no 431."""
    body = b"b" * 200_000
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body[:100_000])
        conn.settimeout(1.0)
        with pytest.raises(TimeoutError):  # no answer to half a request: the server waits for the rest
            conn.recv(100)
        conn.settimeout(5)
        conn.sendall(body[100_000:])
        assert conn.recv(100).startswith(b"HTTP/1.1 200 ")


def test_each_request_on_a_kept_alive_connection_has_a_head_limit_of_its_own(server: int) -> None:
    headers = b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))  # 40 KB: within
    request = b"GET / HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n"
    last = b"GET / HTTP/1.1\r\nhost: x\r\n" + headers + b"connection: close\r\n\r\n"
    answer = exchange(server, request, request, last)  # 120 KB of heads in all
    assert answer.count(b"HTTP/1.1 200 ") == 3 and b"431" not in answer, answer[:300]


def test_a_connection_pipelining_more_requests_than_the_bound_is_closed_before_they_pile_up(server: int) -> None:
    """uvicorn queues every request a read holds behind the one in flight: 270 KB of pipelined
    GETs were ~10,000 requests waiting in one connection's memory (~23 MB), for as long as the
    first took; 256 such connections a client address. Past MAX_PIPELINED waiting, the
    connection is closed and what it queued is dropped unread by the app."""
    RELEASE.clear()
    try:
        with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
            conn.sendall(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
            wait_until(lambda: "/hold" in SERVED, 10, "the first request in the app")
            conn.sendall(b"GET /piped HTTP/1.1\r\nhost: x\r\n\r\n" * 5000)
            got = b""
            with contextlib.suppress(ConnectionError):
                while chunk := conn.recv(65536):  # closed by the server (a recv timing out would raise)
                    got += chunk
    finally:
        RELEASE.set()
    assert got == b"" and SERVED.count("/piped") == 0
    few = b"GET /piped HTTP/1.1\r\nhost: x\r\n\r\n" * http_limits.MAX_PIPELINED
    answer = exchange(server, few + b"GET /piped HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 ") == http_limits.MAX_PIPELINED + 1  # within the bound: all served


def _streaming(port: int, path: str = "/stream") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    got = b""
    while b"data: x" not in got:
        got += conn.recv(65536)
    return conn


@pytest.mark.parametrize("path", ["/stream", "/listen"])
def test_a_stream_with_a_request_pipelined_behind_it_ends_when_its_client_leaves(server: int, path: str) -> None:
    """uvicorn tells a lost connection to the last request it parsed: the stream under way kept
    sending into a closed connection (and a job's events stream polling the store) till its end;
    one waiting on ``receive`` alone waited for ever."""
    STREAM_ENDS.clear()
    SERVED.clear()
    conn = _streaming(server, path)
    conn.sendall(b"GET /piped HTTP/1.1\r\nhost: x\r\n\r\n")
    wait_until(lambda: SERVED.count(path) == 1, 10, "the stream in the app")
    conn.close()
    wait_until(lambda: STREAM_ENDS == ["disconnect"], 10, "the stream told its client left")


def test_a_pipelined_request_refused_during_a_stream_drops_the_connection_without_a_word_inside_the_stream(
        server: int, caplog: pytest.LogCaptureFixture) -> None:
    """A 431 (or a 400) for a request pipelined behind a stream was written into the stream's
    chunks, and the stream's next write raised after the 431's EOF (a traceback in the log)."""
    for refused in (b"GET /piped HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (http_limits.MAX_HEAD_BYTES + 1024),
                    b"NOT HTTP AT ALL\r\n\r\n"):
        STREAM_ENDS.clear()
        conn = _streaming(server)
        with conn:
            conn.sendall(refused)
            got = b""
            with contextlib.suppress(ConnectionError):
                while chunk := conn.recv(65536):  # till the server drops it
                    got += chunk
        assert b"HTTP/1.1 4" not in got
        wait_until(lambda: STREAM_ENDS == ["disconnect"], 10, "the stream told its client left")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("refused", [b"zz\r\n",  # no chunk size: a 400
                                     b"0\r\nx-pad: " + b"a" * (http_limits.MAX_HEAD_BYTES + 1024)],  # a 431
                         ids=["a bad chunk", "trailers over the limit"])
def test_a_request_refused_in_its_own_body_while_its_answer_streams_gets_no_word_inside_the_stream(
        server: int, caplog: pytest.LogCaptureFixture, refused: bytes) -> None:
    """A stream answered before its request's chunked body ended: a bad chunk or trailers over the
    limit then wrote the 400 or 431 into the stream's chunks (the answer had begun), and after the
    431's EOF the stream's next write raised."""
    STREAM_ENDS.clear()
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(b"POST /stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        got = b""
        while b"data: x" not in got:
            got += conn.recv(65536)
        conn.sendall(refused)
        with contextlib.suppress(ConnectionError, TimeoutError):
            while chunk := conn.recv(65536):  # till the server drops it
                got += chunk
    assert b"HTTP/1.1 4" not in got, got[-300:]
    wait_until(lambda: STREAM_ENDS == ["disconnect"], 10, "the stream told its client left")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_trailers_count_as_the_head_does(server: int) -> None:
    pad = b"".join(b"x-t-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))  # ~80 KB of trailer fields
    answer = exchange(server, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n", pad)
    assert answer.startswith(b"HTTP/1.1 431 ")
    endless = exchange(server, b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: ",
                       b"a" * 200_000)  # one field that never ends: the parser has not seen it yet
    assert endless.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nhost: x\r\n",
                                  b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc"],
                         ids=["nothing", "a head cut short", "a body cut short"])
def test_a_request_that_does_not_arrive_whole_in_time_is_cut_off(
    server: int, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    monkeypatch.setattr(http_limits, "REQUEST_TIMEOUT_S", 0.3)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(sent)  # and nothing more
        assert conn.recv(100) == b""  # closed by the server (a recv timing out would raise)


def test_a_request_cut_short_on_a_kept_alive_connection_is_cut_off_too(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "REQUEST_TIMEOUT_S", 0.3)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")  # and nothing more
        assert conn.recv(100) == b""  # closed by the server (a recv timing out would raise)


def test_a_kept_alive_connection_sending_line_breaks_and_never_a_request_is_cut_off(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser skips line breaks before a request line, so no request began and no clock ran;
    each read also stopped keep-alive's timer and took the connection off the idle ones: a client
    sending "\\r\\n" now and then held its connection for ever, never closed for a newer one."""
    monkeypatch.setattr(http_limits, "REQUEST_TIMEOUT_S", 0.3)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")
        with contextlib.suppress(OSError):  # closed meanwhile: what follows is refused
            for _ in range(15):  # 1.5 s of line breaks, five request deadlines
                conn.sendall(b"\r\n")
                threading.Event().wait(0.1)  # the slow client itself: not a wait for anything
        with contextlib.suppress(ConnectionResetError):  # closed, a line break sent after it reset
            assert conn.recv(100) == b""  # closed by the server (before: a recv timing out raised)


def test_a_kept_alive_connection_gets_its_time_again_for_each_request(
    server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_limits, "REQUEST_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        for _ in range(3):  # 3 x ~0.3 s: past one deadline in all, within each request's own
            conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")
            threading.Event().wait(0.3)  # idle between requests, as a client is (keep-alive's turn)


def test_the_app_sees_the_tcp_peer_whatever_a_loopback_client_forwards(server: int) -> None:
    # uvicorn's default puts a loopback peer's X-Forwarded-For in its place: every client of an API
    # on 127.0.0.1 would choose the address its registration limit counts against.
    for header in (b"x-forwarded-for: 203.0.113.9", b"x-forwarded-for: 203.0.113.9, 198.51.100.1",
                   b"forwarded: for=203.0.113.9", b"x-real-ip: 203.0.113.9"):
        answer = exchange(server, b"GET /peer HTTP/1.1\r\nhost: x\r\n" + header + b"\r\nconnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n127.0.0.1"), answer


# -- connections ------------------------------------------------------------------------------
def limited(total: int, per_peer: int) -> type[http_limits.BoundedHttpToolsProtocol]:
    limits = {"max_connections": total, "max_per_peer": per_peer}
    return type("Limited", (http_limits.BoundedHttpToolsProtocol,), limits)


def kept_alive(port: int) -> socket.socket:
    """A connection that had an answer and is kept alive."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")
    return conn


def answered(conn: socket.socket) -> bytes:
    """What the server answers a request on ``conn`` (b"" if it closed the connection)."""
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return conn.recv(1000)
    except ConnectionError:
        return b""


def refused(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.1 503 ") and b'"TOO_MANY_CONNECTIONS"' in answer


def test_one_address_holds_at_most_its_share_of_connections() -> None:
    with serving(limited(total=100, per_peer=3)) as (port, _), contextlib.ExitStack() as held:
        conns = [held.enter_context(kept_alive(port)) for _ in range(3)]
        assert refused(exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
        conns[0].close()  # one given back: room for the next
        for _ in range(50):  # the server learns of the close on its next turn
            got = exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            if got.startswith(b"HTTP/1.1 200 "):
                break
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert all(answered(c).startswith(b"HTTP/1.1 200 ") for c in conns[1:])  # the others untouched


def test_an_address_whose_connections_all_closed_is_counted_no_more() -> None:
    """The count per address keeps no entry for one holding no connection: each address a client
    connected from once (an IPv6 prefix holds billions) would otherwise stay for the server's life."""
    with serving(limited(total=100, per_peer=3)) as (port, srv):
        with kept_alive(port):
            assert list(srv.server_state.palette_bounds.peers.values()) == [1]
        wait_until(lambda: not srv.server_state.palette_bounds.peers, 10, "the address counted out")


def test_at_the_limit_the_connection_idle_longest_makes_room() -> None:
    with serving(limited(total=3, per_peer=0)) as (port, _), contextlib.ExitStack() as held:
        conns = [held.enter_context(kept_alive(port)) for _ in range(3)]
        answered(conns[0])  # the first is now the one idle the shortest; the second the longest
        newcomer = held.enter_context(kept_alive(port))
        assert answered(conns[1]) == b""  # closed for the newcomer
        assert all(answered(c).startswith(b"HTTP/1.1 200 ") for c in (conns[0], conns[2], newcomer))


def test_at_the_limit_a_connection_silent_since_it_opened_makes_room_as_an_idle_one_does() -> None:
    with serving(limited(total=2, per_peer=0)) as (port, srv), contextlib.ExitStack() as held:
        silent = [held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(2)]
        wait_until(lambda: len(srv.server_state.connections) >= 2, 10, "the server to accept the two")
        newcomer = held.enter_context(kept_alive(port))  # served, not a 503
        assert answered(silent[0]) == b""  # the one silent the longest, closed for the newcomer
        assert answered(newcomer).startswith(b"HTTP/1.1 200 ")


def busy_connections(port: int, srv: uvicorn.Server, held: contextlib.ExitStack, n: int) -> list[socket.socket]:
    """``n`` connections, each with a request under way (its head not finished), read by the server."""
    busy = [held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(n)]
    for conn in busy:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
    wait_until(lambda: len(srv.server_state.connections) >= n and not srv.server_state.palette_bounds.idle,
               10, f"the server to read the {n} requests")
    return busy


def test_at_the_limit_with_none_idle_a_new_connection_is_refused() -> None:
    with serving(limited(total=3, per_peer=0)) as (port, srv), contextlib.ExitStack() as held:
        busy = busy_connections(port, srv, held, 3)
        assert refused(exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
        for conn in busy:  # each finished whole, none closed for the refused one
            conn.sendall(b"\r\n")
            assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")


def test_a_refused_connection_takes_no_place_from_the_next_while_it_lingers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_limits, "REFUSED_LINGER_S", 5.0)
    with serving(limited(total=3, per_peer=0)) as (port, srv), contextlib.ExitStack() as held:
        busy = busy_connections(port, srv, held, 3)
        turned_away = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert refused(turned_away.recv(1000))  # and its client keeps it open: the server lingers on it
        busy[0].sendall(b"\r\n")
        assert busy[0].recv(1000).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: bool(srv.server_state.palette_bounds.idle), 10, "the answered connection idle")
        newcomer = held.enter_context(kept_alive(port))  # room made by the idle one alone
        assert answered(busy[0]) == b"" and answered(newcomer).startswith(b"HTTP/1.1 200 ")


def test_the_request_a_refused_connection_sends_never_reaches_the_app() -> None:
    with serving(limited(total=100, per_peer=1)) as (port, _), kept_alive(port):
        answer = exchange(port, b"GET /refused HTTP/1.1\r\nhost: x\r\n\r\n")  # read until the server closes
    assert refused(answer) and answer.count(b"HTTP/1.1 ") == 1
    assert "/refused" not in SERVED


def test_refused_connections_that_lingered_and_closed_leave_room_for_more_to_linger() -> None:
    """At most LINGERING_MAX refused connections linger at once, counted out as they close: a
    count only ever growing would, after so many refusals in the process's life, close every
    refused connection at once (its 503 lost to a reset when its client had sent a request)."""
    with serving(limited(total=100, per_peer=1)) as (port, srv), kept_alive(port):
        for _ in range(3):
            assert refused(exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
        wait_until(lambda: srv.server_state.palette_bounds.lingering == 0, 10, "the refused connections counted out")
        assert srv.server_state.palette_bounds.refused == 3


def test_the_connection_limit_follows_the_descriptors() -> None:
    assert http_limits.connections_for(20_000) == 20_000 - http_limits.FD_RESERVE
    assert http_limits.connections_for(1024) == 512  # at most half kept back
    assert http_limits.connections_for(10) == 16


def accepted_sockets(port: int) -> int:
    """The descriptors this process holds on connections the server on ``port`` accepted."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":  # not the listener
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}")[len("socket:["):-1] in inodes:
                held += 1
    return held


def test_a_connection_closed_for_a_newer_one_gives_its_descriptor_back_even_with_its_answer_unread() -> None:
    """An idle connection whose client reads nothing holds its answer in the server's buffer:
    closed gracefully, its socket (a descriptor) would stay open until the client reads it."""
    with serving(limited(total=2, per_peer=0)) as (port, _), contextlib.ExitStack() as held:
        unread = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        unread.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")  # answered whole, into buffers; never read
        for _ in range(2):  # the second one closes the /big one, idle the longest
            assert answered(held.enter_context(kept_alive(port))).startswith(b"HTTP/1.1 200 ")
        # before: 3 until the client read 4 MB, i.e. for ever
        wait_until(lambda: accepted_sockets(port) <= 2, 10, "the closed connection's descriptor given back")


def test_a_client_that_reads_nothing_of_its_answer_is_disconnected_and_one_reading_slowly_is_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled reader held its answer's buffers (and a replay's page of the log behind them) for
    as long as it kept the connection open. The cut is counted in the limits' warning."""
    monkeypatch.setattr(http_limits, "WRITE_STALL_S", 0.5)
    with serving(http_limits.BoundedHttpToolsProtocol) as (server, srv):
        with socket.create_connection(("127.0.0.1", server), timeout=5) as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            slow.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            got = 0
            while got < BIG:  # a pause of a fifth of the stall after each read: never 0.5 s without one
                chunk = slow.recv(1 << 18)
                assert chunk, f"disconnected after {got} bytes"
                got += len(chunk)
                threading.Event().wait(0.1 if got < BIG // 8 else 0)
        assert srv.server_state.palette_bounds.stalled == 0
        with socket.create_connection(("127.0.0.1", server), timeout=5) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")  # and never reads
            # Cut, and its descriptor given back (before: held until the client read 8 MB, i.e. for
            # ever). The count first: a connection the server has yet to accept holds no descriptor.
            wait_until(lambda: srv.server_state.palette_bounds.stalled != 0 and accepted_sockets(server) == 0,
                       10, "the stalled connection dropped")
        assert srv.server_state.palette_bounds.stalled == 1
    assert any("1 stalled answers cut" in r.getMessage() for r in caplog.records)


class SmallSendBuffer(http_limits.BoundedHttpToolsProtocol):
    """The server's kernel holding 4 KB of an answer, as a link's send buffer may hold less than
    the answer (on loopback it grows to megabytes, and takes a /mid whole)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().connection_made(transport)


@pytest.mark.parametrize("closed_by", ["connection: close", "keep-alive's timeout"])
def test_a_client_that_reads_nothing_of_an_answer_under_the_high_water_mark_is_disconnected_once_it_is_closed(
    monkeypatch: pytest.MonkeyPatch, closed_by: str
) -> None:
    """An answer written whole into the transport's buffer without passing its high-water mark
    never paused writing, so the stall was never watched: the close that follows the answer (its
    client's "connection: close", or keep-alive's timeout) waits for that buffer to drain, and a
    client that read nothing held its connection (a descriptor, a count against its address's
    limit, one no newer connection evicts) for ever."""
    monkeypatch.setattr(http_limits, "WRITE_STALL_S", 0.5)
    monkeypatch.setitem(http_limits.SERVER_OPTIONS, "timeout_keep_alive", 0.3)
    header = b"connection: close\r\n" if closed_by == "connection: close" else b""
    with serving(SmallSendBuffer) as (port, srv), socket.socket() as unread:
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: its window
        unread.connect(("127.0.0.1", port))
        unread.sendall(b"GET /mid HTTP/1.1\r\nhost: x\r\n" + header + b"\r\n")  # and never reads
        # before: held (closing, its answer unsent) until the client read it, i.e. for ever. Not
        # waited for as accepted first: on a loaded machine it may be cut before a poll sees it
        # (the bounds are the server's from its first connection on)
        wait_until(lambda: getattr(srv.server_state, "palette_bounds", None) is not None
                   and srv.server_state.palette_bounds.stalled != 0 and accepted_sockets(port) == 0,
                   10, "the stalled connection dropped")
        assert srv.server_state.palette_bounds.stalled == 1


def test_a_client_that_reads_nothing_of_its_answer_then_sends_a_bad_request_is_disconnected(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 400 for a bad request closes the connection too, and that close waits for the buffer
    to drain as the others do: a client that read nothing of an answer under the high-water mark
    and then sent a malformed request held its connection (no longer an idle one a newer
    connection evicts) for ever, as the close after keep-alive's timeout did."""
    monkeypatch.setattr(http_limits, "WRITE_STALL_S", 0.5)
    monkeypatch.setitem(http_limits.SERVER_OPTIONS, "timeout_keep_alive", 60)
    with serving(SmallSendBuffer) as (port, srv), socket.socket() as unread:
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: its window
        unread.connect(("127.0.0.1", port))
        unread.sendall(b"GET /mid HTTP/1.1\r\nhost: x\r\n\r\n")  # and never reads
        wait_until(lambda: accepted_sockets(port) == 1, 10, "the connection accepted")
        wait_until(lambda: bool(srv.server_state.palette_bounds.idle), 10, "the answer written, kept alive")
        unread.sendall(b"GET /\x01 HTTP/1.1\r\n\r\n")  # a 400, then the close
        wait_until(lambda: srv.server_state.palette_bounds.stalled != 0 and accepted_sockets(port) == 0,
                   10, "the stalled connection dropped")


def test_a_client_that_read_its_large_answer_whole_stays_connected_however_long_it_then_idles(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stall watch ends when the client catches up; it does not go on timing a kept-alive
    connection that has nothing left to read."""
    monkeypatch.setattr(http_limits, "WRITE_STALL_S", 0.3)
    with serving(http_limits.BoundedHttpToolsProtocol) as (server, srv), \
            socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        conn.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + BIG:
            chunk = conn.recv(1 << 20)
            assert chunk, f"disconnected after {len(got)} bytes"
            got += chunk
        threading.Event().wait(1.0)  # idle past three stall periods, as a kept-alive client may be
        assert answered(conn).startswith(b"HTTP/1.1 200 ")
        assert srv.server_state.palette_bounds.stalled == 0


def test_an_upgrade_request_is_plain_http_and_gives_its_connection_back() -> None:
    upgrade = (b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
               b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    with serving(limited(total=100, per_peer=2)) as (port, _):
        with contextlib.ExitStack() as held:  # the address's two connections, each upgrade-asking
            for _ in range(2):
                conn = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
                conn.sendall(upgrade)
                assert conn.recv(1000).startswith(b"HTTP/1.1 200 ")  # served as HTTP, not switched
        for _ in range(100):  # given back once the server sees them closed (before: never)
            got = exchange(port, upgrade.replace(b"connection: Upgrade", b"connection: close"))
            if got.startswith(b"HTTP/1.1 200 "):
                break
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nhost: x\r\nx-a: b\x7f\r\n\r\n",  # a request HTTP does not allow: a 400
    b"GET / HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * (70 << 10) + b"\r\n\r\n",  # a head too large: a 431
])
def test_a_client_refused_again_and_again_writes_a_line_to_the_log_at_most_every_ten_seconds(
        request_bytes: bytes) -> None:
    """uvicorn warned once per refused request, each a new connection: a client chose how much the
    server logged. Now the refusals are counted and said at most every WARN_EVERY_S."""
    uvicorn_lines, our_lines = Records(), Records()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_lines)
    logging.getLogger(http_limits.log.name).addHandler(our_lines)
    began = time.monotonic()
    try:
        with serving(http_limits.BoundedHttpToolsProtocol) as (port, srv):
            for _ in range(50):
                assert exchange(port, request_bytes).startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
            wait_until(lambda: srv.server_state.palette_bounds.invalid == 50, 10, "the 50 refusals counted")
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_lines)
        logging.getLogger(http_limits.log.name).removeHandler(our_lines)
    assert not [r for r in uvicorn_lines.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in uvicorn_lines.records][:3]
    said = [r.getMessage() for r in our_lines.records if "requests refused unread" in r.getMessage()]
    assert 1 <= len(said) <= 1 + (time.monotonic() - began) / http_limits.WARN_EVERY_S, said[:3]
    assert said[0].endswith(", 1 requests refused unread")  # the first, said at once


@pytest.mark.parametrize(("total", "per_peer", "busy"), [(100, 2, 0), (3, 0, 3)])
def test_an_api_at_its_connection_limits_is_alive_to_the_supervisor(tmp_path: Path, total: int, per_peer: int,
                                                                    busy: int) -> None:
    """The 503 a server at its limits answers is its event loop's own: the process is alive. The
    supervisor's probe counted it a miss, so a client holding its address's share (the supervisor's
    own loopback: a proxy on the same host, or anyone there) had an answering API restarted with
    every request in flight (seen live: 256 kept-alive connections from 127.0.0.1, a restart a
    minute later); so had every connection busy at once."""
    with serving(limited(total=total, per_peer=per_peer)) as (port, srv), contextlib.ExitStack() as held:
        for _ in range(per_peer):
            held.enter_context(kept_alive(port))
        if busy:
            busy_connections(port, srv, held, busy)
        assert refused(exchange(port, b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n"))
        healthy = embedded_stack(load_settings(data_dir=tmp_path, api_port=port))._app_spec("api").healthy
        assert healthy is not None and healthy()
