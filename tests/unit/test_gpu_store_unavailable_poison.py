"""An item whose own object fails with an ``unreachable``-class error every time (botocore
ConnectionClosedError: the store, or a proxy in front of it, resets the connection for that one key
or that one upload) must not stop the worker for ever: were it waited out as a store away, the poll
would come again and again, nothing committed, every task behind it (other users' too) waiting. The
store is away only while its bucket's HEAD fails too."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ConnectionClosedError

from tests.unit.test_gpu_worker_hardening import FakeS3, StoreAway, task, worker_over_log


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
    w, log, _, callbacks = worker_over_log(s3, tasks, max_records=2)
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
    w, log, producer, callbacks = worker_over_log(s3, [a, b])
    try:
        w.step()
        assert [k for k, _, _ in callbacks.reports] == [a["idempotency_key"]] and log.commits == []
        s3.down = False
        w.step()
    finally:
        w.close()
    assert sorted(k for k, _, _ in callbacks.reports) == sorted([a["idempotency_key"], b["idempotency_key"]])
    assert w.stats["skipped"] == 1 and log.commits == [2] and producer.parked() == []
