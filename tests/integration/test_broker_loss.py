"""The broker is not the source of truth: SIGKILLed under a live workload and restarted empty
(its log in memory), it loses every message and every consumer group offset. The relay sees it,
publishes again from the oldest event a read model still needs, the dispatcher sends the tasks of
unfinished jobs again at once (not after ``PALETTE_DISPATCH_STALE_S``), and everything ends as if
nothing had happened: every executed job finishes, every item is recorded once, the read models
agree with the aggregates."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg

from adapters.settings import Settings
from application.services import PaletteService
from domain.job import JobStatus
from projections.log import events_table
from projections.models import READ_MODELS
from projections.rebuild import iter_envelopes
from projections.store import unapplied
from tests.chaos import read_model_problems

from .test_gpu_worker import photo, queued_job
from .test_stack import wait_until


def tail(settings: Settings, name: str, lines: int = 15) -> str:
    path = settings.data_dir / "logs" / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def losses(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM palette_relay.broker_losses").fetchone()
    return int(row[0]) if row else 0


def test_a_broker_restarted_empty_loses_nothing(gpu_apps: Any, service: PaletteService, settings: Settings) -> None:
    assert settings.broker_storage == "memory" and settings.dispatch_stale_s >= 600
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        before = losses(conn)
        gpu_apps.stop_app("gpu")  # the tasks of these jobs wait in the broker's log when it dies
        jobs = [queued_job(service, settings, [photo(i + j) for i in range(3)]) for j in range(4)]
        wait_until(lambda: losses(conn) == before and all(
            service.get_job(u, j).status == JobStatus.QUEUED for u, j in jobs), what="the jobs queued")
        gpu_apps.kill("broker")
        gpu_apps.supervisor.restart("broker")  # memory://: it comes back with nothing
        gpu_apps.start_app("gpu")
        jobs += [queued_job(service, settings, [photo(7)]) for _ in range(2)]

        def finished() -> bool:
            gpu_apps.supervisor.check()
            return all(service.get_job(u, j).status == JobStatus.DONE for u, j in jobs)

        try:
            wait_until(finished, timeout_s=240, what="every executed job to finish after the broker restart")
        except AssertionError as e:
            logs = {n: tail(settings, n) for n in ("relay", "dispatcher", "gpu", "projector")}
            raise AssertionError(f"{e}; {[(u, j, service.get_job(u, j).status) for u, j in jobs]}; {logs}") from None
        assert losses(conn) > before  # the relay saw the loss (rather than a lucky timing)

        table = events_table(service.app.recorder)
        wait_until(lambda: all(unapplied(conn, m, table)[0] == 0 for m in READ_MODELS.values()),
                   timeout_s=60, what="the read models to fold the whole log")
        log = list(iter_envelopes(service.app.recorder, service.app.mapper.transcoder, 1, None))
        assert read_model_problems(conn, log, service.app) == []
        for user_id, job_id in jobs:
            job = service.get_job(user_id, job_id)
            recorded = Counter(e.data["idx"] for e in log if e.stream_id == job_id and e.type == "ItemCompleted")
            assert recorded == Counter(range(job.item_count))  # each item once, however often it was sent
            user = service.app.repository.get(user_id)
            assert (user.spent, user.reserved) == (job.item_count, 0)
