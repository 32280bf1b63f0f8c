"""One trace from POST /execute to the job's end: the API, the relay, the dispatcher and the GPU
worker log the job under the trace id the client sent (from loopback: a trusted peer in
development), and the job's events are stored with it."""

from __future__ import annotations

import json
import uuid

from adapters.bootstrap import open_event_store
from domain.contracts import trace as contract
from projections.rebuild import iter_envelopes
from tests.integration.test_stack import wait_until

from .test_lifecycle import create_uploaded_job


def _lines(path, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("job_id") == job_id:
                out.append(entry)
    return out


def test_one_trace_id_follows_a_job_through_every_process(client, gpu_apps, settings):
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    job_id = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{job_id}/execute", headers={"traceparent": traceparent},
                json={"concepts": {"wall": {"action": "tone", "value": "warm"}}})
    wait_until(lambda: client.data("GET", f"/jobs/{job_id}")["status"] in ("done", "failed"), timeout_s=120,
               what="the job to finish")
    logs = gpu_apps.log_dir

    def traced(process: str) -> list[str]:
        return [e["msg"] for e in _lines(logs / f"{process}.log", job_id) if e.get("trace_id") == trace_id]

    processes = ("api", "relay", "dispatcher", "gpu")
    found = wait_until(lambda: all(traced(p) for p in processes) and {p: traced(p) for p in processes},
                       timeout_s=30, what="the job's log lines under the client's trace id")
    assert any("queued" in m for m in found["api"]) and any("finished" in m for m in found["api"])
    assert any(m.startswith("published JobQueued") for m in found["relay"])
    wait_until(lambda: any(m.startswith("published JobFinished") for m in traced("relay")), timeout_s=30,
               what="the relay's line for JobFinished")
    assert any("dispatching" in m for m in found["dispatcher"]) and any("item 0" in m for m in found["gpu"])
    app = open_event_store(settings, pool_size=1)
    try:
        traces = {e.type: e.trace for e in iter_envelopes(app.recorder, app.mapper.transcoder, 1, None)
                  if str(e.stream_id) == job_id}
    finally:
        app.close()
    assert contract.trace_id(traces["JobQueued"]) == trace_id  # the request's own event
    assert contract.trace_id(traces["JobFinished"]) == trace_id  # recorded by the worker's callback
    assert contract.trace_id(traces["JobCreated"]) not in ("", trace_id)  # another request: its own trace


def test_no_span_of_a_request_joins_the_trace_an_untrusted_client_names(settings):
    """Every span the API makes for a client's request is in a trace of the server's choosing:
    the client's traceparent is only linked (the framework's own request spans would continue it)."""
    from fastapi.testclient import TestClient
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from adapters import tracing
    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    tracing.configure("test", "off")  # ignored when a test before set one: either way an SDK provider
    exporter = InMemorySpanExporter()
    tracing.export_to(exporter)
    sent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    container = build(settings, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api:  # its peer, "testclient", is no trusted address
            for path in ("/livez", "/presets", "/nowhere"):
                api.get(path, headers={"traceparent": sent})
    finally:
        container.close()
        exporter.shutdown()  # it stays on the process's provider: no more spans kept from here
    spans = exporter.get_finished_spans()
    assert len(spans) >= 3
    assert [s.name for s in spans if f"{s.context.trace_id:032x}" == contract.trace_id(sent)] == []
    assert all(contract.trace_id(sent) in {f"{link.context.trace_id:032x}" for link in s.links}
               for s in spans if s.parent is None)
