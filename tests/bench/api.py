"""The HTTP API under load: the API process as `palette up` starts it against the same process
started with `palette serve api --naive` (the baseline), next to a bare FastAPI app under the same
uvicorn settings (the ceiling). With `wrk` installed the load comes from wrk (C, one thread; Lua
scripts in tests/bench/wrk for the sessions), so the figures measure the server; without it, from
Python client processes (which take a core of their own: the figures then measure them too)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from domain.contracts.callback import callback_body, sign_callback, signed_headers
from domain.contracts.keys import callback_key, input_key
from tests.bench.harness import HTTP_CLIENTS, Profile, Results, Stack, percentile, rss_mb, say, services_cpu_s
from tests.conftest import free_port

WRK_SCRIPTS = Path(__file__).parent / "wrk"
WRK_CONNECTIONS = 32  # one wrk thread, 32 connections (the load of the issue's measurements)
LATENCY_CONNECTIONS = 128  # for the paced run: enough that a slow answer rarely holds back the schedule
# Sessions written for a timed run, per second of it, before a rate is known (the run ends early,
# and its rate holds, if they run out); later runs get 1.5x what the last one used.
FIRST_SESSIONS_PER_S = 700

# A session: POST /auth/anon and POST /jobs (stage 1), then confirm-upload, execute, the
# worker's callback, GET /jobs/{id} and GET /me (stage 2). Commands are the POSTs.
STAGE_REQUESTS = (2, 5)
SESSION_COMMANDS = 5
LATENCY_CLIENTS = 256  # the most requests in flight during the open-loop latency run
LATENCY_LOAD = 0.7  # of the peak request rate
CORES = len(os.sched_getaffinity(0))  # what the CPU ceilings divide: the cores this machine lends us


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


def start_api(stack: Stack, naive: bool, workers: int | None = None) -> None:
    """The API process of the stack; the baseline is the same command with ``--naive``
    (`palette serve --naive api`: one load-decide-save per command, no cache). ``workers``
    overrides PALETTE_API_WORKERS for this start."""
    argv, settings = stack.app_argv, stack.settings
    stack.app_argv = [*argv, "--naive"] if naive else argv
    if workers is not None:
        stack.settings = settings.model_copy(update={"api_workers": workers})
    try:
        stack.start_apps(("api",))
    finally:
        stack.app_argv, stack.settings = argv, settings


def hello_app() -> Any:
    """The ceiling: a bare FastAPI app answering a small JSON document (uvicorn's factory)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


@contextmanager
def hello_server() -> Iterator[str]:
    """hello_app under uvicorn with the API's settings (``SERVER_OPTIONS``: its bounded httptools
    protocol, uvloop as installed, no access log, the same keep-alive), in a process of its own;
    its URL."""
    port = free_port()
    serve = ("import uvicorn; from adapters.api.http_limits import SERVER_OPTIONS; "
             f"uvicorn.run('tests.bench.api:hello_app', factory=True, host='127.0.0.1', port={port}, **SERVER_OPTIONS)")
    proc = subprocess.Popen([sys.executable, "-c", serve],
                            cwd=Path(__file__).parents[2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the hello app did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wrk(url: str, seconds: float, *options: str, script: str | None = None, script_args: tuple[str, ...] = (),
        connections: int = WRK_CONNECTIONS) -> str:
    """wrk's output: one thread, ``connections`` connections, ``seconds`` long (10 s timeout),
    with a script of tests/bench/wrk and its arguments."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", *options]
    if script is not None:
        argv += ["-s", str(WRK_SCRIPTS / script), url, "--", *script_args]
    else:
        argv.append(url)
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout


def wrk_rate(out: str) -> float:
    """Requests per second from wrk's report, refusing a run with error answers."""
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))


class SessionFiles:
    """Sessions for tests/bench/wrk/session.lua, made as a client would make them and written to
    a file: the user id of the device (keyed as the server keys it), a token for that user (as the
    server would issue it), a job id from an Idempotency-Key (as the server derives it), its input
    photo uploaded to S3, and the GPU worker's signed callback. All of it untimed."""

    def __init__(self, settings: Any, folder: Path) -> None:
        from adapters.tokens import TokenIssuer
        from application.device_keys import HmacDeviceKeyer
        from infra.s3 import s3_client

        self.settings = settings
        self.folder = folder
        self.keys = HmacDeviceKeyer(settings.device_key_secret)
        self.tokens = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_s)
        self.s3 = s3_client(settings, max_pool=32)
        self.made = 0

    def write(self, count: int) -> Path:
        from datetime import UTC, datetime

        from adapters.api.idempotency import id_for_key
        from domain.user import user_id_for_device_key

        now = datetime.now(UTC)
        lines, inputs = [], []
        for _ in range(count):
            self.made += 1
            device = f"wrk-{uuid.uuid4().hex}"
            user_id = user_id_for_device_key(self.keys.key(device))
            key = uuid.uuid4().hex
            job_id = id_for_key(user_id, "job", key)
            assert job_id is not None
            body = callback_body(0, "failed", callback_key(job_id, 0), error="bench")
            stamp, nonce = int(now.timestamp()), secrets.token_hex(8)
            signature = sign_callback(self.settings.callback_secret, stamp, str(job_id), body, nonce)
            lines.append("\t".join((device, str(user_id), self.tokens.issue(user_id, now), str(job_id), key,
                                     body.decode(), str(stamp), nonce, signature)))
            inputs.append(input_key(user_id, job_id, 0))
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: self.s3.put_object(Bucket=self.settings.s3_bucket, Key=k, Body=b"\xff\xd8bench",
                                                       ContentType="image/jpeg"), inputs))
        path = self.folder / f"sessions-{self.made}.tsv"
        path.write_text("\n".join(lines) + "\n")
        return path


