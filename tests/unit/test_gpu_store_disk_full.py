"""An object store whose disk is full answers every PUT 500 ``InternalError`` (SeaweedFS: "No
writable volumes"), while its bucket's HEAD still answers. The items in flight must wait for it
(nothing committed, the poll again after a pause) and finish once it writes again, not be failed
and refunded after three quick attempts (found filling the data directory's disk under a live
stack: every job executed during the minute it was full ended ``failed``). An item whose own
upload alone is refused with a 5xx, the store writing otherwise, is still failed as before."""

from __future__ import annotations

from botocore.exceptions import ClientError

from gpu_consumer.worker import PROBE_KEY
from tests.unit.test_gpu_worker_hardening import FakeS3, task, worker_over_log


def internal_error() -> ClientError:
    return ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"},
                        "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")


class DiskFull(FakeS3):
    """Every PUT refused with a 500 while ``full``, or only those under ``prefix``."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.full = True
        self.prefix = prefix

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        if self.full and Key.startswith(self.prefix):
            raise internal_error()
        super().put_object(Bucket, Key, Body, ContentType)

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.objects.pop(Key, None)


def test_items_wait_out_a_store_that_refuses_every_write_and_finish_once_it_writes() -> None:
    a = task()
    s3 = DiskFull()
    w, log, producer, callbacks = worker_over_log(s3, [a])
    try:
        w.step()
        assert callbacks.reports == [], "an item was reported while the store could not write"
        assert producer.parked() == [] and log.commits == []
        s3.full = False
        w.step()
    finally:
        w.close()
    assert [(k, status) for k, status, _ in callbacks.reports] == [(a["idempotency_key"], "done")]
    assert log.commits == [1] and producer.parked() == []
    assert PROBE_KEY not in s3.objects


def test_an_item_whose_own_upload_alone_is_refused_with_a_5xx_is_still_failed() -> None:
    a = task()
    s3 = DiskFull(prefix=a["output_key"])
    w, log, producer, callbacks = worker_over_log(s3, [a])
    try:
        w.step()
    finally:
        w.close()
    assert [(k, status) for k, status, _ in callbacks.reports] == [(a["idempotency_key"], "failed")]
    assert len(producer.parked()) == 1 and log.commits == [1]
