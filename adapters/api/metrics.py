"""The API's observability middleware: every request by route template, method and status with
a latency histogram (labels come from the route the router matched, never from the raw path: a
client cannot grow the label sets, an unmatched path counts as ``unmatched``), and each request
in a trace with its ids on its log lines."""

from __future__ import annotations

import time
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters import tracing
from adapters.api.envelope import request_id_var
from adapters.logs import bound
from domain.contracts import trace as contract

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class HttpMetrics:
    """Pure ASGI middleware (no body buffering, streams included: timed to the response's start)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("palette_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("palette_http_request_duration_seconds",
                                 "request received -> response headers sent, by route template and method",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]  # an exception that escapes every handler is what the server answers

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self._observe(scope, status[0], time.perf_counter() - t0)
                status.append(0)  # observed
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            if len(status) == 1:
                self._observe(scope, status[0], time.perf_counter() - t0)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        self.requests.labels(template, method, str(status)).inc()
        self.latency.labels(template, method).observe(seconds)


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


class RequestContext:
    """Each request in a trace: its span, the trace the events of its commands are stored with
    (``domain.contracts.trace``), and its ids on every log line it causes.

    A ``traceparent`` header is continued only from a trusted peer (``PALETTE_TRACE_TRUSTED_PEERS``:
    the GPU workers, whose callbacks carry the job's trace, and a gateway that sets the header
    itself). Anyone else's starts a new trace, linked to the one the client named: a client
    cannot put its requests' events into another trace, or choose the ids the logs are read by."""

    def __init__(self, app: ASGIApp, trusted: Sequence[IPv4Network | IPv6Network] = ()) -> None:
        self.app = app
        self.trusted = tuple(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = ""
        for name, value in scope.get("headers") or ():
            if name == b"traceparent":
                sent = value.decode("latin-1")
                break
        parent, link = (sent, "") if sent and trusted_peer(scope.get("client"), self.trusted) else ("", sent)
        with tracing.span(f"HTTP {scope.get('method', '')}", parent, link=link) as traceparent, \
                bound(request_id=request_id_var.get()):
            token = contract.CURRENT.set(traceparent)
            try:
                await self.app(scope, receive, send)
            finally:
                contract.CURRENT.reset(token)
