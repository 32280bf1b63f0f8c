"""Every request's edge, in ONE middleware level: its id, the body cap, its metrics and its
trace context.

Each middleware level is a coroutine frame resumed at every await of the request: four levels
cost ``GET /me`` (which awaits its stream's version) 127 us of 469 in process, against 80 of 387
for the static ``GET /presets`` (median of 5 rounds of 3,000 requests each, 32 at a time).

Metrics count every request by route template, method and status, with a latency histogram
(labels come from the route the router matched, never from the raw path: a client cannot grow
the label sets, an unmatched path counts as ``unmatched``). The body cap refuses a body over
``max_body_bytes`` with 413 before the app reads it, chunked bodies too; one that passes it
after the answer has begun (a stream reads the request for its client's disconnect) is taken
for the client going away, and the answer is ended. An answer its app ``broke_off`` (a replay
whose database went away midway: ended whole, its NDJSON would read as complete) is cut: its
connection is dropped without its last chunk, and the client sees the transfer broken."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters import tracing
from adapters.api.envelope import BodyTooLarge, RequestIds, fail, request_id_var
from adapters.logs import bound
from application.executors import CURRENT_TRACE

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
MAX_BODY_BYTES = 64 * 1024


BROKEN = "palette.broken_off"  # the scope's key ``broke_off`` sets


def broke_off(scope: Scope) -> None:
    """Has the edge cut the answer under way instead of ending it: the connection is dropped
    without the last part (no terminating chunk), and no traceback is logged, as one raised after
    the answer's start would be."""
    scope[BROKEN] = True


def _drop(send: Send) -> bool:
    """Drops the connection ``send`` writes to (uvicorn's cycle holds its transport); the server
    then sees its client gone, and an answer left unended is no error of the app. False when
    ``send`` is no such cycle's."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if abort is None:
        return False
    abort()
    return True


def trusted_peer(client: object, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether the TCP peer of a request (ASGI ``scope["client"]``) is in one of ``trusted``
    (an IPv4 address mapped into IPv6 counts as itself; a peer that is no address never is)."""
    if not trusted or not isinstance(client, (tuple, list)) or not client:
        return False
    try:
        address = ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


class RequestEdge:
    """Pure ASGI middleware, no buffering (streams included: timed to the response's start).

    A ``traceparent`` header is continued only from a trusted peer (``PALETTE_TRACE_TRUSTED_PEERS``:
    the GPU workers, whose callbacks carry the job's trace, and a gateway that sets the header
    itself). Anyone else's starts a new trace, linked to the one the client named: a client
    cannot put its requests' events into another trace, or choose the ids the logs are read by.
    The trace (``domain.contracts.trace``) is the one the events of the request's commands are
    stored with, and the request's ids are on every log line it causes."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, max_body_bytes: int = MAX_BODY_BYTES,
                 trusted: Sequence[IPv4Network | IPv6Network] = ()) -> None:
        self.app = app
        self.max_bytes = max_body_bytes
        self.trusted = tuple(trusted)
        self.request_ids = RequestIds()
        self.requests = Counter("palette_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("palette_http_request_duration_seconds",
                                 "request received -> response headers sent, by route template and method",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: C901 - every request's hot path, kept inline
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]  # an exception that escapes every handler is what the server answers

        ended = [False]  # the answer's last part sent
        dropped = [False]  # the connection dropped, the answer broken off

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self._observe(scope, status[0], time.perf_counter() - t0)
                status.append(0)  # observed
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                if scope.get(BROKEN):
                    dropped[0] = _drop(send)
                    return
                ended[0] = True
            await send(message)

        request_id = request_id_var.set(self.request_ids.next())
        try:
            sent, length = "", None
            for name, value in scope.get("headers") or ():
                if name == b"traceparent" and not sent:  # the first one, as before
                    sent = value.decode("latin-1")
                elif name == b"content-length":
                    length = value
            # A length of more digits than any cap is over it (int() refuses 4,300 digits or more).
            if length is not None and (not length.isdigit() or len(length) > 18 or int(length) > self.max_bytes):
                await fail("PAYLOAD_TOO_LARGE", f"body over {self.max_bytes} bytes")(scope, receive, timed)
                return
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                if seen > self.max_bytes:  # past the cap after the answer began: gone, as below
                    return {"type": "http.disconnect"}
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        if len(status) > 1:
                            # The answer has begun (a stream reading for its client's disconnect):
                            # no 413 can be given, and an error raised now escaped as a traceback
                            # per request. The app is told its client went away, and the answer
                            # is ended below.
                            return {"type": "http.disconnect"}
                        raise BodyTooLarge(self.max_bytes)
                return message

            parent, link = (sent, "") if sent and trusted_peer(scope.get("client"), self.trusted) else ("", sent)
            with tracing.span(f"HTTP {scope.get('method', '')}", parent, link=link) as traceparent, \
                    bound(request_id=request_id_var.get()):
                trace = CURRENT_TRACE.set(traceparent)
                try:
                    await self.app(scope, limited, timed)
                    if dropped[0]:
                        await asyncio.sleep(0)  # the server sees the connection lost (called soon)
                    if seen > self.max_bytes and len(status) > 1 and not ended[0]:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    CURRENT_TRACE.reset(trace)
        finally:
            if len(status) == 1:
                self._observe(scope, status[0], time.perf_counter() - t0)
            request_id_var.reset(request_id)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        self.requests.labels(template, method, str(status)).inc()
        self.latency.labels(template, method).observe(seconds)
