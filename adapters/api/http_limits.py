"""uvicorn's httptools protocol with each request bounded in size and time.

uvicorn reads a request line, headers and trailers of any size, for as long as the client takes:
one connection sending headers without end grows the process's memory, and a few hundred sending
a byte now and then, or nothing at all, hold their sockets for ever (the keep-alive timeout is
armed only after a response). Here:

- what a request sends besides its body (request line, headers, chunk sizes, trailers) is at
  most ``MAX_HEAD_BYTES``, else the answer is a 431 and the connection is closed (the body's size
  is the app's to bound: ``adapters.api.edge``);
- a request must arrive whole within ``REQUEST_TIMEOUT_S`` of the connection's opening, or of
  its first byte on a kept-alive connection, else the connection is closed;
- at most ``MAX_PIPELINED`` requests wait behind the one being answered (uvicorn queues every
  request one read holds: 270 KB of pipelined GETs were ~10,000 waiting, ~23 MB); one more and
  the connection is dropped, what it queued unanswered; so is one whose pipelined request is
  refused (head too large, bad request) while an answer is under way, which a 431 or a 400
  would break into;
- a lost connection is told to the answer under way, not only to the last request parsed
  (uvicorn's), so a stream with requests pipelined behind it ends with its client;
- an answer's client must keep reading: one that has accepted nothing for ``WRITE_STALL_S``
  while the answer waits (the transport's buffer full, or the connection closing with some of it
  unsent) is disconnected, and the stream behind the answer (a replay, a job's events) ends with
  it, its buffers given back;
- a refused request is counted, not logged one line each (uvicorn's warning per request let a
  client choose how much the server wrote to its log): the count is said at most every
  ``WARN_EVERY_S``;
- the connections a server holds are bounded (``ConnectionBounds``): in all, below the process's
  file descriptors, and per client address. Open connections are what one client could otherwise
  take every descriptor with, kept-alive ones cost it nothing, and at the limit ``accept`` fails
  for everyone else. At the limit in all, the connection idle longest (kept alive after its
  answer, or silent since it opened) is closed for the new one; with none idle, or a client at its
  own limit, the new connection gets a 503 ``TOO_MANY_CONNECTIONS`` and is closed."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import struct
import termios
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from adapters.api.rate_limit import client_address

log = logging.getLogger("palette.api.connections")

MAX_HEAD_BYTES = 64 * 1024  # a browser sends 1-8 KB of headers; nginx's default limit is 4 x 8 KB
REQUEST_TIMEOUT_S = 10.0  # a head and a body of at most 64 KB each
LINGER_S = 2.0  # after a 431, what the client still sends is read and dropped this long
WRITE_STALL_S = 60.0  # an answer's client that reads nothing of it this long is disconnected
MAX_PIPELINED = 64  # requests one connection has waiting behind the one being answered
FD_RESERVE = 1024  # descriptors kept for the pools, files and the broker (at most half the limit)
PER_PEER = 256  # connections one client address holds at once (an office behind one NAT included)
REFUSED_LINGER_S = 0.5  # a refused connection reads what its client sends this long, then closes
LINGERING_MAX = 256  # refused connections doing so at once; past it, closed at once
WARN_EVERY_S = 10.0  # the refusals and evictions at the limits are logged at most this often
INVALID_REQUEST = "Invalid HTTP request received."  # uvicorn's warning, once per request it refuses


def fd_limit(raise_to_hard: bool = True) -> int:
    """The process's limit on open descriptors; with ``raise_to_hard``, its soft limit raised to
    the hard one first (where the system allows it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_to_hard and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connections_for(fds: int) -> int:
    """How many client connections a process with ``fds`` descriptors may hold."""
    return max(16, fds - min(FD_RESERVE, fds // 2))


@dataclass
class ConnectionBounds:
    """What one server's connections share: the limits, the count per client address and the
    idle connections, the one idle longest first. ``per_peer`` 0: no limit per address (behind
    trusted proxies every client comes from theirs)."""

    total: int
    per_peer: int = PER_PEER
    peers: Counter[str] = field(default_factory=Counter)
    idle: dict[BoundedHttpToolsProtocol, None] = field(default_factory=dict)
    refused: int = 0
    evicted: int = 0
    stalled: int = 0  # answers whose client read nothing for WRITE_STALL_S (disconnected)
    lingering: int = 0  # refused connections still reading what their client sent
    invalid: int = 0  # requests refused unread (not HTTP/1.1 as it allows, a head too large, too many pipelined)
    _warned: float = 0.0

    def note(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("connection limits (%d in all, %d per address): %s; so far %d refused, %d idle closed, "
                        "%d stalled answers cut, %d requests refused unread", self.total, self.per_peer, what,
                        self.refused, self.evicted, self.stalled, self.invalid)


class CountedRefusals(logging.LoggerAdapter[logging.Logger]):
    """uvicorn's logger for one connection, less its warning of each request it refuses unread:
    that was a line per request, each on a new connection, so a client sending nothing else chose
    how much the server logged. Each is counted in the server's bounds instead, and the count is
    said at most every WARN_EVERY_S (``ConnectionBounds.note``); every other line passes."""

    def __init__(self, logger: logging.Logger, bounds: ConnectionBounds) -> None:
        super().__init__(logger)
        self.bounds = bounds

    @property
    def level(self) -> int:  # uvicorn reads it before its trace lines
        return self.logger.level

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == INVALID_REQUEST and not args:
            self.bounds.invalid += 1
            self.bounds.note("refused a request unread")
            return
        self.logger.warning(msg, *args, **kwargs)


def _server_answer(status: bytes, code: str, message: str, headers: bytes = b"") -> bytes:
    """An answer the server writes itself, before a request reaches the API (the connection
    closes after it): the routes' envelope and a stable code all the same."""
    body = orjson.dumps({"success": False, "data": None, "error": {"code": code, "message": message},
                         # no request reached the API: no request id, whatever context the loop resumed
                         "meta": {"request_id": "-", "timestamp": datetime.now(UTC).isoformat()}})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + headers
            + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def _too_large() -> bytes:
    return _server_answer(b"431 Request Header Fields Too Large", "HEADERS_TOO_LARGE",
                         f"request headers are over {MAX_HEAD_BYTES >> 10} KB")


def _bad_request() -> bytes:
    return _server_answer(b"400 Bad Request", "BAD_HTTP_REQUEST", "not a valid HTTP request")


def _refusal() -> bytes:
    return _server_answer(b"503 Service Unavailable", "TOO_MANY_CONNECTIONS",
                         "too many connections are open: retry in a moment", b"retry-after: 1\r\n")


class HeadTooLarge(Exception):
    """Raised from a parser callback: the request's head passed MAX_HEAD_BYTES."""


class TooManyPipelined(Exception):
    """Raised from a parser callback: over MAX_PIPELINED requests wait on the connection."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with each request and the connections bounded (module docstring).
    The limits are the class's (``limit_connections``)."""

    max_connections: int | None = None  # None: connections_for(fd_limit()) when first needed
    max_per_peer: int = PER_PEER

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.logger = CountedRefusals(self.logger, self._bounds)  # type: ignore[assignment]
        super().connection_made(transport)
        self._received = 0  # bytes of the request being received
        self._body = 0  # of them, the body's
        self._parsed = 0  # of its head, what the parser read (target, header and trailer fields)
        self._too_large = False
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._peer: str | None = None  # the address it counts against, once admitted
        self._lingers = False  # refused, and reading what its client sends before closing
        self._stall: asyncio.TimerHandle | None = None  # armed while the client reads nothing
        self._answering: Any = None  # the request cycle the app answers now (self.cycle: the last parsed)
        if self._admitted():
            self._start_clock()  # a connection that sends nothing is closed too

    def on_message_begin(self) -> None:
        if self._deadline is None:  # the next request on a kept-alive connection (or pipelined)
            self._start_clock()
        super().on_message_begin()

    def data_received(self, data: bytes) -> None:
        self._bounds.idle.pop(self, None)
        if self._refused:
            return  # read and dropped until the connection closes (see _refuse)
        if self._deadline is None and not self._answer_under_way():
            # A kept-alive connection's first byte: the parser skips line breaks before a
            # request line without beginning one, and uvicorn stops keep-alive's timer on any
            # read, so "\r\n" now and then would hold the connection for ever.
            self._start_clock()
        self._received += len(data)
        super().data_received(data)
        # Counted as received, before the parser split it: a read that ends the request is not
        # refused (the parser's exact count is below); one that leaves it unfinished past the
        # limit is.
        if self._deadline is not None and self._received - self._body > MAX_HEAD_BYTES:
            self._refuse()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # headers and trailers
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:  # behind an answer under way: send_400_response drops it
            raise TooManyPipelined  # the parser stops; uvicorn answers with send_400_response

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_clock()  # received whole: the app's turn, then keep-alive's
        self._received = self._body = self._parsed = 0

    def send_400_response(self, msg: str) -> None:
        if self._answering_another():  # no 400 written into an answer begun (nor past MAX_PIPELINED)
            self._drop()
            return
        if self._too_large:  # HeadTooLarge stopped the parser: uvicorn took it for a bad request
            self._refuse()
            return
        self.transport.write(_bad_request())  # uvicorn's own is plain text
        self.transport.close()  # a close timed as the others
        self._watch_closing()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def _answer_under_way(self) -> bool:
        return self._answering is not None and not self._answering.response_complete

    def _answering_another(self) -> bool:
        """An answer under way that a refusal now would land inside: one to a request received
        whole (what is refused is a request pipelined behind it), or one begun before its own
        request's body ended (a stream answered while a bad chunk or trailers over the limit
        arrive)."""
        return self._answer_under_way() and (not self._answering.more_body or self._answering.response_started)

    def _drop(self) -> None:
        """Abort the connection, what it queued unanswered: a refusal written now would land in
        the middle of an answer under way."""
        self._stop_clock()
        self.pipeline.clear()
        self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, waiting for the next request
            self._bounds.idle[self] = None
        self._watch_closing()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._watch_closing()

    def _unsupported_upgrade_warning(self) -> None:
        """An Upgrade request is served as plain HTTP (``ws`` is off: the API has no WebSocket,
        and an upgraded connection would leave this protocol, its count never given back); not
        two warnings in the log per such request."""

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._watch_stall(None)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._watch_closing()

    def _watch_closing(self) -> None:
        """A closing connection with some of its answer unsent waits for its client as a paused
        answer does, and is timed the same way: its close waits for the buffer to drain, and an
        answer under the high-water mark (64 KB) never paused writing, so a client that read
        nothing of it held the connection for ever. Nothing more is written to it, so what is
        left only falls while its client reads."""
        if self._stall is None and self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._watch_stall(None)

    def _watch_stall(self, before: int | None) -> None:
        """While the answer waits on its client (nothing more is written meanwhile): every
        WRITE_STALL_S, the client must have taken some of what is buffered, else the connection is
        aborted (a close would wait for the buffer to drain); the app's send then returns and the
        answer's stream is stopped. Progress, not the pause, is timed: a large answer written at
        once stays paused until nearly all of it is read, and the client takes from the kernel's
        buffer (megabytes) before this one moves, so both are counted."""
        left = self.transport.get_write_buffer_size() + _kernel_unsent(self.transport)
        if before is not None and left >= before:
            self._stall = None
            self._bounds.stalled += 1
            self._bounds.note("disconnected a client that read nothing of its answer")
            self.transport.abort()
            return
        self._stall = self.loop.call_later(WRITE_STALL_S, self._watch_stall, left)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer_under_way():  # uvicorn tells self.cycle, the last parsed: with requests
            self._answering.disconnected = True  # pipelined behind it, the answer under way (a
            self._answering.message_event.set()  # stream) would never learn its client left
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._stop_clock()
        bounds = self._bounds
        bounds.idle.pop(self, None)
        if self._lingers:
            bounds.lingering -= 1
            self._lingers = False
        if self._peer is not None:
            bounds.peers[self._peer] -= 1
            if bounds.peers[self._peer] <= 0:
                del bounds.peers[self._peer]
            self._peer = None
        super().connection_lost(exc)

    @property
    def _bounds(self) -> ConnectionBounds:
        """The server's (one per uvicorn server, made by its first connection)."""
        bounds: ConnectionBounds | None = getattr(self.server_state, "palette_bounds", None)
        if bounds is None:
            total = self.max_connections if self.max_connections is not None else connections_for(fd_limit(False))
            bounds = ConnectionBounds(total, self.max_per_peer)
            self.server_state.palette_bounds = bounds  # type: ignore[attr-defined]
        return bounds

    def _admitted(self) -> bool:
        """Count the new connection in, closing the one idle longest if the server is full; False
        (the connection refused and closing) when none is idle or its address is at its limit."""
        bounds = self._bounds
        peer = client_address(self.client[0] if self.client else None, [], 0)
        if bounds.per_peer and bounds.peers[peer] >= bounds.per_peer:
            return self._turn_away(f"{peer} holds {bounds.peers[peer]}")
        while len(self.connections) > bounds.total and bounds.idle:  # ours counted in already
            oldest = next(iter(bounds.idle))
            del bounds.idle[oldest]
            bounds.evicted += 1
            oldest.transport.abort()  # at once: close() would wait for a client that reads nothing
            self.connections.discard(oldest)  # its connection_lost comes on a later turn of the loop
        if len(self.connections) > bounds.total:
            return self._turn_away("every connection is busy")
        if len(self.connections) == bounds.total:
            bounds.note("full")
        self._peer = peer
        bounds.peers[peer] += 1
        bounds.idle[self] = None  # silent since it opened
        return True

    def _turn_away(self, why: str) -> bool:
        """The 503, then (as ``_refuse`` does, but shorter and only for so many at once) a
        lingering close: the client's request, sent before it reads, would otherwise turn the
        close into a reset. Not counted among the server's connections: it holds no request."""
        bounds = self._bounds
        bounds.refused += 1
        bounds.note(f"refused a connection ({why})")
        self._refused = True
        self.connections.discard(self)
        self.transport.write(_refusal())
        if bounds.lingering < LINGERING_MAX and self.transport.can_write_eof():
            bounds.lingering += 1
            self._lingers = True
            self.transport.write_eof()
            self._deadline = self.loop.call_later(REFUSED_LINGER_S, self._too_slow)
        else:
            self.transport.close()
        return False

    def _count(self, size: int) -> None:
        self._parsed += size
        if self._parsed > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge  # the parser stops; uvicorn answers with send_400_response

    def _refuse(self) -> None:
        """The 431, then a lingering close: closing with the client's bytes unread would send it
        a reset, which can destroy the answer before the client reads it; so the answer is
        followed by a FIN, what still comes is dropped, and the connection closes after
        LINGER_S."""
        self._stop_clock()
        if self._refused or self.transport.is_closing():
            return
        if self._answering_another():  # a pipelined head, or trailers: no 431 inside that answer
            self._drop()
            return
        self._refused = True
        self.transport.write(_too_large())
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._deadline = self.loop.call_later(LINGER_S, self._too_slow)
        else:
            self.transport.close()

    def _start_clock(self) -> None:
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._too_slow)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
            self._watch_closing()


def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes of the connection's socket its client has not acknowledged (0 where the system does
    not say)."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return 0


def limit_connections(max_connections: int, max_per_peer: int) -> None:
    """Set this process's connection limits (0 in all: what its descriptors allow, its soft limit
    raised to the hard one first; 0 per peer: none). Class attributes, as uvicorn builds a
    worker process's protocol from its name."""
    fds = fd_limit()
    BoundedHttpToolsProtocol.max_connections = max_connections or connections_for(fds)
    BoundedHttpToolsProtocol.max_per_peer = max_per_peer


# The API's uvicorn settings (the benchmark's bare app runs under them too). Keep-alive longer
# than clients and proxies keep idle connections: uvicorn's 5 s default races clients that reuse a
# connection just as the server closes it. No proxy headers: uvicorn would otherwise put a
# loopback peer's X-Forwarded-For in place of the peer, so every client of an API bound on
# 127.0.0.1 chose the address its limits count against; PALETTE_TRUSTED_PROXIES says how far the
# header is believed (adapters.api.rate_limit.client_address), and nothing else reads it. No
# WebSocket: the API serves none, and an upgraded connection leaves the bounded protocol. On
# SIGTERM the responses running get GRACEFUL_SHUTDOWN_S, then are ended (their tasks canceled)
# and the app shuts down: uvicorn waited, unbounded, for every one to end, and a client's event
# stream ends after 10 minutes (a worker's parent joins it without a bound too), so a stop outlived
# the supervisor's 20 s and was SIGKILLed, the app's shutdown never run. A command waits at most
# COMMIT_LAG_MAX_S (4 s) to be written, so one in flight is answered within it.
GRACEFUL_SHUTDOWN_S = 5
SERVER_OPTIONS: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_keep_alive": 75,
                                  "http": BoundedHttpToolsProtocol, "ws": "none", "proxy_headers": False,
                                  "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S}
