"""The workers' metrics and probes port, on fake dependency checks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

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


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}


def test_gpu_items_are_timed_once_each_under_the_set_of_ops_they_ran(tmp_path):
    from adapters.observability import collectors_for
    from adapters.settings import Settings
    from tests.unit.test_gpu_worker_hardening import record, step_once, task, worker

    both = {"wall": {"action": "recolor", "value": "#2255cc"}, "floor": {"action": "tone", "value": "warm"}}
    tasks = [task(both), task(idx=1), task({"wall": {"action": "melt", "value": ""}}, idx=2)]
    w, _, _, callbacks, _ = worker([record(t, i) for i, t in enumerate(tasks)])
    registry = CollectorRegistry()
    for collector in collectors_for("gpu", w, Settings(data_dir=tmp_path), registry):
        registry.register(collector)
    step_once(w)
    assert sorted(status for _, status, _ in callbacks.reports) == ["done", "done", "failed"]
    got = _samples(registry)
    assert got[("palette_gpu_item_seconds_count", (("op", "recolor+tone"),))] == 1
    assert got[("palette_gpu_item_seconds_count", (("op", "recolor"),))] == 1
    assert got[("palette_gpu_item_seconds_sum", (("op", "recolor"),))] > 0
    assert not any(labels and "melt" in labels[0][1] for _, labels in got)  # refused: never a label
    assert got[("palette_gpu_items_total", (("outcome", "done"),))] == 2


def test_group_commit_counters_move_with_each_saved_batch():
    from adapters.observability import command_metrics

    class Committer:
        conflicts = 1  # before the metrics were attached: not counted
        observe_batch: Any = None

    committer, registry = Committer(), CollectorRegistry()
    command_metrics(committer, registry)
    committer.observe_batch(3)
    committer.conflicts = 3
    committer.observe_batch(1)
    got = _samples(registry)
    assert got[("palette_group_commit_total", (("kind", "commands"),))] == 4
    assert got[("palette_group_commit_total", (("kind", "batches"),))] == 2
    assert got[("palette_group_commit_total", (("kind", "conflicts"),))] == 2
    assert got[("palette_group_commit_batch_size_count", ())] == 2


def test_every_metric_the_dashboard_queries_is_one_the_processes_define():
    """docs/grafana/palette.json against the names in the code (a renamed family leaves a panel empty)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "docs/grafana/palette.json").read_text())
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"palette_[a-z_]+", target["expr"])}
    source = "".join(p.read_text() for p in (root / "adapters").rglob("*.py"))
    defined = set(re.findall(r"\"(palette_[a-z_]+)\"", source))
    assert len(queried) >= 10 and queried <= defined, queried - defined
