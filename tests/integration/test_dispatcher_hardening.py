"""The dispatcher on the embedded broker: the stale sweep reads the GPU group's committed offsets
and leaves tasks that wait in the queue alone; a record it cannot handle lands on its DLQ topic."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from adapters import kafka_io
from adapters.bootstrap import build_dispatcher, event_store_env
from adapters.dispatcher import DLQ_TOPIC, Dispatcher, KafkaTaskQueue, tasks_for
from application.services import PaletteApplication, PaletteService
from domain.contracts import topics
from projections.models.jobs_log import JOBS_LOG
from tests.put_back import rows_refolded

from .test_stack import wait_until

EDITS = {"floor": {"action": "texture", "value": "wood"}}


class OnePoll:
    """A consumer that hands out the given records once (the dispatcher's input, without a group)."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records
        self.commits = 0

    def poll(self, timeout_ms: int = 0) -> dict[Any, list[Any]]:
        records, self.records = self.records, []
        return {("palette.events", 0): records} if records else {}

    def commit(self) -> None:
        self.commits += 1

    def close(self) -> None:
        pass


def running_job(service: PaletteService, conn: psycopg.Connection[Any]) -> uuid.UUID:
    """A queued 3-item job whose item 1 is done, once jobs_log shows it running."""
    user_id = service.register(f"running-{uuid.uuid4()}", plan="pro").value[0]
    job_id: uuid.UUID = service.create_job(user_id, "interior", 3).value
    service.confirm_upload(user_id, job_id)
    service.execute_job(user_id, job_id, EDITS)
    service.record_item_result(job_id, 1, "done", f"{job_id}:1")
    wait_until(lambda: conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s",
                                    [job_id]).fetchone() == ("running",), timeout_s=30, what="the job's row")
    return job_id


def test_the_stale_sweep_resends_only_tasks_the_gpu_group_consumed_past(apps, service, conn, settings):
    """A stand-in GPU group that has consumed nothing: the job's tasks wait in the queue, so the
    sweep sends nothing however stale the job looks. Once the group commits past them without the
    job progressing, the unfinished items go out again, and then wait in their turn."""
    job_id = running_job(service, conn)
    bootstrap = settings.effective_kafka_bootstrap
    group = f"gpu-stand-in-{uuid.uuid4().hex[:8]}"  # the real palette-gpu group belongs to other tests
    queue = KafkaTaskQueue.connect(bootstrap, group=group)
    dispatcher = Dispatcher(OnePoll([]), kafka_io.producer(settings), PaletteApplication(env=event_store_env(settings)),
                            settings.effective_database_url, stale_s=0.001, queue=queue)
    group_consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        sent: list[dict[str, Any]] = []
        real = dispatcher._send
        dispatcher._send = lambda task: (sent.append(task), real(task))[1]  # type: ignore[method-assign]

        def mine() -> list[int]:
            return sorted(t["idx"] for t in sent if t["job_id"] == str(job_id))

        assert dispatcher.dispatch(tasks_for(service.app.repository.get(job_id))) == 3
        placed = dispatcher.placements.get(str(job_id))
        assert placed is not None
        # The broker's end offset may lag (the embedded one answers stale, low values); the log
        # still holds the task, and an offset far past the end is not held.
        assert queue.reaches(placed.partition, placed.offset)
        assert not queue.reaches(placed.partition, placed.offset + 1_000_000)

        sent.clear()
        dispatcher.sweep(limit=10_000)
        assert mine() == []  # waiting in the queue: nobody consumed it

        tp = TopicPartition(topics.GPU_TASKS, placed.partition)
        group_consumer.assign([tp])
        group_consumer.commit({tp: OffsetAndMetadata(placed.offset + 1, None, -1)})
        assert queue.committed([placed.partition]) == {placed.partition: placed.offset + 1}
        dispatcher.sweep(limit=10_000)
        assert mine() == [0, 2]  # consumed, no progress: only the unfinished items again

        sent.clear()
        dispatcher.sweep(limit=10_000)
        assert mine() == []  # the tasks sent again wait behind the group's position in their turn
    finally:
        group_consumer.close()
        dispatcher.close()


