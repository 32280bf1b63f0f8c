"""Whose ``traceparent`` the API continues: a trusted peer's (PALETTE_TRACE_TRUSTED_PEERS), no one
else's; a client's starts a new trace, linked to the one it named."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from adapters import tracing
from adapters.api.edge import RequestEdge, trusted_peer
from adapters.settings import DEV_TRACE_TRUSTED_PEERS, Settings, SettingsError, load_settings, trusted_networks
from application.executors import CURRENT_TRACE
from domain.contracts import trace as contract

SENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
LOOPBACK = trusted_networks(DEV_TRACE_TRUSTED_PEERS)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The spans this process makes (the tracer provider is set once per process)."""
    tracing.configure("test", "off")  # ignored when a test before set one: either way an SDK provider
    exporter = InMemorySpanExporter()
    tracing.export_to(exporter)
    return exporter


def edge(trusted: Any) -> RequestEdge:
    return RequestEdge(None, CollectorRegistry(), trusted=trusted)  # type: ignore[arg-type]


def serve_one(context_of: RequestEdge, peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]) -> str:
    """The traceparent the request's handler ran under."""
    seen: list[str] = []

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        seen.append(CURRENT_TRACE.get())

    context_of.app = handler
    scope = {"type": "http", "method": "POST", "path": "/jobs", "headers": headers, "client": peer}
    asyncio.run(context_of(scope, None, None))  # type: ignore[arg-type]
    return seen[0]


@pytest.mark.parametrize(("peer", "trusted"), [
    (("127.0.0.1", 5000), True),
    (("127.9.9.9", 5000), True),
    (("::1", 5000), True),
    (("::ffff:127.0.0.1", 5000), True),  # IPv4 on a dual-stack socket
    (("10.0.0.7", 5000), False),
    (("::ffff:10.0.0.7", 5000), False),
    (("2001:db8::1", 5000), False),
    (("not-an-address", 5000), False),
    (("/run/palette.sock", 0), False),
    (None, False),
    ((), False),
])
def test_only_a_peer_in_a_trusted_network_is_trusted(peer, trusted):
    assert trusted_peer(peer, LOOPBACK) is trusted
    assert trusted_peer(peer, ()) is False  # nothing listed: no one


def test_a_trusted_peers_traceparent_is_continued(spans):
    got = serve_one(edge(LOOPBACK), ("127.0.0.1", 40000), [(b"traceparent", SENT.encode())])
    assert contract.trace_id(got) == SENT[3:35] and got != SENT  # the same trace, a span of its own


def test_an_untrusted_clients_traceparent_starts_a_new_trace_linked_to_it(spans):
    spans.clear()
    got = serve_one(edge(LOOPBACK), ("203.0.113.9", 40000), [(b"traceparent", SENT.encode())])
    assert contract.valid(got) and contract.trace_id(got) != SENT[3:35]
    [span] = [s for s in spans.get_finished_spans() if s.name == "HTTP POST"]
    assert format(span.context.trace_id, "032x") == contract.trace_id(got)
    assert [format(link.context.trace_id, "032x") for link in span.links] == [SENT[3:35]]


def test_nothing_trusted_means_every_request_starts_its_own_trace(spans):
    first = serve_one(edge(()), ("127.0.0.1", 40000), [(b"traceparent", SENT.encode())])
    second = serve_one(edge(()), ("127.0.0.1", 40001), [])
    assert contract.trace_id(first) not in ("", SENT[3:35], contract.trace_id(second))


def test_a_malformed_traceparent_from_a_trusted_peer_starts_a_new_trace_without_a_link(spans):
    spans.clear()
    got = serve_one(edge(LOOPBACK), ("127.0.0.1", 40000), [(b"traceparent", b"00-junk")])
    assert contract.valid(got)
    [span] = [s for s in spans.get_finished_spans() if s.name == "HTTP POST"]
    assert not span.links


def test_trusted_peers_default_to_loopback_in_development_and_to_no_one_in_production(tmp_path: Path):
    assert trusted_networks(Settings(data_dir=tmp_path).trace_trusted_peers) == LOOPBACK
    assert Settings(data_dir=tmp_path, env="production").trace_trusted_peers == ""
    assert Settings(data_dir=tmp_path, trace_trusted_peers="").trace_trusted_peers == ""  # set: kept
    chosen = Settings(data_dir=tmp_path, env="production", trace_trusted_peers="10.1.0.0/16, 2001:db8::5")
    assert trusted_peer(("10.1.2.3", 1), trusted_networks(chosen.trace_trusted_peers))
    assert trusted_peer(("2001:db8::5", 1), trusted_networks(chosen.trace_trusted_peers))
    assert not trusted_peer(("10.2.0.1", 1), trusted_networks(chosen.trace_trusted_peers))


def test_a_bad_trusted_peer_is_refused_in_one_line_naming_it(tmp_path: Path):
    with pytest.raises(SettingsError) as refused:
        load_settings(data_dir=tmp_path, trace_trusted_peers="10.0.0.0/8,example.com")
    assert "PALETTE_TRACE_TRUSTED_PEERS" in str(refused.value) and "example.com" in str(refused.value)
    assert "\n" not in str(refused.value)
