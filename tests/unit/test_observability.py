"""The workers' metrics and probes port, on fake dependency checks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from adapters.observability import CountsCollector, Readiness, serve


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_livez_and_readyz_name_the_failing_dependency():
    stats = {"done": 3, "failed": 1}
    broker_up = [True]
    calls = []
    clock = [0.0]

    def broker() -> bool:
        calls.append(1)
        return broker_up[0]

    registry = CollectorRegistry()
    registry.register(CountsCollector("palette_gpu_items", "items", "outcome", lambda: stats))
    server = serve(0, registry, Readiness({"postgres": lambda: True, "broker": broker}, clock=lambda: clock[0]))
    port = server.server_address[1]
    try:
        status, body = _get(port, "/metrics")
        assert status == 200
        assert 'palette_gpu_items_total{outcome="done"} 3.0' in body.decode()
        stats["done"] = 5  # read when scraped
        assert 'palette_gpu_items_total{outcome="done"} 5.0' in _get(port, "/metrics")[1].decode()
        assert _get(port, "/livez")[0] == 200
        assert _get(port, "/readyz") == (200, b'{"status": "ready"}')
        broker_up[0] = False
        assert _get(port, "/readyz")[0] == 200  # checked at most once a second
        clock[0] = 1.5
        status, body = _get(port, "/readyz")
        assert status == 503 and json.loads(body)["failing"] == ["broker"]
        assert len(calls) == 2
        assert _get(port, "/nope")[0] == 404
    finally:
        server.shutdown()
