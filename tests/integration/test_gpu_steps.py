"""The GPU worker's steps with a spent budget, on the real broker, S3 and API: a second user's job
sent behind a first user's several items goes before the rest of them, each item is edited once
and reported through the API, and the group's committed offset never passes an item not done."""

from __future__ import annotations

import json
import uuid

import torch
from kafka import TopicPartition

from adapters import kafka_io
from adapters.dispatcher import tasks_for
from adapters.settings import Settings
from application.services import PaletteService
from gpu_consumer.callbacks import CallbackClient
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.worker import WINDOW, GpuWorker
from infra.kafka_admin import ensure_topics
from infra.s3 import s3_client

from .test_gpu_worker import photo, queued_job, terminal
from .test_stack import wait_until


def test_another_users_job_goes_before_the_rest_of_a_heavy_job(apps, service: PaletteService, settings: Settings):
    topic, group = f"gpu-steps-{uuid.uuid4().hex[:8]}", f"gpu-steps-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.effective_kafka_bootstrap, [topic], 1)
    producer = kafka_io.producer(settings)

    def send(job_id: uuid.UUID) -> None:  # as the dispatcher does, to this test's own queue
        for task in tasks_for(service.app.repository.get(job_id)):
            producer.send(topic, key=task["job_id"].encode(), value=json.dumps(task).encode())
        producer.flush()

    member = kafka_io.consumer(settings, group, topic, max_poll_records=WINDOW, fetch_max_wait_ms=200)
    worker = GpuWorker(member, kafka_io.producer(settings), ImagePipeline(s3_client(settings), settings.s3_bucket,
                                                                           torch.device("cpu")),
                       CallbackClient(settings.api_url, settings.callback_secret), compute_threads=1,
                       max_records=WINDOW, step_s=0.0)  # each step begins one item, the rest wait
    edited: list[tuple[str, int]] = []
    worker.observe_item = lambda task, seconds: edited.append((task.job_id, task.idx))

    def committed() -> int | None:
        return member.committed(TopicPartition(topic, 0))

    def step_until(done: int) -> bool:
        worker.step()
        return len(edited) >= done

    try:
        _, heavy = queued_job(service, settings, [photo(i) for i in range(4)])
        send(heavy)
        # The first poll joins the group, which the embedded broker grants after 5 s to over a
        # minute (as in test_stack); the join's time is not what this test is about.
        wait_until(lambda: step_until(1), timeout_s=180, what="the first item")
        assert committed() == 1  # the other three wait, not committed past
        _, light = queued_job(service, settings, [photo(9)])
        send(light)
        wait_until(lambda: step_until(2), what="the second item")
        assert committed() == 1  # the light job's item is done, the heavy job's second is not
        wait_until(lambda: step_until(5) and terminal(service, heavy) is not None, what="every item")
        assert committed() == 5
    finally:
        worker.close()
        producer.close()
    first, second = str(heavy), str(light)
    assert edited == [(first, 0), (second, 0), (first, 1), (first, 2), (first, 3)]  # each once; the light job second
    for job_id in (heavy, light):
        job = terminal(service, job_id)
        assert job is not None and job.status.value == "done"
    assert worker.stats["done"] == 5 and worker.stats["skipped"] >= 1  # the light item came again, dropped
