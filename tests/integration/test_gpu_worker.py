"""The GPU worker end to end on the embedded stack: real JPEGs in, PNG + preview out, results
reported once, duplicates dropped, a poisoned item failed at once and parked on the DLQ, and the
job still terminating with its refund."""

from __future__ import annotations

import io
import json
import uuid
from collections import Counter

import pytest
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from adapters.dispatcher import tasks_for
from adapters.settings import Settings
from adapters.system import SystemClock
from application.services import PaletteService
from domain.contracts.keys import input_key
from domain.job import Job, JobStatus
from infra.s3 import s3_client

from .test_stack import wait_until

EDITS = {"wall": {"action": "recolor", "value": "#2255cc"}, "floor": {"action": "texture", "value": "wood"}}


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A room photo (JPEG), a little lighter or darker by seed."""
    from gpu_consumer.demo import synthetic_room

    room = synthetic_room(size[1], size[0])[0].permute(1, 2, 0) * (0.9 + 0.02 * (seed % 10))
    buf = io.BytesIO()
    Image.fromarray((room.clamp(0, 1) * 255).round().byte().numpy()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def queued_job(service: PaletteService, settings: Settings, uploads: list[bytes],  # type: ignore[no-untyped-def]
               edits=EDITS) -> tuple[uuid.UUID, uuid.UUID]:
    user_id = service.register(f"gpu-{uuid.uuid4()}", plan="pro").value[0]
    job_id = service.create_job(user_id, "interior", len(uploads)).value
    s3 = s3_client(settings)
    for idx, data in enumerate(uploads):
        s3.put_object(Bucket=settings.s3_bucket, Key=input_key(user_id, job_id, idx), Body=data)
    service.confirm_upload(user_id, job_id)
    service.execute_job(user_id, job_id, edits, ["sofa"])
    return user_id, job_id


def terminal(service: PaletteService, job_id: uuid.UUID) -> Job | None:
    job: Job = service.app.repository.get(job_id)
    return job if job.status.terminal else None


def test_a_job_of_real_jpegs_is_edited_and_finishes_done(gpu_apps, service, settings):
    user_id, job_id = queued_job(service, settings, [photo(i) for i in range(3)])
    job = wait_until(lambda: terminal(service, job_id), timeout_s=120, what="the GPU worker to finish the job")
    assert job.status == JobStatus.DONE and job.done_items == 3
    s3 = s3_client(settings)
    for idx, result in job.items.items():
        out = Image.open(io.BytesIO(s3.get_object(Bucket=settings.s3_bucket, Key=result.output_key)["Body"].read()))
        assert out.format == "PNG" and out.size == (320, 240)
        preview_bytes = s3.get_object(Bucket=settings.s3_bucket, Key=result.preview_key)["Body"].read()
        preview = Image.open(io.BytesIO(preview_bytes))
        assert preview.format == "JPEG" and max(preview.size) == 320
        assert result.output_key == f"outputs/{user_id}/{job_id}/{idx}_result.png"
    assert service.get_user(user_id).spent == 3

    # A redelivered task (at-least-once) is dropped by the worker, or at worst recorded once.
    producer = KafkaProducer(bootstrap_servers=settings.effective_kafka_bootstrap, acks="all")
    for task in tasks_for(job)[:2]:
        producer.send("palette.gpu-jobs", key=task["job_id"].encode(), value=json.dumps(task).encode())
    producer.flush()
    producer.close()
    marker = _probe_job(service, settings)  # tasks after the duplicates: once it is done, they were handled
    wait_until(lambda: terminal(service, marker), timeout_s=120, what="the probe job")
    completed = Counter(e.idx for e in service.app.events.get(job_id) if isinstance(e, Job.ItemCompleted))
    assert completed == {0: 1, 1: 1, 2: 1}


def _probe_job(service: PaletteService, settings: Settings) -> uuid.UUID:
    return queued_job(service, settings, [photo(9)])[1]


def test_a_corrupt_upload_fails_its_item_and_the_job_refunds(gpu_apps, service, settings):
    user_id, job_id = queued_job(service, settings, [photo(1), b"definitely not a jpeg"])
    job = wait_until(lambda: terminal(service, job_id), timeout_s=120, what="the job to terminate")
    assert job.status == JobStatus.DONE
    assert job.items[1].status == "failed" and "not a readable image" in job.items[1].error
    view = service.get_user(user_id)
    assert (view.spent, view.reserved, view.credits) == (1, 0, 999)


@pytest.mark.parametrize("edit", [{"action": "recolor", "value": "#5b7f95\n"}, {"action": "melt", "value": ""}],
                         ids=["colour-with-newline", "unknown-action"])
def test_a_poisoned_item_fails_at_once_lands_in_the_dlq_and_the_job_still_terminates(gpu_apps, service, settings,
                                                                                     edit):
    user_id = service.register(f"gpu-{uuid.uuid4()}", plan="pro").value[0]
    job_id = service.create_job(user_id, "interior", 1).value
    s3_client(settings).put_object(Bucket=settings.s3_bucket, Key=input_key(user_id, job_id, 0), Body=photo(2))
    service.confirm_upload(user_id, job_id)

    def poison(uow):  # type: ignore[no-untyped-def]
        # Bypasses the service's validation: an edit the worker cannot apply, as an old client's might be.
        uow.get(Job, job_id).execute({"wall": edit}, [], None, SystemClock().now())

    service.executor.execute(poison)
    job = wait_until(lambda: terminal(service, job_id), timeout_s=120, what="the poisoned job to terminate")
    assert job.status == JobStatus.FAILED
    assert job.items[0].error.startswith("bad input: ValueError")  # not retried: bad input, not a fault
    assert "attempts" not in job.items[0].error
    assert service.get_user(user_id).credits == 1000  # fully refunded

    consumer = KafkaConsumer("palette.gpu-jobs.dlq", bootstrap_servers=settings.effective_kafka_bootstrap,
                             auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
    key = f"{job_id}:0"
    seen: list[dict] = []

    def parked() -> bool:
        for records in consumer.poll(500).values():
            seen.extend(json.loads(r.value) for r in records)
        return any(t.get("idempotency_key") == key for t in seen)

    wait_until(parked, timeout_s=30, what="the DLQ message")
    consumer.close()
