"""Traces with OpenTelemetry: one trace from a request to the last event it causes.

The API continues a trusted peer's ``traceparent`` header (or starts a trace) for each request; the
events a command records are stored with it (``domain.contracts.trace``); the relay carries it
in the envelope and a Kafka header, the dispatcher in each GPU task, the worker on its callback,
whose command records the item and job events under the same trace. Each process makes spans in
that trace (``span``) and puts its id in its log lines (``trace_id``).

Spans go nowhere by default (``PALETTE_TRACE_EXPORTER=off``: ids are still made, for the logs);
``console`` prints them, ``otlp`` sends them over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from adapters.logs import bound
from domain.contracts import trace as contract

_tracer = trace.get_tracer("palette")


def configure(process: str, exporter: str) -> None:
    """The process's tracer provider; ``exporter`` is off, console or otlp."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"palette-{process}"}))
    chosen: SpanExporter | None = None
    if exporter == "console":
        chosen = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        chosen = OTLPSpanExporter()
    if chosen is not None:
        provider.add_span_processor(BatchSpanProcessor(chosen))
    trace.set_tracer_provider(provider)


def current() -> str:
    """The traceparent of the span in progress ("" outside any)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return contract.valid(carrier.get(contract.HEADER, ""))


def _span_context(traceparent: str) -> trace.SpanContext:
    return trace.get_current_span(propagate.extract({contract.HEADER: traceparent})).get_span_context()


@contextlib.contextmanager
def span(name: str, parent: str = "", link: str = "", **attributes: str | int) -> Iterator[str]:
    """A span named ``name`` as a child of the ``parent`` traceparent (a new trace when it is
    empty or malformed), linked to the ``link`` traceparent when it is valid (a trace it does not
    join: a client's, not trusted); its log lines carry the trace id. Yields the span's traceparent."""
    context = propagate.extract({contract.HEADER: parent}) if contract.valid(parent) else None
    links = [trace.Link(_span_context(link))] if contract.valid(link) else None
    with _tracer.start_as_current_span(name, context=context, links=links, attributes=attributes):
        now = current()
        with bound(trace_id=contract.trace_id(now) or None):
            yield now