def test_a_record_the_dispatcher_cannot_handle_lands_on_its_dlq_topic(apps, settings):
    garbage = f"not an envelope {uuid.uuid4()}".encode()
    dispatcher = build_dispatcher(settings)
    dispatcher.consumer.close()
    dispatcher.consumer = OnePoll([type("R", (), {"topic": "palette.events", "partition": 0, "offset": 42,
                                                  "key": b"k", "value": garbage})()])
    try:
        assert dispatcher.step() == 0 and dispatcher.parked == 1 and dispatcher.consumer.commits == 1
    finally:
        dispatcher.close()
    reader = KafkaConsumer(DLQ_TOPIC, bootstrap_servers=settings.effective_kafka_bootstrap,
                           auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
    seen: list[Any] = []

    def parked() -> bool:
        for records in reader.poll(500).values():
            seen.extend(records)
        return any(r.value == garbage for r in seen)

    try:
        wait_until(parked, timeout_s=30, what="the parked record")
    finally:
        reader.close()
    record = next(r for r in seen if r.value == garbage)
    headers = dict(record.headers)
    assert headers["offset"] == b"42" and b"EnvelopeInvalid" in headers["error"]


def test_after_a_broker_loss_a_job_held_behind_a_dead_letter_is_sent_again(apps, service, conn, settings):
    """jobs_log cannot say a held job is unfinished (its row stopped at the dead letter); the
    job's aggregate does, so its unfinished items go out again after a loss all the same."""
    job_id = running_job(service, conn)
    dispatcher = Dispatcher(OnePoll([]), kafka_io.producer(settings), PaletteApplication(env=event_store_env(settings)),
                            settings.effective_database_url, stale_s=3600)
    sent: list[dict[str, Any]] = []
    real = dispatcher._send
    dispatcher._send = lambda task: (sent.append(task), real(task))[1]  # type: ignore[method-assign]
    with contextlib.closing(dispatcher), rows_refolded(conn, service.app, JOBS_LOG, [job_id]):
        conn.execute("UPDATE palette_read.jobs_log SET status = 'uploaded' WHERE id = %s", [job_id])  # where it stopped
        conn.execute("INSERT INTO palette_read.dead_letters (model, stream_id, version, position, envelope, error, "
                     "status) VALUES ('jobs_log', %s, 3, 0, '\\x7b7d', 'test', 'parked')", [job_id])
        try:
            dispatcher.after_loss()
            assert sorted(t["idx"] for t in sent if t["job_id"] == str(job_id)) == [0, 2]
        finally:
            conn.execute("DELETE FROM palette_read.dead_letters WHERE stream_id = %s AND error = 'test'", [job_id])


def test_after_a_broker_loss_every_page_of_unfinished_jobs_is_sent_again(apps, service, conn, settings):
    """The unfinished jobs are read a page at a time: those past the first page go out again
    at once too, not only once the stale sweep finds them."""
    jobs = [running_job(service, conn) for _ in range(3)]
    dispatcher = Dispatcher(OnePoll([]), kafka_io.producer(settings), PaletteApplication(env=event_store_env(settings)),
                            settings.effective_database_url, stale_s=3600)
    sent: list[dict[str, Any]] = []
    real = dispatcher._send
    dispatcher._send = lambda task: (sent.append(task), real(task))[1]  # type: ignore[method-assign]
    with contextlib.closing(dispatcher):
        dispatcher.queue_lost("lost", page=1)
    for job_id in jobs:
        assert sorted(t["idx"] for t in sent if t["job_id"] == str(job_id)) == [0, 2], job_id


def test_a_gpu_queue_the_broker_recreated_gets_the_unfinished_tasks_again(apps, service, conn, settings):
    """No loss the relay could see (the events are all there), yet the queue's tasks are gone: a
    broker restarted again after the relay had published everything again. The queue's new
    topic id tells the dispatcher, which sends the unfinished items again at once."""
    from kafka import KafkaAdminClient

    from infra.kafka_admin import ensure_topics

    job_id = running_job(service, conn)
    bootstrap = settings.effective_kafka_bootstrap
    topic = f"gpu-queue-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], 2)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    dispatcher = Dispatcher(OnePoll([]), kafka_io.producer(settings), PaletteApplication(env=event_store_env(settings)),
                            settings.effective_database_url, stale_s=3600,
                            queue=KafkaTaskQueue(admin, probe, topic=topic))
    dispatcher.queue_check_s = 0.0
    sent: list[dict[str, Any]] = []
    real = dispatcher._send
    dispatcher._send = lambda task: (sent.append(task), real(task))[1]  # type: ignore[method-assign]
    try:
        dispatcher.step()
        dispatcher.step()
        assert [t for t in sent if t["job_id"] == str(job_id)] == []  # the same queue: nothing to do
        admin.delete_topics([topic])
        ensure_topics(bootstrap, [topic], 2)
        dispatcher.step()
        assert sorted(t["idx"] for t in sent if t["job_id"] == str(job_id)) == [0, 2]
    finally:
        dispatcher.close()  # and the queue's clients
        cleanup = KafkaAdminClient(bootstrap_servers=bootstrap)
        with contextlib.suppress(Exception):
            cleanup.delete_topics([topic])
        cleanup.close()