def wrk_sessions(url: str, sessions: SessionFiles, seconds: float, count: int, rate: float | None = None,
                 connections: int = WRK_CONNECTIONS, stack: Stack | None = None) -> dict[str, Any]:
    """One run of the mixed workload (session.lua); its figures, with commands_per_s and requests_per_s
    (and, given the stack, ``cpu_ms``: its processes' CPU per request, by service)."""
    script_args = (str(sessions.write(count)),) + ((f"{rate:.1f}",) if rate is not None else ())
    before = services_cpu_s(stack) if stack is not None else {}
    out = wrk(url, seconds, script="session.lua", script_args=script_args, connections=connections)
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if figures["errors"]:
        raise RuntimeError(f"the sessions saw {figures['errors']} errors:\n{out}")
    figures["commands_per_s"] = figures["commands"] / figures["duration_s"]
    figures["requests_per_s"] = figures["requests"] / figures["duration_s"]
    if stack is not None:
        figures["cpu_ms"] = cpu_ms_each(before, services_cpu_s(stack), figures["requests"])
    return figures


def wrk_requests(out: str) -> int:
    """How many requests wrk's report says it sent."""
    return int(next(line.split()[0] for line in out.splitlines() if " requests in " in line))


def cpu_ms_each(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds of CPU each service used per request between two readings."""
    return {name: (after[name] - before[name]) * 1000 / requests for name in after if name in before}


def cpu_figures(results: Results, prefix: str, runs: list[dict[str, float]]) -> float:
    """``<prefix>_cpu_ms`` (the stack's CPU per request, median of the runs) and its split by
    service; returns the ceiling it sets: requests per second with every core on the stack."""
    by_service = {name: round(statistics.median(run[name] for run in runs), 3)
                  for name in runs[0] if all(name in run for run in runs)}
    total = statistics.median(sum(run.values()) for run in runs)
    results[f"{prefix}_cpu_ms"] = round(total, 3)
    results[f"{prefix}_cpu_by_process"] = by_service
    return CORES * 1000 / total


def _token(url: str) -> str:
    import httpx

    r = httpx.post(f"{url}/auth/anon", json={"device_hash": f"bench-{uuid.uuid4().hex}"}, timeout=30)
    r.raise_for_status()
    token: str = r.json()["data"]["token"]
    return token


def bench_http(stack: Stack, prof: Profile, results: Results) -> None:
    if shutil.which("wrk") is None:
        say("wrk is not installed (Debian: apt-get install wrk): the HTTP figures come from Python clients")
        bench_http_python(stack, prof, results)
        return
    bench_http_wrk(stack, prof, results)


def _median_rate(runs: list[str]) -> float:
    return round(statistics.median(wrk_rate(out) for out in runs), 1)


def bench_http_wrk(stack: Stack, prof: Profile, results: Results) -> None:
    """Every HTTP figure with wrk: the ceiling, GET /presets, GET /me, POST /auth/anon, the mixed
    sessions (group commit, then naive), and latency at 70 % of the mixed peak, paced."""
    settings = stack.settings
    url = f"http://{settings.api_host}:{settings.api_port}"
    seconds = prof.http_seconds
    rounds = range(prof.http_repeats)
    results["api_workers"] = settings.api_workers
    with hello_server() as hello:
        results["http_ceiling_per_s"] = _median_rate([wrk(hello, seconds) for _ in rounds])
    say(f"HTTP ceiling (bare FastAPI hello, same uvicorn settings): {results['http_ceiling_per_s']:,.0f} requests/s")
    with tempfile.TemporaryDirectory(prefix="palette-wrk-") as folder:
        sessions = SessionFiles(settings, Path(folder))
        for naive in (False, True):
            start_api(stack, naive)
            try:
                prefix = "naive_" if naive else ""
                if not naive:
                    auth = f"Authorization: Bearer {_token(url)}"
                    for key, path in (("presets_per_s", "/presets"), ("me_per_s", "/me")):
                        results[key] = _median_rate([wrk(url + path, seconds, "-H", auth) for _ in rounds])
                    registers, used = [], []
                    for i in rounds:
                        before = services_cpu_s(stack)
                        registers.append(wrk(url, seconds, script="register.lua", script_args=(f"bench{i}",)))
                        used.append(cpu_ms_each(before, services_cpu_s(stack), wrk_requests(registers[-1])))
                    results["register_per_s"] = _median_rate(registers)
                    results["register_cpu_ceiling_per_s"] = round(cpu_figures(results, "register", used), 1)
                    say(f"HTTP GET /presets {results['presets_per_s']:,.0f}/s, GET /me {results['me_per_s']:,.0f}/s, "
                        f"POST /auth/anon {results['register_per_s']:,.0f}/s (wrk, {WRK_CONNECTIONS} connections); "
                        f"a registration takes {results['register_cpu_ms']} ms of the stack's CPU: at most "
                        f"{results['register_cpu_ceiling_per_s']:,.0f}/s on {CORES} cores")
                count = round(FIRST_SESSIONS_PER_S * seconds)
                runs = []
                for _ in rounds:
                    runs.append(wrk_sessions(url, sessions, seconds, count, stack=None if naive else stack))
                    count = round(1.5 * runs[-1]["sessions"] * seconds / runs[-1]["duration_s"]) + WRK_CONNECTIONS
                results[f"{prefix}requests_per_s"] = round(statistics.median(r["requests_per_s"] for r in runs), 1)
                results[f"{prefix}commands_per_s"] = round(statistics.median(r["commands_per_s"] for r in runs), 1)
                if not naive:
                    ceiling = cpu_figures(results, "requests", [r["cpu_ms"] for r in runs])
                    results["commands_cpu_ceiling_per_s"] = round(ceiling * SESSION_COMMANDS / sum(STAGE_REQUESTS), 1)
                    say(f"a session request takes {results['requests_cpu_ms']} ms of the stack's CPU: at most "
                        f"{results['commands_cpu_ceiling_per_s']:,.0f} commands/s on {CORES} cores")
                say(f"HTTP sessions, {'naive (--naive)' if naive else 'group commit'}: "
                    f"{results[f'{prefix}requests_per_s']:,.0f} requests/s, "
                    f"{results[f'{prefix}commands_per_s']:,.0f} commands/s (wrk, median of {len(runs)})")
                if not naive:
                    rate = LATENCY_LOAD * results["requests_per_s"]
                    paced = wrk_sessions(url, sessions, seconds, round(1.5 * rate * seconds / 7) + LATENCY_CONNECTIONS,
                                         rate=rate, connections=LATENCY_CONNECTIONS)
                    results["api_p50_ms"] = round(paced["p50_ms"], 2)
                    results["api_p99_ms"] = round(paced["p99_ms"], 2)
                    results["api_latency_requests_per_s"] = round(paced["requests_per_s"], 1)
                    say(f"HTTP latency, sessions paced at {rate:,.0f} requests/s ({LATENCY_LOAD:.0%} of the peak; "
                        f"{paced['requests_per_s']:,.0f}/s achieved): p50 {results['api_p50_ms']} ms, "
                        f"p99 {results['api_p99_ms']} ms")
                    results.setdefault("peak_rss_mb", {})["api"] = rss_mb(stack.supervisor.pid("api"))
            finally:
                stack.supervisor.stop("api")


def bench_http_python(stack: Stack, prof: Profile, results: Results) -> None:
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
