"""The dispatcher: on ``JobQueued``, one task per item to ``palette.gpu-jobs`` (key = job id).
At-least-once; the GPU worker's callback key makes duplicates harmless."""

from __future__ import annotations

import json
import logging
from typing import Any
from uuid import UUID

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
    def __init__(self, consumer: Any, producer: Any, app: Any) -> None:
        self.consumer = consumer
        self.producer = producer
        self.app = app
        self.repository = app.repository
        self.dispatched = 0

    def step(self, timeout_ms: int = 100) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        futures = []
        for records in polled.values():
            for record in records:
                env = decode(record.value)
                if env.type != "JobQueued":
                    continue
                job = self.repository.get(env.stream_id, version=env.version)
                for task in tasks_for(job):
                    futures.append(self.producer.send(
                        GPU_TOPIC, key=task["job_id"].encode(), value=json.dumps(task).encode()))
        if futures:
            self.producer.flush()
            for f in futures:
                f.get(timeout=30)
            self.dispatched += len(futures)
        if polled:
            self.consumer.commit()
        return len(futures)

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
        self.app.close()
