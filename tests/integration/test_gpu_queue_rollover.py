"""The dispatcher starts the GPU queue's log afresh (adapters.dispatcher, adapters.rollover) on
the real broker, several times, while a member of the GPU group reads it, sometimes keeping up
and sometimes behind, and never while a second dispatcher runs: every task sent reaches the
group."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from adapters import kafka_io
from adapters.dispatcher import ALONE_LOCK, Dispatcher, KafkaTaskQueue
from adapters.rollover import KafkaLogAdmin, LogRollover
from adapters.settings import Settings
from infra.kafka_admin import ensure_topics

from .test_stack import wait_until


class NoEvents:
    """The dispatcher's consumer of palette.events, unused here (tasks are sent directly)."""

    def close(self) -> None:
        pass


class NoStore:
    repository = None

    def close(self) -> None:
        pass


def test_the_dispatcher_starts_the_gpu_queue_afresh_and_the_gpu_group_misses_no_task(settings: Settings) -> None:
    bootstrap = settings.effective_kafka_bootstrap
    topic, group = f"gpu-rollover-{uuid.uuid4().hex[:8]}", f"gpu-rollover-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], 2)
    rollover = LogRollover(KafkaLogAdmin(bootstrap), topic, 2, (group,), every_batches=4, min_messages=8,
                           retry_s=0.01, max_retry_s=0.02)
    queue = KafkaTaskQueue.connect(bootstrap, topic, group)  # its end offsets: no other dispatcher's tasks
    dispatcher = Dispatcher(NoEvents(), kafka_io.producer(settings), NoStore(), settings.effective_database_url,
                            queue=queue, rollover=rollover, topic=topic)
    other = psycopg.connect(settings.effective_database_url, autocommit=True)  # a second dispatcher, alive
    other.execute("SELECT pg_advisory_lock_shared(hashtext(%s))", [ALONE_LOCK])
    member = kafka_io.consumer(settings, group, topic, max_poll_records=16, fetch_max_wait_ms=200)
    sent: set[str] = set()
    seen: set[str] = set()

    def read() -> bool:
        for records in member.poll(timeout_ms=100).values():
            seen.update(f"{t['job_id']}/{t['idx']}" for t in map(json.loads, (r.value for r in records)))
        member.commit()
        return sent <= seen

    try:
        wait_until(lambda: read() or member.assignment(), what="the member's assignment")
        for round in range(400):
            job = str(uuid.uuid4())
            tasks: list[dict[str, Any]] = [{"job_id": job, "idx": i} for i in range(3)]
            assert dispatcher.dispatch(tasks) == 3
            sent.update(f"{job}/{i}" for i in range(3))
            if round % 3:  # two rounds in three the group keeps up; in the third it is behind
                wait_until(read, what="the group to read every task so far")
            dispatcher.start_queue_afresh()
            if round == 40:  # never while another dispatcher runs (its tasks would go with the old log)
                assert rollover.rollovers == 0 and rollover.postponed > 0, rollover.batches
                other.close()
            if rollover.rollovers >= 3:
                break
        wait_until(read, what="the group to read every task")
        assert rollover.rollovers >= 3, (rollover.batches, dispatcher.ends)
        assert rollover.postponed >= 1  # the rounds it was behind
        assert sent == seen  # nothing skipped (and nothing the dispatcher did not send)
    finally:
        other.close()
        member.close()
        dispatcher.close()  # its rollover and queue, and its ALONE_LOCK session: a later test may count holders


class NoProducer:
    def close(self) -> None:
        pass


class NoAdmin:
    """The rollover's broker admin, never asked here."""


def test_a_dispatcher_is_not_alone_while_another_lives(settings: Settings) -> None:
    """Each one holds ALONE_LOCK shared for its life, so none starts the GPU queue afresh (and
    drops the other's tasks with the old log) while another runs."""

    def started() -> Dispatcher:
        rollover = LogRollover(NoAdmin(), f"gpu-alone-{uuid.uuid4().hex[:8]}", 1, ("gpu-alone",), every_batches=4)
        return Dispatcher(NoEvents(), NoProducer(), NoStore(), settings.effective_database_url, rollover=rollover)

    def held_by(d: Dispatcher) -> list[str]:
        assert d.conn is not None
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            return [mode for (mode,) in conn.execute(
                "SELECT mode FROM pg_locks WHERE locktype = 'advisory' AND pid = %s "
                "AND classid::bigint = (hashtext(%s)::bigint >> 32) & 4294967295 "
                "AND objid::bigint = hashtext(%s)::bigint & 4294967295",
                [d.conn.info.backend_pid, ALONE_LOCK, ALONE_LOCK]).fetchall()]

    first, second = started(), started()
    try:
        assert held_by(first) == ["ShareLock"]
        with second._alone() as alone:
            assert not alone  # (other dispatchers on this database may hold it too: never alone then either)
    finally:
        first.close()
        second.close()