def finished_job(service: PaletteService, conn: psycopg.Connection[Any]) -> uuid.UUID:
    """A job done in the store, its jobs_log row folded as done."""
    user_id = service.register(f"held-{uuid.uuid4()}", plan="pro").value[0]
    job_id: uuid.UUID = service.create_job(user_id, "interior", 1).value
    service.confirm_upload(user_id, job_id)
    service.execute_job(user_id, job_id, EDITS)
    service.record_item_result(job_id, 0, "done", f"{job_id}:0")
    wait_until(lambda: conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s",
                                    [job_id]).fetchone() == ("done",), timeout_s=30, what="the job's row")
    return job_id


def test_jobs_the_sweep_cannot_send_again_do_not_hide_a_stalled_job_behind_them(apps, service, conn, settings):
    """The sweep reads a page of the stalest jobs a pass. Rows that stay stale whatever it does
    (finished jobs whose rows are held, here as many as a page) took every page, so a stalled job
    after them was never sent again; each pass now reads on from where the last one stopped."""
    limit = 2
    held = [finished_job(service, conn) for _ in range(limit)]
    job_id = running_job(service, conn)
    dispatcher = Dispatcher(OnePoll([]), kafka_io.producer(settings), PaletteApplication(env=event_store_env(settings)),
                            settings.effective_database_url, stale_s=0.001)
    sent: list[dict[str, Any]] = []
    real = dispatcher._send
    dispatcher._send = lambda task: (sent.append(task), real(task))[1]  # type: ignore[method-assign]
    with contextlib.closing(dispatcher), rows_refolded(conn, service.app, JOBS_LOG, held):
        # rows still saying running, their last change long ago: as a job's held behind a dead
        # letter (the projector stopped folding it there)
        conn.execute("UPDATE palette_read.jobs_log SET status = 'running', updated_at = now() - interval '100 years' "
                     "WHERE id = ANY(%s)", [held])
        (stale,) = conn.execute("SELECT count(*) FROM palette_read.jobs_log "
                                "WHERE status IN ('queued', 'running')").fetchone() or (0,)
        for _ in range(stale // limit + 2):  # enough passes to read every stale row once
            dispatcher.sweep(limit=limit)
            if any(t["job_id"] == str(job_id) for t in sent):
                break
        assert sorted(t["idx"] for t in sent if t["job_id"] == str(job_id)) == [0, 2]
        assert not [t for t in sent if t["job_id"] in {str(h) for h in held}]
