"""The API's request metrics: labels from route templates, so clients cannot grow them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from adapters.api.edge import RequestEdge


async def job(request):  # type: ignore[no-untyped-def]
    return JSONResponse({"id": request.path_params["job_id"]}, status_code=200 if request.method == "GET" else 201)


def test_requests_are_counted_by_route_template_method_and_status():
    registry = CollectorRegistry()
    app = RequestEdge(Starlette(routes=[Route("/jobs/{job_id}", job, methods=["GET", "POST"])]), registry)
    with TestClient(app) as client:
        for n in range(5):
            client.get(f"/jobs/{n}")
        client.post("/jobs/x")
        for n in range(3):
            client.get(f"/nowhere/{n}")
        client.request("BREW", "/jobs/1")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("palette_http_requests_total", route="/jobs/{job_id}", method="GET", status="200") == 5
    assert value("palette_http_requests_total", route="/jobs/{job_id}", method="POST", status="201") == 1
    assert value("palette_http_requests_total", route="unmatched", method="GET", status="404") == 3
    assert value("palette_http_request_duration_seconds_count", route="/jobs/{job_id}", method="GET") == 5
    label_sets = {tuple(sorted(s.labels.items())) for m in registry.collect() for s in m.samples
                  if s.name == "palette_http_requests_total"}
    assert len(label_sets) == 4  # 9 distinct paths, one odd method: four label sets


def test_a_content_length_of_thousands_of_digits_is_a_413_not_a_crash():
    import asyncio

    from adapters.api.edge import RequestEdge

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        raise AssertionError("the body cap lets nothing through")

    sent = []

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/jobs", "headers": [(b"content-length", b"9" * 5000)]}
    asyncio.run(RequestEdge(app, CollectorRegistry())(scope, None, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413


def test_a_body_of_exactly_the_cap_passes_and_one_byte_more_is_a_413_with_a_length_or_chunked():
    async def echo(request):  # type: ignore[no-untyped-def]
        return JSONResponse({"read": len(await request.body())})

    app = RequestEdge(Starlette(routes=[Route("/rules", echo, methods=["POST"])]), CollectorRegistry(),
                      max_body_bytes=100)
    with TestClient(app) as client:
        for size, status in ((100, 200), (101, 413)):
            assert client.post("/rules", content=b"x" * size).status_code == status
            assert client.post("/rules", content=iter([b"x" * 50, b"x" * (size - 50)])).status_code == status
