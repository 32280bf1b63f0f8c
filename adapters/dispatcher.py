"""The dispatcher: on ``JobQueued``, one task per item to ``palette.gpu-jobs`` (key = job id).
At-least-once; the GPU worker's callback key makes duplicates harmless.

A broker that loses an acknowledged message (seen with the embedded broker under SIGKILL) would
leave a job queued forever, so the dispatcher also sweeps: a queued or running job without
progress for ``stale_s`` gets the tasks of its unfinished items again."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg

from adapters.envelope import decode
from adapters.kafka_io import GPU_TOPIC, ConsumerLoop
from application.keys import callback_key, input_key, mask_key, output_key, preview_key
from domain.job import Job
from domain.presets import PRESETS

log = logging.getLogger("palette.dispatcher")
GROUP = "palette-dispatcher"


def tasks_for(job: Job) -> list[dict[str, Any]]:
    """The GPU tasks of a queued job: everything the worker needs, no lookups."""
    user_id, job_id = job.user_id, UUID(str(job.id))
    concepts = list(PRESETS[job.preset].concepts)
    return [{
        "job_id": str(job_id), "user_id": str(user_id), "idx": idx, "preset": job.preset,
        "concepts": job.concepts, "protect": job.protect,
        "input_key": input_key(user_id, job_id, idx), "output_key": output_key(user_id, job_id, idx),
        "preview_key": preview_key(user_id, job_id, idx),
        "mask_keys": {c: mask_key(user_id, job_id, idx, c) for c in concepts},
        "idempotency_key": callback_key(job_id, idx), "attempt": 0,
    } for idx in range(job.item_count)]


class Dispatcher(ConsumerLoop):
    def __init__(self, consumer: Any, producer: Any, app: Any, database_url: str | None = None,
                 stale_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.producer = producer
        self.app = app
        self.repository = app.repository
        self.dispatched = 0
        self.stale_s = stale_s
        self.sweep_every_s = min(60.0, stale_s / 2)
        self.clock = clock
        self.conn = psycopg.connect(database_url, autocommit=True) if database_url else None
        self._next_sweep = clock() + self.sweep_every_s

    def sweep(self, limit: int = 100) -> int:
        """Dispatch again the unfinished items of jobs that made no progress for ``stale_s``."""
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT id FROM palette_read.jobs_log WHERE status IN ('queued', 'running') "
            "AND updated_at < now() - %s * interval '1 second' ORDER BY updated_at LIMIT %s",
            [self.stale_s, limit]).fetchall()
        futures = []
        for (job_id,) in rows:
            job = self.repository.get(job_id)
            if job.status.value not in ("queued", "running"):
                continue  # the read model lags the store: it finished meanwhile
            for task in tasks_for(job):
                if task["idx"] not in job.items:
                    futures.append(self._send(task))
        self._flush(futures)
        if futures:
            log.warning("dispatched %d task(s) of %d stalled job(s) again", len(futures), len(rows))
        return len(futures)

    def _send(self, task: dict[str, Any]) -> Any:
        return self.producer.send(GPU_TOPIC, key=task["job_id"].encode(), value=json.dumps(task).encode())

    def _flush(self, futures: list[Any]) -> None:
        if futures:
            self.producer.flush()
            for f in futures:
                f.get(timeout=30)

    def step(self, timeout_ms: int = 100) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        futures: list[Any] = []
        for records in polled.values():
            for record in records:
                env = decode(record.value)
                if env.type != "JobQueued":
                    continue
                job = self.repository.get(env.stream_id, version=env.version)
                futures.extend(self._send(task) for task in tasks_for(job))
        self._flush(futures)
        self.dispatched += len(futures)
        if polled:
            self.consumer.commit()
        if self.conn is not None and self.clock() >= self._next_sweep:
            self._next_sweep = self.clock() + self.sweep_every_s
            self.sweep()
        return len(futures)

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
        if self.conn is not None:
            self.conn.close()
        self.app.close()
