"""uvicorn's httptools protocol with each request bounded in size and time.

uvicorn reads a request line, headers and trailers of any size, for as long as the client takes:
one connection sending headers without end grows the process's memory, and a few hundred sending
a byte now and then, or nothing at all, hold their sockets for ever (the keep-alive timeout is
armed only after a response). Here:

- what a request sends besides its body (request line, headers, chunk sizes, trailers) is at
  most ``MAX_HEAD_BYTES``, else the answer is a 431 and the connection is closed (the body's size
  is the app's to bound: ``adapters.api.edge``);
- a request must arrive whole within ``REQUEST_TIMEOUT_S`` of the connection's opening, or of
  its first byte on a kept-alive connection, else the connection is closed."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # a browser sends 1-8 KB of headers; nginx's default limit is 4 x 8 KB
REQUEST_TIMEOUT_S = 10.0  # a head and a body of at most 64 KB each
LINGER_S = 2.0  # after a 431, what the client still sends is read and dropped this long
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers are over 64 KB")


class HeadTooLarge(Exception):
    """Raised from a parser callback: the request's head passed MAX_HEAD_BYTES."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with each request bounded (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._received = 0  # bytes of the request being received
        self._body = 0  # of them, the body's
        self._parsed = 0  # of its head, what the parser read (target, header and trailer fields)
        self._too_large = False
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._start_clock()  # a connection that sends nothing is closed too

    def on_message_begin(self) -> None:
        if self._deadline is None:  # the next request on a kept-alive connection (or pipelined)
            self._start_clock()
        super().on_message_begin()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the connection closes (see _refuse)
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

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_clock()  # received whole: the app's turn, then keep-alive's
        self._received = self._body = self._parsed = 0

    def send_400_response(self, msg: str) -> None:
        if self._too_large:  # HeadTooLarge stopped the parser: uvicorn took it for a bad request
            self._refuse()
            return
        super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

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
        self._refused = True
        self.transport.write(TOO_LARGE)
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


# The API's uvicorn settings (the benchmark's bare app runs under them too). Keep-alive longer
# than clients and proxies keep idle connections: uvicorn's 5 s default races clients that reuse a
# connection just as the server closes it. No proxy headers: uvicorn would otherwise put a
# loopback peer's X-Forwarded-For in place of the peer, so every client of an API bound on
# 127.0.0.1 chose the address its limits count against; PALETTE_TRUSTED_PROXIES says how far the
# header is believed (adapters.api.rate_limit.client_address), and nothing else reads it.
SERVER_OPTIONS: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_keep_alive": 75,
                                  "http": BoundedHttpToolsProtocol, "proxy_headers": False}
