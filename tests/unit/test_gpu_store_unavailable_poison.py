"""An item whose own object fails with an ``unreachable``-class error every time (botocore
ConnectionClosedError: the store, or a proxy in front of it, resets the connection for that one key
or that one upload) must not stop the worker for ever: were it waited out as a store away, the poll
would come again and again, nothing committed, every task behind it (other users' too) waiting. The
store is away only while its bucket's HEAD fails too."""

from __future__ import annotations

import json
from typing import Any

import torch
from botocore.exceptions import ConnectionClosedError

from adapters.bootstrap import S3_UNREACHABLE
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.worker import GpuWorker
from tests.unit.broker_fakes import FakeLog
from tests.unit.test_gpu_worker_hardening import (
    BUCKET,
    FakeCallbacks,
    FakeProducer,
    FakeS3,
    StoreAway,
    photo,
    task,
)


class OneKeyResets(FakeS3):
    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key == self.poison:
            raise ConnectionClosedError(endpoint_url="http://127.0.0.1:8333/" + Key)
        return super().get_object(Bucket, Key)


def test_one_item_whose_object_always_resets_does_not_stall_the_worker_for_ever() -> None:
    tasks = [task() for _ in range(3)]
    s3 = OneKeyResets(tasks[0]["input_key"])
    log = FakeLog()
    for t in tasks:
        s3.objects[t["input_key"]] = photo()
        log.append(json.dumps(t).encode(), t["job_id"].encode())
    producer, callbacks = FakeProducer(), FakeCallbacks()
    w = GpuWorker(log, producer, ImagePipeline(s3, BUCKET, torch.device("cpu")), callbacks, io_threads=2,
                  backoff_s=0.0, unavailable_pause_s=0.0, max_records=2, unreachable=S3_UNREACHABLE)
    try:
        for _ in range(12):
            w.step()
    finally:
        w.close()
    reported = {k for k, _, _ in callbacks.reports}
    # the poison item ends (failed, parked) and the worker moves past it: the third task is done
    assert tasks[0]["idempotency_key"] in reported, "the poison item is never failed"
    assert tasks[2]["idempotency_key"] in reported, "the task behind the poll is never reached"
    assert log.commits, "nothing is ever committed"


def test_a_poll_that_comes_again_after_an_outage_does_not_edit_or_report_its_finished_items_again() -> None:
    a, b = task(), task()
    s3 = StoreAway(keys={b["input_key"]})
    log = FakeLog()
    for t in (a, b):
        s3.objects[t["input_key"]] = photo()
        log.append(json.dumps(t).encode(), t["job_id"].encode())
    producer, callbacks = FakeProducer(), FakeCallbacks()
    w = GpuWorker(log, producer, ImagePipeline(s3, BUCKET, torch.device("cpu")), callbacks, io_threads=2,
                  backoff_s=0.0, unavailable_pause_s=0.0, unreachable=S3_UNREACHABLE)
    try:
        w.step()
        assert [k for k, _, _ in callbacks.reports] == [a["idempotency_key"]] and log.commits == []
        s3.down = False
        w.step()
    finally:
        w.close()
    assert sorted(k for k, _, _ in callbacks.reports) == sorted([a["idempotency_key"], b["idempotency_key"]])
    assert w.stats["skipped"] == 1 and log.commits == [2] and producer.parked() == []
