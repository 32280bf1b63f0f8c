"""The HTTP API under load from client processes: the API process as `palette up` starts it
against the same process started with `palette serve api --naive` (the baseline)."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from domain.contracts.callback import callback_body, signed_headers
from domain.contracts.keys import callback_key
from tests.bench.harness import HTTP_CLIENTS, Profile, Results, Stack, percentile, rss_mb, say

# A session: POST /auth/anon and POST /jobs (stage 1), then confirm-upload, execute, the
# worker's callback, GET /jobs/{id} and GET /me (stage 2). Commands are the POSTs.
STAGE_REQUESTS = (2, 5)
SESSION_COMMANDS = 5
LATENCY_CLIENTS = 256  # the most requests in flight during the open-loop latency run
LATENCY_LOAD = 0.7  # of the peak request rate


class _Calls:
    """Timed API calls of one load-generating process."""

    def __init__(self, client: Any, secret: str) -> None:
        self.client = client
        self.secret = secret
        self.latencies: list[float] = []
        self.requests = 0
        self.commands = 0

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        r = await self.client.request(method, path, **kw)
        self.latencies.append((time.perf_counter() - t0) * 1000)
        self.requests += 1
        self.commands += method != "GET"
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r.json()["data"]

    async def open(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Stage 1: a new user and a job of one photo."""
        token = (await self.call("POST", "/auth/anon", json={"device_hash": f"http-{uuid.uuid4().hex}"}))["token"]
        auth = {"Authorization": f"Bearer {token}"}
        return auth, await self.call("POST", "/jobs", json={"preset": "interior", "item_count": 1}, headers=auth)

    async def finish(self, auth: dict[str, str], job: dict[str, Any]) -> None:
        """Stage 2: confirm, execute, the worker's result (signed as the worker signs it), reads."""
        job_id = job["job_id"]
        await self.call("POST", f"/jobs/{job_id}/confirm-upload", headers=auth)
        await self.call("POST", f"/jobs/{job_id}/execute",
                        json={"concepts": {"wall": {"action": "tone", "value": "warm"}}}, headers=auth)
        raw = callback_body(0, "failed", callback_key(uuid.UUID(job_id), 0), error="bench")
        headers = signed_headers(self.secret, int(time.time()), job_id, raw, secrets.token_hex(8))
        await self.call("POST", f"/jobs/{job_id}/callback", content=raw, headers=headers)
        await self.call("GET", f"/jobs/{job_id}", headers=auth)
        await self.call("GET", "/me", headers=auth)


async def _staged(items: list[Any], run: Callable[[Any], Awaitable[Any]], concurrency: int,
                  sessions_per_s: float | None) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int, item: Any) -> Any:
        if sessions_per_s is not None:  # open loop: start on schedule whatever the latency
            await asyncio.sleep(max(0.0, t0 + i / sessions_per_s - time.perf_counter()))
        async with sem:
            return await run(item)

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


async def _http_load(base_url: str, secret: str, sessions: int, concurrency: int,
                     requests_per_s: float | None) -> tuple[int, int, float, list[float]]:
    """Returns (API requests, commands, seconds spent in API stages, latencies). The client's
    uploads to S3 happen between the stages, untimed: they load SeaweedFS, not the API. With a
    request rate, each stage starts its sessions so that its requests arrive at that rate."""
    import httpx

    def rate(stage: int) -> float | None:
        return None if requests_per_s is None else requests_per_s / STAGE_REQUESTS[stage]

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        calls = _Calls(client, secret)
        t0 = time.perf_counter()
        opened = await _staged([None] * sessions, lambda _: calls.open(), concurrency, rate(0))
        api_s = time.perf_counter() - t0

        async def upload(opened_job: Any) -> None:
            for slot in opened_job[1]["upload"]:
                r = await client.put(slot["url"], content=b"\xff\xd8bench", headers={"Content-Type": "image/jpeg"})
                r.raise_for_status()

        await _staged(opened, upload, 16, None)
        t0 = time.perf_counter()
        await _staged(opened, lambda o: calls.finish(*o), concurrency, rate(1))
        api_s += time.perf_counter() - t0
        return calls.requests, calls.commands, api_s, calls.latencies


def _http_process(args: tuple[str, str, int, int, float | None]) -> tuple[int, int, float, list[float]]:
    return asyncio.run(_http_load(*args))


def http_run(base_url: str, secret: str, sessions: int, concurrency: int, requests_per_s: float | None = None,
             processes: int = 2) -> tuple[float, float, list[float]]:
    """Load from several client processes (one Python client cannot saturate the API); returns
    (requests per second of API time, commands per second of API time, latencies in ms)."""
    import multiprocessing

    share = (base_url, secret, sessions // processes, max(1, concurrency // processes),
             None if requests_per_s is None else requests_per_s / processes)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_http_process, [share] * processes)
    latencies = [x for *_, lat in parts for x in lat]
    return sum(n / s for n, _, s, _ in parts), sum(c / s for _, c, s, _ in parts), latencies


def start_api(stack: Stack, naive: bool) -> None:
    """The API process of the stack; the baseline is the same command with ``--naive``
    (`palette serve --naive api`: one load-decide-save per command, no cache)."""
    argv = stack.app_argv
    stack.app_argv = [*argv, "--naive"] if naive else argv
    try:
        stack.start_apps(("api",))
    finally:
        stack.app_argv = argv


def bench_http(stack: Stack, prof: Profile, results: Results) -> None:
    settings = stack.settings
    url = f"http://{settings.api_host}:{settings.api_port}"
    for naive in (True, False):
        start_api(stack, naive)
        try:
            runs = [http_run(url, settings.callback_secret, prof.http_sessions, HTTP_CLIENTS)
                    for _ in range(prof.repeats)]
            prefix, path = ("naive_", "naive (--naive)") if naive else ("", "group commit")
            peak = statistics.median(r[0] for r in runs)
            results[f"{prefix}requests_per_s"] = round(peak, 1)
            results[f"{prefix}commands_per_s"] = round(statistics.median(r[1] for r in runs), 1)
            say(f"HTTP API, {path}: {peak:,.0f} requests/s, {results[f'{prefix}commands_per_s']:,.0f} commands/s "
                f"({HTTP_CLIENTS} users, median of {len(runs)})")
            if not naive:
                _, _, latencies = http_run(url, settings.callback_secret, prof.http_sessions, LATENCY_CLIENTS,
                                           LATENCY_LOAD * peak)
                results["api_p99_ms"] = round(percentile(latencies, 99), 2)
                results["api_p50_ms"] = round(percentile(latencies, 50), 2)
                say(f"HTTP request latency offered {LATENCY_LOAD:.0%} of the peak request rate: "
                    f"p50 {results['api_p50_ms']} ms, p99 {results['api_p99_ms']} ms")
                results.setdefault("peak_rss_mb", {})["api"] = rss_mb(stack.supervisor.pid("api"))
        finally:
            stack.supervisor.stop("api")
