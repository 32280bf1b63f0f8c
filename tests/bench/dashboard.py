"""The Grafana dashboard (docs/grafana/palette.json) drawn without Grafana, from real metrics.

The embedded stack of `palette up` starts on free ports in a temporary directory with the API,
relay, projector, dispatcher, GPU worker and webhook sender; a short workload runs through the HTTP API
(clients register, upload a photo, execute edits of every op, poll until the job ends; a reader
lists its jobs); every process's metrics port is scraped once a second, and the dashboard's main
panels are computed from those scrapes the way its queries ask (a rate is the counter's increase
over RATE_WINDOW_S; a quantile is ``histogram_quantile`` over the buckets' increase in
QUANTILE_WINDOW_S) and drawn with PIL (matplotlib is not a dependency).

    .venv/bin/python -m tests.bench.dashboard [--seconds 60] [--out docs/images/dashboard.png]
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters.bootstrap import embedded_stack
from adapters.observability import port_of
from adapters.settings import load_settings
from infra.stack import EmbeddedStack
from tests.bench.harness import say
from tests.conftest import _free_metrics_port, _free_port_block

PROCESSES = ("api", "relay", "projector", "dispatcher", "gpu", "webhooks")
RATE_WINDOW_S = 5.0
QUANTILE_WINDOW_S = 15.0
# The edits the clients ask for: each op alone, and two together (one item, two ops).
EDITS: tuple[dict[str, dict[str, str]], ...] = (
    {"wall": {"action": "recolor", "value": "#5b7f95"}},
    {"wall": {"action": "tone", "value": "warm"}},
    {"floor": {"action": "texture", "value": "wood"}},
    {"lamp": {"action": "remove", "value": ""}},
    {"wall": {"action": "recolor", "value": "#a0522d"}, "floor": {"action": "texture", "value": "marble"}},
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- the stack and the workload -------------------------------------------------------------
@contextmanager
def watched_stack() -> Iterator[EmbeddedStack[Any]]:
    """`palette up`'s processes on free ports (metrics ports too) in a temporary directory."""
    data_dir = Path(tempfile.mkdtemp(prefix="palette-dashboard-"))
    data_dir.chmod(0o755)  # PostgreSQL runs as another user and must traverse it
    rng = random.Random(os.getpid())
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False,
                             metrics_port=_free_metrics_port(rng), **_free_port_block(rng))
    stack = embedded_stack(settings)
    try:
        stack.start_infra()
        stack.start_apps(PROCESSES)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def photo(seed: int) -> bytes:
    """A synthetic room (0.1 MP: the GPU worker may be on the CPU here), as a JPEG."""
    from PIL import Image

    from gpu_consumer.demo import synthetic_room

    arr = (synthetic_room(240, 400)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    arr = (arr.astype("int16") + random.Random(seed).randint(-10, 10)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def one_job(http: httpx.Client, seed: int) -> str:
    """A new user's job of one or two photos, uploaded, executed, polled until it ends: its status."""
    r = http.post("/auth/anon", json={"device_hash": f"dashboard-{seed}-{os.getpid()}"})
    r.raise_for_status()
    auth = {"Authorization": f"Bearer {r.json()['data']['token']}"}
    created = http.post("/jobs", json={"preset": "interior", "item_count": 1 + seed % 2}, headers=auth)
    created.raise_for_status()
    job = created.json()["data"]
    for slot in job["upload"]:
        httpx.put(slot["url"], content=photo(seed), headers={"Content-Type": slot["content_type"]}).raise_for_status()
    http.post(f"/jobs/{job['job_id']}/confirm-upload", headers=auth).raise_for_status()
    http.post(f"/jobs/{job['job_id']}/execute", json={"concepts": EDITS[seed % len(EDITS)]},
              headers=auth).raise_for_status()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = str(http.get(f"/jobs/{job['job_id']}", headers=auth).json()["data"]["status"])
        if status in ("done", "failed", "canceled"):
            return status
        time.sleep(0.5)  # a client polling its job, as the README's does
    return "unfinished"


def workload(url: str, until: float, clients: int) -> dict[str, int]:
    """``clients`` threads each running jobs one after another until ``until``; their outcomes."""
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    seeds = itertools.count()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < until:
                status = one_job(http, next(seeds))
                with lock:
                    outcomes[status] = outcomes.get(status, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=until - time.monotonic() + 150)
    return outcomes


# -- scraping ------------------------------------------------------------------------------
def scrape(port: int) -> Samples:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scraper(ports: list[int], stop: threading.Event, every_s: float = 1.0) -> list[tuple[float, Samples]]:
    """Every process's samples, merged, once per ``every_s`` until ``stop``; filled from a thread."""
    series: list[tuple[float, Samples]] = []
    t0 = time.monotonic()

    def run() -> None:
        while not stop.is_set():
            merged: Samples = {}
            for port in ports:
                merged.update(scrape(port))
            series.append((time.monotonic() - t0, merged))
            stop.wait(every_s)

    threading.Thread(target=run, daemon=True).start()
    return series


# -- the panels' queries, by hand --------------------------------------------------------------
Line = tuple[str, list[tuple[float, float]]]


def _summed(samples: Samples, name: str, by: str, where: Callable[[dict[str, str]], bool]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        found = dict(labels)
        if sample == name and where(found):
            key = found.get(by, "") if by else name
            out[key] = out.get(key, 0.0) + value
    return out


def _back(series: list[tuple[float, Samples]], i: int, window: float) -> int:
    j = i
    while j > 0 and series[i][0] - series[j - 1][0] <= window:
        j -= 1
    return j


def rate(series: list[tuple[float, Samples]], name: str, by: str = "",
         where: Callable[[dict[str, str]], bool] = lambda _: True) -> list[Line]:
    """``sum by (by) (rate(name[RATE_WINDOW_S]))``."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for i in range(1, len(series)):
        j = _back(series, i, RATE_WINDOW_S)
        (t1, now), (t0, then) = series[i], series[j]
        if t1 <= t0:
            continue
        before = _summed(then, name, by, where)
        for key, value in _summed(now, name, by, where).items():
            lines.setdefault(key, []).append((t1, max(0.0, value - before.get(key, 0.0)) / (t1 - t0)))
    return sorted(lines.items())


def gauge(series: list[tuple[float, Samples]], name: str, by: str) -> list[Line]:
    """``sum by (by) (name)``."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for t, samples in series:
        for key, value in _summed(samples, name, by, lambda _: True).items():
            lines.setdefault(key, []).append((t, value))
    return sorted(lines.items())


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's: linear within the bucket the rank falls in (None without observations)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


def quantile(series: list[tuple[float, Samples]], q: float, name: str, by: str = "") -> list[Line]:
    """``histogram_quantile(q, sum by (le, by) (rate(name_bucket[QUANTILE_WINDOW_S])))``."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for i in range(1, len(series)):
        j = _back(series, i, QUANTILE_WINDOW_S)
        grown: dict[str, dict[float, float]] = {}
        for (sample, labels), value in series[i][1].items():
            found = dict(labels)
            if sample != f"{name}_bucket":
                continue
            before = series[j][1].get((sample, labels), 0.0)
            per = grown.setdefault(found.get(by, "") if by else f"p{round(q * 100)}", {})
            le = float(found["le"])
            per[le] = per.get(le, 0.0) + max(0.0, value - before)
        for key, buckets in grown.items():
            found_q = histogram_quantile(q, buckets)
            if found_q is not None:
                lines.setdefault(key, []).append((series[i][0], found_q))
    return sorted(lines.items())


@dataclass(frozen=True)
class Panel:
    title: str
    lines: list[Line]
    unit: str = ""


def panels(series: list[tuple[float, Samples]]) -> list[Panel]:
    """The dashboard's main panels (docs/grafana/palette.json), same titles."""
    http = rate(series, "palette_http_requests_total", "route")
    busiest = sorted(http, key=lambda line: -sum(v for _, v in line[1]))[:5]
    return [
        Panel("HTTP requests/s by route (top 5)", busiest, "/s"),
        Panel("HTTP latency p50 / p99 (s)", quantile(series, 0.5, "palette_http_request_duration_seconds")
              + quantile(series, 0.99, "palette_http_request_duration_seconds"), "s"),
        Panel("Group commit: commands, batches, conflicts /s",
              rate(series, "palette_group_commit_total", "kind"), "/s"),
        Panel("Relay: events/s acknowledged", rate(series, "palette_relay_events_total", "result"), "/s"),
        Panel("Relay: commit -> ack p50 / p99 (s)", quantile(series, 0.5, "palette_relay_commit_to_ack_seconds")
              + quantile(series, 0.99, "palette_relay_commit_to_ack_seconds"), "s"),
        Panel("Read models: lag (events)", gauge(series, "palette_read_model_lag_events", "model")),
        Panel("Read models: lag (s)", gauge(series, "palette_read_model_lag_seconds", "model"), "s"),
        Panel("Consumer-group lag (messages)", gauge(series, "palette_consumer_group_lag", "group")),
        Panel("GPU items/s by outcome", rate(series, "palette_gpu_items_total", "outcome",
                                             lambda labels: labels.get("outcome") in ("done", "failed", "retried")),
              "/s"),
        Panel("GPU seconds per item by op (p50)", quantile(series, 0.5, "palette_gpu_item_seconds", "op"), "s"),
    ]


# -- drawing ---------------------------------------------------------------------------------
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _label(value: float) -> str:
    return f"{value:.3g}"


def nice_top(value: float) -> float:
    """The axis' top: 1, 2, 2.5 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(power * m for m in (1.0, 2.0, 2.5, 5.0, 10.0) if power * m >= value)


def draw(all_panels: list[Panel], seconds: float, caption: str, path: Path) -> None:
    """Two columns of line charts, Grafana's layout, on a light background; a small PNG."""
    from PIL import Image, ImageDraw

    w, h, pad, cols = 560, 250, 16, 2
    rows = math.ceil(len(all_panels) / cols)
    img = Image.new("RGB", (cols * w + pad, rows * h + pad + 28), "#f4f5f5")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), caption, fill="#222222")
    for n, panel in enumerate(all_panels):
        x0, y0 = pad + (n % cols) * w, 28 + pad + (n // cols) * h
        d.rectangle([x0, y0, x0 + w - pad, y0 + h - pad], fill="white", outline="#d0d3d6")
        d.text((x0 + 8, y0 + 6), panel.title, fill="#222222")
        left, top, right, bottom = x0 + 52, y0 + 26, x0 + w - pad - 150, y0 + h - pad - 22
        values = [v for _, points in panel.lines for _, v in points]
        top_value = nice_top(max(values, default=0.0))
        for k in range(5):
            y = bottom - (bottom - top) * k / 4
            d.line([left, y, right, y], fill="#eceeef")
            d.text((x0 + 6, y - 6), _label(top_value * k / 4), fill="#666666")
        for k in range(0, int(seconds) + 1, max(10, int(seconds) // 6 // 10 * 10)):
            x = left + (right - left) * k / seconds
            d.text((x - 6, bottom + 6), f"{k}s", fill="#666666")
        if not values:
            d.text((left + 10, (top + bottom) // 2), "no data", fill="#999999")
        for c, (name, points) in enumerate(panel.lines):
            colour = COLOURS[c % len(COLOURS)]
            xy = [(left + (right - left) * min(t, seconds) / seconds, bottom - (bottom - top) * v / top_value)
                  for t, v in points]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            elif xy:
                d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
            d.rectangle([right + 10, top + 14 * c + 3, right + 20, top + 14 * c + 9], fill=colour)
            d.text((right + 24, top + 14 * c), name[:24], fill="#333333")
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the workload runs")
    parser.add_argument("--clients", type=int, default=3, help="clients running jobs at once")
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    args = parser.parse_args(argv)
    say(f"starting the stack ({', '.join(PROCESSES)}) on free ports")
    with watched_stack() as stack:
        settings = stack.settings
        ports = [p for p in (port_of(settings, name) for name in PROCESSES) if p is not None]
        stop = threading.Event()
        series = scraper(ports, stop)
        say(f"workload: {args.clients} clients for {args.seconds:.0f} s; scraping {len(ports)} metrics ports")
        outcomes = workload(f"http://{settings.api_host}:{settings.api_port}", time.monotonic() + args.seconds,
                            args.clients)
        stop.set()
    seconds = series[-1][0] if series else args.seconds
    all_panels = panels(series)
    empty = [p.title for p in all_panels if not p.lines]
    caption = (f"Palette, {seconds:.0f} s of a real workload on the embedded stack ({args.clients} clients; jobs: "
               f"{', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}); scraped every 1 s; "
               f"rates over {RATE_WINDOW_S:.0f} s, quantiles over {QUANTILE_WINDOW_S:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(all_panels, seconds, caption, args.out)
    say(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB; jobs {outcomes}; panels without data: {empty or 'none'}")
    return 0 if not empty and outcomes.get("done") else 1


if __name__ == "__main__":
    sys.exit(main())
