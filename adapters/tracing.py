"""Traces with OpenTelemetry: one trace from a request to the last event it causes.

The API continues a trusted peer's ``traceparent`` header (or starts a trace) for each request; the
events a command records are stored with it (``domain.contracts.trace``); the relay carries it
in the envelope and a Kafka header, the dispatcher in each GPU task, the worker on its callback,
whose command records the item and job events under the same trace. Each process makes spans in
that trace (``span``) and puts its id in its log lines (``trace_id``).

Spans go nowhere by default (``PALETTE_TRACE_EXPORTER=off``: only their ids are made, for the
events and the logs, without the SDK's span objects, which cost several times as much);
``console`` prints them, ``otlp`` sends them over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter

from adapters.logs import bound
from domain.contracts import trace as contract

_tracer = trace.get_tracer("palette")
_recording = False  # whether spans go anywhere (an exporter): else only their ids are made


def configure(process: str, exporter: str) -> None:
    """The process's tracer provider; ``exporter`` is off, console or otlp."""
    global _recording
    provider = TracerProvider(resource=Resource.create({"service.name": f"palette-{process}"}))
    chosen: SpanExporter | None = None
    if exporter == "console":
        chosen = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        chosen = OTLPSpanExporter()
    if chosen is not None:
        provider.add_span_processor(BatchSpanProcessor(chosen))
        _recording = True
    trace.set_tracer_provider(provider)


def export_to(exporter: SpanExporter) -> None:
    """Also hand every span this process ends to ``exporter``, at once (tests keep them in
    memory); spans are made with the SDK from here on."""
    global _recording
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        raise RuntimeError("no tracer provider: call configure first")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _recording = True


def _traceparent(context: trace.SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _remote(traceparent: str) -> trace.SpanContext:
    """The span context a valid traceparent names (parsed here: the propagator API costs a
    tenth of a cheap request)."""
    return trace.SpanContext(trace_id=int(traceparent[3:35], 16), span_id=int(traceparent[36:52], 16),
                             is_remote=True, trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)))


@contextlib.contextmanager
def span(name: str, parent: str = "", link: str = "", **attributes: str | int) -> Iterator[str]:
    """A span named ``name`` as a child of the ``parent`` traceparent (a new trace when it is
    empty or malformed), linked to the ``link`` traceparent when it is valid (a trace it does not
    join: a client's, not trusted); its log lines carry the trace id. Yields the span's traceparent."""
    if not _recording:
        now = ids_only(parent)
        with bound(trace_id=now[3:35]):
            yield now
        return
    context = trace.set_span_in_context(trace.NonRecordingSpan(_remote(parent))) if contract.valid(parent) else None
    links = [trace.Link(_remote(link))] if contract.valid(link) else None
    with _tracer.start_as_current_span(name, context=context, links=links, attributes=attributes or None) as made:
        now = _traceparent(made.get_span_context())
        with bound(trace_id=now[3:35]):
            yield now


def ids_only(parent: str = "") -> str:
    """The traceparent of a span that goes nowhere: in ``parent``'s trace with its flags when it
    is valid, else in a new sampled trace; ids random and non-zero, as the SDK makes them."""
    span_id = random.getrandbits(64) or 1
    if contract.valid(parent):
        return f"00-{parent[3:35]}-{span_id:016x}-{parent[53:55]}"
    return f"00-{random.getrandbits(128) or 1:032x}-{span_id:016x}-01"
