"""The command path in process: ``PaletteService`` called from threads, group commit against
the direct executor (one load-decide-save per command, no cache)."""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from adapters.settings import Settings
from application.services import PaletteService
from application.unit_of_work import ConflictError
from domain.contracts.keys import callback_key
from tests.bench.harness import CORE_CLIENTS, Profile, Results, say, service_on

HOT_JOB_ITEMS = 200
HOT_CLIENTS = 32


def mixed_session(svc: PaletteService, rng: random.Random) -> int:
    """One user's session: register, create a job of 2 items, confirm, execute, then cancel
    (1 in 5) or report both items' results. Returns the commands run (5 or 6)."""
    user_id = svc.register(f"bench-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", 2).value
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, {"wall": {"action": "tone", "value": "warm"}})
    if rng.random() < 0.2:
        svc.cancel_job(user_id, job_id)
        return 5
    for idx in range(2):
        svc.record_item_result(job_id, idx, "done", callback_key(job_id, idx))
    return 6


def make_backlog(settings: Settings, commands: int) -> None:
    """About ``commands`` commands (mixed sessions, 32 threads) into the main event store. Each
    thread takes the next session number as it goes (no queue of them all: ``--audit-events N``
    sizes none), and a failure or an interrupt stops them after the sessions under way."""
    svc, close = service_on(settings, "public", naive=False)
    sessions = max(1, commands // 6)
    numbers = itertools.count()  # next() is atomic under the GIL
    stop = threading.Event()

    def sessions_of_a_thread() -> None:
        while not stop.is_set() and (i := next(numbers)) < sessions:
            mixed_session(svc, random.Random(i))

    try:
        with ThreadPoolExecutor(32) as pool:
            try:  # the stop armed before the threads start: an interrupt meanwhile stops the first too
                threads = [pool.submit(sessions_of_a_thread) for _ in range(32)]
                for thread in threads:
                    thread.result()
            finally:
                stop.set()
    finally:
        close()


def core_commands_per_s(svc: PaletteService, seconds: float, clients: int) -> float:
    """Commands per second of ``clients`` threads running mixed sessions for ``seconds``."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            counts[i] += mixed_session(svc, rng)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(counts) / (time.perf_counter() - t0)


def hot_stream_results_per_s(svc: PaletteService, clients: int) -> float:
    """Item results per second into one job of 200 items (one stream), from ``clients`` threads."""
    user_id = svc.register(f"hot-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", HOT_JOB_ITEMS).value
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, {"wall": {"action": "remove"}})

    def report(i: int) -> None:
        while True:  # a worker retries a 409 (the naive path conflicts on a hot stream)
            try:
                svc.record_item_result(job_id, i, "done", callback_key(job_id, i))
                return
            except ConflictError:
                continue

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(report, range(HOT_JOB_ITEMS)))
    elapsed = time.perf_counter() - t0
    assert svc.get_job(user_id, job_id).status == "done"
    return HOT_JOB_ITEMS / elapsed


def bench_core(settings: Settings, prof: Profile, results: Results) -> None:
    for naive in (False, True):
        svc, close = service_on(settings, "bench_core_naive" if naive else "bench_core", naive)
        try:
            mixed = [core_commands_per_s(svc, prof.core_seconds, CORE_CLIENTS) for _ in range(prof.repeats)]
            hot = [hot_stream_results_per_s(svc, HOT_CLIENTS) for _ in range(prof.hot_jobs)]
        finally:
            close()
        prefix = "naive_" if naive else ""
        results[f"{prefix}core_commands_per_s"] = round(statistics.median(mixed), 1)
        results[f"{prefix}hot_stream_results_per_s"] = round(statistics.median(hot), 1)
        say(f"in process, {'direct executor' if naive else 'group commit'}: {statistics.median(mixed):,.0f} "
            f"commands/s ({CORE_CLIENTS} threads); {statistics.median(hot):,.0f} item results/s into one "
            f"{HOT_JOB_ITEMS}-item job ({HOT_CLIENTS} threads)")
