"""uvicorn's httptools protocol with each request's head bounded.

uvicorn reads a request line and headers of any size, for as long as the client takes: one
connection sending headers without end grows the process's memory, and a few hundred sending a
byte now and then hold their sockets for ever (the keep-alive timeout is off while a request is
being received). Here a head (request line and headers) is at most ``MAX_HEAD_BYTES``, else the
answer is a 431 and the connection is closed, and it must arrive within ``HEAD_TIMEOUT_S`` of its
first byte, else the connection is closed. Bodies are bounded by the app (``adapters.api.edge``)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # a browser sends 1-8 KB; nginx's default limit is 4 x 8 KB
HEAD_TIMEOUT_S = 10.0
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers are over 64 KB")


class HeadTooLarge(Exception):
    """Raised from a parser callback: the head passed MAX_HEAD_BYTES."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the request head bounded in size and time (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # the next bytes belong to a request's head
        self._head_bytes = 0  # received since it began
        self._parsed_bytes = 0  # of it the parser read (request target and headers)
        self._too_large = False
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)
        super().data_received(data)
        # Counted before the parser saw it: a chunk that also holds the end of the head (and a
        # body) is not refused; one that leaves the head unfinished past the limit is.
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._stop_head_timer()
            self.transport.write(TOO_LARGE)
            self.transport.close()

    # What the parser has read of the head, counted exactly: a head that arrives whole in one
    # read (up to 256 KB) ends within it, so the count of bytes received cannot refuse it.
    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._parsed_bytes += size
        if self._parsed_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge  # the parser stops; uvicorn answers with send_400_response

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        self.transport.write(TOO_LARGE)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what comes next is the next request's head
        self._head_bytes = self._parsed_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()


# The API's uvicorn settings (the benchmark's bare app runs under them too). Keep-alive longer
# than clients and proxies keep idle connections: uvicorn's 5 s default races clients that reuse a
# connection just as the server closes it.
SERVER_OPTIONS: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_keep_alive": 75,
                                  "http": BoundedHttpToolsProtocol}
